"""``defect-assist train``: train on local normal images and publish, through the one training path."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from PIL import Image
from rich.console import Console

from defect_assist.core.images import collect_images
from defect_assist.core.progress import RichProgress, parse_options
from defect_assist.core.settings import get_settings
from defect_assist.training.progress import TrainingProgress

console = Console(stderr=True)
out = Console()


class ConsoleProgress(TrainingProgress):
    """Training progress drawn as one rich bar per stage."""

    def __init__(self, bars: RichProgress) -> None:
        super().__init__()
        self.bars = bars

    def __call__(self, stage: str, done: int, total: int) -> None:
        super().__call__(stage, done, total)
        self.bars(stage, done, total)


def train(
    images: Annotated[Path, typer.Option("--images", help="Folder (or file) of normal images.", exists=True)],
    project: Annotated[str, typer.Option("--project", help="Project id in the model store.")],
    model: Annotated[str, typer.Option("--model", help="Model kind.")] = "patchcore",
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="Model option key=value.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda …")] = "auto",
    model_dir: Annotated[Path | None, typer.Option(help="Model store root (default MODEL_DIR).")] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Forget the current version's normals: train on these only.")
    ] = False,
    defects: Annotated[
        Path | None,
        typer.Option(
            "--defects",
            exists=True,
            help="Folder of corrected defect images, each with its mask <stem>_mask.png beside it or in "
            "--masks: thresholds and the served masks are learned from them (never trained on as normals).",
        ),
    ] = None,
    masks: Annotated[
        Path | None, typer.Option("--masks", exists=True, help="Folder of the defects' masks.")
    ] = None,
) -> None:
    """Train on normal images (a full fit, with the current version's normals unless --fresh) and publish
    a new version into MODEL_DIR/<project>/: current if not worse than the current one, else a candidate."""
    settings = get_settings()
    if model_dir is not None:
        settings = settings.model_copy(update={"model_dir": model_dir})
    files = collect_images([images])
    if not files:
        raise typer.BadParameter(f"no images in {images}")
    from defect_assist.training.pipeline import train_and_publish  # torch: loaded when training
    from defect_assist.training.training_set import TrainingRefused

    options: dict[str, Any] = parse_options(option)
    anomalies = corrected_defects(defects, masks) if defects else []
    with RichProgress() as bars:
        try:
            result = train_and_publish(
                project,
                files,
                anomalies,
                settings=settings,
                kind=model,
                mode="full",
                options=options,
                device=device,
                progress=ConsoleProgress(bars),
                extra={"source": "cli", "reason": "defect-assist train"},
                keep_previous=not fresh,
            )
        except TrainingRefused as error:
            console.print(f"[red]{error}[/red]")
            raise typer.Exit(1) from None
    console.print(
        f"trained {model} on {result['trained_on']} images ({result['n_previous']} kept from the current "
        f"version, {result['n_check_normals']} held out to check versions) in {result['train_seconds']:.1f}s"
    )
    if result["current"]:
        out.print(f"published {project}/{result['version']}")
    else:
        out.print(f"published {project}/{result['version']} as a candidate: {result['check_reason']}")
        console.print(
            f"make it current with: defect-assist promote --project {project} --version {result['version']}"
        )


def corrected_defects(folder: Path, masks: Path | None = None) -> list[tuple[Path, np.ndarray | None]]:
    """Defect images of ``folder`` with their masks (``<stem>_mask.png`` in ``masks`` or beside them);
    an image without a mask still counts as a defect (for thresholds), a mask file is not an image."""
    found = []
    for path in collect_images([folder]):
        if path.stem.endswith("_mask"):
            continue
        mask_path = next(
            (
                d / f"{path.stem}_mask.png"
                for d in (masks, path.parent)
                if d and (d / f"{path.stem}_mask.png").exists()
            ),
            None,
        )
        mask = np.asarray(Image.open(mask_path).convert("L")) > 0 if mask_path else None
        found.append((path, mask))
    if not found:
        raise typer.BadParameter(f"no defect images in {folder}")
    return found


def register(app: typer.Typer) -> None:
    """Add the training command to the CLI."""
    app.command()(train)
