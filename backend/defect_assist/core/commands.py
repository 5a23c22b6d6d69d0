"""Model-core commands: ``predict``, ``evaluate``, ``versions`` and ``rollback``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from defect_assist.core.progress import RichProgress, parse_options
from defect_assist.core.settings import get_settings

console = Console(stderr=True)
out = Console()


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
    from defect_assist.core.images import collect_images
    from defect_assist.core.store import ModelStore
    from defect_assist.core.visualize import save_heatmap, save_mask

    store = ModelStore(model_dir or get_settings().model_dir)
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
    from defect_assist.core.evaluation import evaluate_dataset, results_table

    with RichProgress() as progress:
        results = evaluate_dataset(
            data,
            model,
            parse_options(option),
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


def versions(
    project: Annotated[str, typer.Option("--project", help="Project id.")],
    model_dir: Annotated[Path | None, typer.Option(help="Model store root (default MODEL_DIR).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List a project's model versions."""
    from defect_assist.core.store import ModelStore

    found = ModelStore(model_dir or get_settings().model_dir).versions(project)
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


def rollback(
    project: Annotated[str, typer.Option("--project", help="Project id.")],
    version: Annotated[str | None, typer.Option(help="Version to make current (default: previous).")] = None,
    model_dir: Annotated[Path | None, typer.Option(help="Model store root (default MODEL_DIR).")] = None,
) -> None:
    """Make an earlier version current."""
    from defect_assist.core.store import ModelStore

    info = ModelStore(model_dir or get_settings().model_dir).rollback(project, version)
    out.print(f"current {info.project}/{info.version}")


def register(app: typer.Typer) -> None:
    """Add the model-core commands to the CLI."""
    for command in (predict, evaluate, versions, rollback):
        app.command()(command)
