"""Exploration command: ``defect-assist fiftyone`` builds (and launches) the project's FiftyOne dataset.

It embeds through the project's similarity index (the one ``defect-assist index`` / ``similar`` use):
images indexed already are reused, new ones are added to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from defect_assist.similarity.commands import DeviceOpt, ModelDirOpt, ProjectOpt, QdrantPathOpt, QdrantUrlOpt

console = Console(stderr=True)
out = Console()


def fiftyone(
    data: Annotated[
        Path, typer.Option("--data", help="Image folder (MVTec layout understood).", exists=True)
    ],
    project: ProjectOpt = "default",
    name: Annotated[str | None, typer.Option(help="Dataset name (default defect-assist-<project>).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N images (quick looks).")] = None,
    launch: Annotated[bool, typer.Option(help="Launch the FiftyOne App afterwards and wait.")] = False,
    port: Annotated[int, typer.Option(help="App port.")] = 5151,
    address: Annotated[str, typer.Option(help="App address.")] = "127.0.0.1",
    model_dir: ModelDirOpt = None,
    qdrant_path: QdrantPathOpt = None,
    qdrant_url: QdrantUrlOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Build a persistent FiftyOne dataset: masks, heatmaps, verdicts, embeddings, 2-D plot, similarity."""
    from defect_assist.core.progress import RichProgress
    from defect_assist.core.settings import get_settings
    from defect_assist.core.store import ModelStore
    from defect_assist.explore.fiftyone_dataset import build_dataset

    settings = get_settings()
    store = ModelStore(model_dir or settings.model_dir)
    version = store.current_version(project)
    if version is None:
        raise typer.BadParameter(f"project {project!r} has no published model; train one first")
    model = store.load(project, version, device=device)
    with RichProgress() as progress:
        dataset = build_dataset(
            data,
            model,
            name=name or f"defect-assist-{project}",
            model_version=version,
            project=project,
            qdrant_path=qdrant_path or settings.qdrant_path,  # the project's one similarity index
            qdrant_url=qdrant_url or settings.qdrant_url or None,
            limit=limit,
            persistent=True,
            progress=progress,
        )
    report = dataset.info["defect_assist"]["index"]
    embedded = report["added"] + report["reembedded"]
    reused = report["unchanged"] + report["payload_updated"]
    out.print(
        f"dataset {dataset.name}: {len(dataset)} samples; similarity index of project {project!r}: "
        f"{embedded} embedded, {reused} reused, {report['total_points']} points"
    )
    if launch:
        import fiftyone as fo

        session = fo.launch_app(dataset, address=address, port=port, remote=True)
        console.print(f"FiftyOne App at http://{address}:{port} (Ctrl-C to stop)")
        session.wait(-1)


def register(app: typer.Typer) -> None:
    """Add the exploration command to the CLI."""
    app.command("fiftyone")(fiftyone)
