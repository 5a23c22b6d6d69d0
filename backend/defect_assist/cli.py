"""The ``defect-assist`` command line: train, predict, evaluate, manage versions, and the services."""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

app = typer.Typer(
    name="defect-assist",
    help="Unsupervised defect pre-annotation for Label Studio (PatchCore, EfficientAd).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)
out = Console()

# Modules that add their own commands: each defines ``register(app: typer.Typer) -> None``.
COMMAND_MODULES = [
    "defect_assist.server.commands",
    "defect_assist_worker.commands",
    "defect_assist.similarity.commands",
    "defect_assist.models.efficientad.commands",
]


class RichProgress:
    """A ``(stage, done, total)`` progress callback drawing rich progress bars, one per stage."""

    def __init__(self, enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("{task.description:>12}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> RichProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


def _settings():
    from defect_assist.settings import get_settings

    return get_settings()


def _parse_options(options: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs into model config (values parsed as JSON when possible)."""
    parsed: dict[str, Any] = {}
    for option in options or []:
        key, _, value = option.partition("=")
        if not _:
            raise typer.BadParameter(f"expected key=value, got {option!r}")
        try:
            parsed[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key.strip()] = value
    return parsed


@app.callback()
def main_callback(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def train(
    images: Annotated[Path, typer.Option("--images", help="Folder (or file) of normal images.", exists=True)],
    project: Annotated[str, typer.Option("--project", help="Project id in the model store.")],
    model: Annotated[str, typer.Option("--model", help="Model kind.")] = "patchcore",
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="Model option key=value.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda …")] = "auto",
    model_dir: Annotated[Path | None, typer.Option(help="Model store root (default MODEL_DIR).")] = None,
) -> None:
    """Train on normal images and publish a new version into MODEL_DIR/<project>/."""
    from defect_assist.models import create_model
    from defect_assist.store import ModelStore

    store = ModelStore(model_dir or _settings().model_dir)
    anomaly_model = create_model(model, device=device, **_parse_options(option))
    with RichProgress() as progress:
        report = anomaly_model.fit(images, progress=progress)
    info = store.publish(project, anomaly_model)
    console.print(
        f"trained {model} on {report.n_train} images (+{report.n_holdout} held out for the threshold) "
        f"in {report.fit_seconds:.1f}s"
    )
    out.print(f"published {info.project}/{info.version}")


@app.command()
def predict(
    source: Annotated[Path, typer.Argument(help="Image file or folder.", exists=True)],
    project: Annotated[str, typer.Option("--project", help="Project id in the model store.")],
    version: Annotated[str | None, typer.Option(help="Version (default: current).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    masks: Annotated[Path | None, typer.Option(help="Write <stem>_mask.png files here.")] = None,
    heatmaps: Annotated[Path | None, typer.Option(help="Write <stem>_heatmap.png files here.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda …")] = "auto",
    model_dir: Annotated[Path | None, typer.Option(help="Model store root (default MODEL_DIR).")] = None,
) -> None:
    """Score images with the project's model: score, verdict, and optional mask/heatmap files."""
    from defect_assist.images import collect_images
    from defect_assist.store import ModelStore
    from defect_assist.visualize import save_heatmap, save_mask

    store = ModelStore(model_dir or _settings().model_dir)
    anomaly_model = store.load(project, version, device=device)
    files = collect_images([source])
    results = anomaly_model.predict(files)
    table = Table("image", "score", "verdict", "defect px")
    failed = 0
    for path, result in zip(files, results, strict=True):
        if result.ok:
            if masks:
                save_mask(result.mask, masks / f"{path.stem}_mask.png")
            if heatmaps:
                save_heatmap(path, result.anomaly_map, heatmaps / f"{path.stem}_heatmap.png")
        else:
            failed += 1
        if as_json:
            typer.echo(json.dumps(result.summary()))
        elif result.ok:
            table.add_row(str(path), f"{result.score:.3f}", result.label, str(int(result.mask.sum())))
        else:
            table.add_row(str(path), "-", f"[red]error: {result.error}[/red]", "-")
    if not as_json:
        out.print(table)
    if failed:
        console.print(f"[yellow]{failed} image(s) could not be read[/yellow]")


@app.command()
def evaluate(
    data: Annotated[
        Path, typer.Option("--data", help="MVTec-layout category folder or root of several.", exists=True)
    ],
    model: Annotated[str, typer.Option("--model", help="Model kind.")] = "patchcore",
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="Model option key=value.")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    category: Annotated[list[str] | None, typer.Option(help="Only these categories.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda …")] = "auto",
    max_train: Annotated[int | None, typer.Option(help="Use at most N training images (subsample).")] = None,
) -> None:
    """Train on train/good, test on test/: image/pixel AUROC, F1, AUPRO per category and mean."""
    from defect_assist.evaluation import evaluate_dataset, results_table

    with RichProgress() as progress:
        results = evaluate_dataset(
            data,
            model,
            _parse_options(option),
            device=device,
            categories=category,
            max_train=max_train,
            progress=progress,
        )
    out.print(results_table(results))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2))
        console.print(f"wrote {json_out}")


@app.command()
def versions(
    project: Annotated[str, typer.Option("--project", help="Project id.")],
    model_dir: Annotated[Path | None, typer.Option(help="Model store root (default MODEL_DIR).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List a project's model versions."""
    from defect_assist.store import ModelStore

    found = ModelStore(model_dir or _settings().model_dir).versions(project)
    if as_json:
        out.print_json(
            json.dumps(
                [
                    {"version": v.version, "current": v.is_current, "path": str(v.path), **v.metadata}
                    for v in found
                ],
                default=str,
            )
        )
        return
    table = Table("version", "current", "kind", "backbone", "images", "update", "created")
    for info in found:
        meta = info.metadata
        table.add_row(
            info.version,
            "*" if info.is_current else "",
            info.kind,
            meta.get("backbone", ""),
            str(meta.get("n_train_images", "")),
            meta.get("update", ""),
            meta.get("created", ""),
        )
    out.print(table)


@app.command()
def rollback(
    project: Annotated[str, typer.Option("--project", help="Project id.")],
    version: Annotated[str | None, typer.Option(help="Version to make current (default: previous).")] = None,
    model_dir: Annotated[Path | None, typer.Option(help="Model store root (default MODEL_DIR).")] = None,
) -> None:
    """Make an earlier version current."""
    from defect_assist.store import ModelStore

    info = ModelStore(model_dir or _settings().model_dir).rollback(project, version)
    out.print(f"current {info.project}/{info.version}")


def _register_command_modules() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name and name.startswith(error.name):
                continue  # that part of the product is not installed in this checkout
            raise
        module.register(app)


_register_command_modules()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
