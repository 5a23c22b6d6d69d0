"""Shared wiring for the CLI, the HTTP endpoint and the FiftyOne plugin: model + index from settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defect_assist.similarity.embedding import SimilarityEmbedder
from defect_assist.similarity.index import SimilarityIndex


@dataclass
class Context:
    """The project's current model (as an embedder) and its similarity index."""

    project: str
    model_version: str
    embedder: SimilarityEmbedder
    index: SimilarityIndex

    def close(self) -> None:
        self.index.close()


def open_context(
    project: str,
    model_dir: Path | None = None,
    qdrant_path: Path | None = None,
    qdrant_url: str | None = None,
    version: str | None = None,
    device: str = "auto",
    settings: Any = None,
) -> Context:
    """Load the project's current (or given) model version and open its index (QDRANT_URL / QDRANT_PATH)."""
    from defect_assist.core.settings import get_settings
    from defect_assist.core.store import ModelStore, StoreError

    settings = settings or get_settings()
    store = ModelStore(model_dir or settings.model_dir)
    version = version or store.current_version(project)
    if version is None:
        raise StoreError(f"project {project!r} has no published model in {store.root}; train one first")
    model = store.load(project, version, device=device)
    url = qdrant_url if qdrant_url is not None else settings.qdrant_url
    index = SimilarityIndex(project, path=qdrant_path or settings.qdrant_path, url=url or None)
    return Context(project, version, SimilarityEmbedder(model, version), index)
