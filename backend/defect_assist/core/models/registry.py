"""The registry of model kinds: build a new model or load a saved one by kind."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from defect_assist.core.models.base import AnomalyModel
from defect_assist.core.models.metadata import METADATA_FILE

# kind -> "module:Class"; a kind's module (and anomalib, seconds to import) loads only when used.
MODEL_REGISTRY: dict[str, str] = {
    "patchcore": "defect_assist.core.models.patchcore.anomaly_model:PatchcoreAnomalyModel",
    "efficientad": "defect_assist.core.models.efficientad.anomaly_model:EfficientAdAnomalyModel",
    "ikd": "defect_assist.core.models.ikd.anomaly_model:IkdAnomalyModel",
    "cfa": "defect_assist.core.models.cfa.anomaly_model:CfaAnomalyModel",
}


def model_class(kind: str) -> type[AnomalyModel]:
    """The class implementing ``kind``."""
    if kind not in MODEL_REGISTRY:
        raise KeyError(f"unknown model {kind!r}; available: {', '.join(sorted(MODEL_REGISTRY))}")
    module_name, class_name = MODEL_REGISTRY[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def create_model(kind: str, device: str = "auto", **options: Any) -> AnomalyModel:
    """A new, unfitted model of ``kind`` with ``options`` overriding its config's defaults."""
    return model_class(kind)(device=device, **options)


def load_model(directory: str | Path, device: str = "auto") -> AnomalyModel:
    """Load a saved model of whatever kind its ``metadata.json`` names."""
    kind = json.loads((Path(directory) / METADATA_FILE).read_text())["kind"]
    return model_class(kind).from_directory(directory, device=device)
