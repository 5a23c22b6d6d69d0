"""Model-core commands: ``predict``, ``evaluate``, ``versions``, ``promote``, ``rollback`` and ``export``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from defect_assist.core.progress import RichProgress, parse_options, print_table
from defect_assist.core.settings import get_settings

if TYPE_CHECKING:
    from defect_assist.core.store import VersionInfo

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
        print_table(out, table)
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
    split: Annotated[
        str,
        typer.Option(help="all | validation | holdout: fixed halves of test/ (choose on one, report on one)"),
    ] = "all",
    corrected: Annotated[
        int,
        typer.Option(
            help="Learn from N defect images of test/ with their masks (as from annotators' "
            "corrections); score the rest."
        ),
    ] = 0,
) -> None:
    """Train on train/good, test on test/: AUROC, AUPRO, and what is served (verdict P/R/F1, mask Dice)."""
    from defect_assist.core.evaluation import evaluate_dataset, results_tables

    with RichProgress() as progress:
        results = evaluate_dataset(
            data,
            model,
            parse_options(option),
            device=device,
            categories=category,
            max_train=max_train,
            progress=progress,
            split=split,
            corrected=corrected,
        )
    for table in results_tables(results):
        print_table(out, table)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2))
        console.print(f"wrote {json_out}")


def versions(
    project: Annotated[str, typer.Option("--project", help="Project id.")],
    model_dir: Annotated[Path | None, typer.Option(help="Model store root (default MODEL_DIR).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List a project's model versions: current, candidates (with why they are not current), previous."""
    from defect_assist.core.store import ModelStore

    found = ModelStore(model_dir or get_settings().model_dir).versions(project)
    if as_json:
        out.print_json(
            json.dumps([{**v.summary(), "path": str(v.path), **v.metadata} for v in found], default=str)
        )
        return
    print_versions(found)


def version_tables(found: list[VersionInfo]) -> tuple[Table, Table]:
    """The ``versions`` listing in two layouts: one column per fact, and a narrow one (version over
    status, kind over backbone, images over update) for terminals too narrow for the first."""
    wide = Table(
        Column("version", no_wrap=True),
        Column("status", no_wrap=True),
        "kind",
        Column("backbone", overflow="fold"),
        Column("images", justify="right"),
        "update",
        Column("created", overflow="fold"),
        Column("reason", overflow="fold"),
    )
    narrow = Table(
        Column("version / status", no_wrap=True),
        Column("kind / backbone", overflow="fold"),
        "images / update",
        Column("created", overflow="fold"),
        Column("reason", overflow="fold"),
    )
    for info in found:
        meta = info.metadata
        backbone, images = _text(meta.get("backbone")), _text(meta.get("n_train_images"))
        update, created, reason = (
            _text(meta.get("update")),
            _text(meta.get("created")),
            _text(info.candidate_reason),
        )
        wide.add_row(
            *map(Text, (info.version, info.status, info.kind, backbone, images, update, created, reason))
        )
        narrow.add_row(
            *map(
                Text,
                (
                    f"{info.version}\n{info.status}",
                    _lines(info.kind, backbone),
                    _lines(images, update),
                    created,
                    reason,
                ),
            )
        )
    return wide, narrow


def print_versions(found: list[VersionInfo], console: Console = out) -> None:
    """Print the ``versions`` table: ids and reasons whole at any width (see :func:`print_table`)."""
    print_table(console, *version_tables(found))


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _lines(*values: str) -> str:
    return "\n".join(value for value in values if value)


def _store_command(action: str, project: str, version: str | None, model_dir: Path | None) -> None:
    from defect_assist.core.store import ModelStore, StoreError

    store = ModelStore(model_dir or get_settings().model_dir)
    try:
        if action == "promote":
            info = store.promote(project, str(version))
        else:
            info = store.rollback(project, version)
    except StoreError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    out.print(f"current {info.project}/{info.version}")


def promote(
    project: Annotated[str, typer.Option("--project", help="Project id.")],
    version: Annotated[str, typer.Option("--version", help="Candidate version to make current.")],
    model_dir: Annotated[Path | None, typer.Option(help="Model store root (default MODEL_DIR).")] = None,
) -> None:
    """Make a candidate version (published, not made current by the retrain check) current."""
    _store_command("promote", project, version, model_dir)


def rollback(
    project: Annotated[str, typer.Option("--project", help="Project id.")],
    version: Annotated[str | None, typer.Option(help="Version to make current (default: previous).")] = None,
    model_dir: Annotated[Path | None, typer.Option(help="Model store root (default MODEL_DIR).")] = None,
) -> None:
    """Make an earlier version current (by default the last non-candidate one before the current)."""
    _store_command("rollback", project, version, model_dir)


def export(
    project: Annotated[str, typer.Option("--project", help="Project id.")],
    version: Annotated[str | None, typer.Option(help="Version to export (default: current).")] = None,
    check: Annotated[
        Path | None, typer.Option(help="Folder of images: compare the export's predictions with torch's.")
    ] = None,
    model_dir: Annotated[Path | None, typer.Option(help="Model store root (default MODEL_DIR).")] = None,
) -> None:
    """Export a version as ONNX and OpenVINO IR (``<version>/export/``), served with INFERENCE_ENGINE."""
    from defect_assist.core.export import ENGINES, ExportError, check_parity, export_dir, export_model
    from defect_assist.core.images import collect_images
    from defect_assist.core.store import ModelStore, StoreError

    store = ModelStore(model_dir or get_settings().model_dir)
    try:
        name = version or store.current_version(project)
        model = store.load(project, name, device="cpu")
        directory = store.project_dir(project) / str(name)
        manifest = export_model(model, export_dir(directory))
    except (StoreError, ExportError) as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    out.print(f"exported {project}/{name} to {export_dir(directory)} in {manifest.export_seconds} s")
    if check is not None:
        images: list[Any] = list(collect_images([check]))
        table = Table("engine", "images", "max score diff", "max map diff", "min mask IoU", "verdicts differ")
        for engine in ENGINES[1:]:
            r = check_parity(model, directory, images, engine)
            table.add_row(
                r.engine,
                str(r.images),
                f"{r.max_score_difference:.2e}",
                f"{r.max_map_difference:.2e}",
                f"{r.min_mask_iou:.4f}",
                str(r.verdicts_differing),
            )
        out.print(table)


def register(app: typer.Typer) -> None:
    """Add the model-core commands to the CLI."""
    for command in (predict, evaluate, versions, promote, rollback, export):
        app.command()(command)
