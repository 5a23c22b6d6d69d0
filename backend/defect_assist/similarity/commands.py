"""Similarity commands: ``defect-assist index`` and ``defect-assist similar``.

Both use the project's one similarity index (``QDRANT_URL``, else embedded storage under
``QDRANT_PATH``), the same one the backend's ``/similar`` route and ``defect-assist fiftyone`` use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

if TYPE_CHECKING:
    from defect_assist.similarity.index import Neighbour, SimilarityIndex

console = Console(stderr=True)
out = Console()

ProjectOpt = Annotated[str, typer.Option("--project", help="Project id in the model store.")]
ModelDirOpt = Annotated[Path | None, typer.Option(help="Model store root (default MODEL_DIR).")]
QdrantPathOpt = Annotated[Path | None, typer.Option(help="Embedded Qdrant storage (default QDRANT_PATH).")]
QdrantUrlOpt = Annotated[str | None, typer.Option(help="Qdrant server URL (default QDRANT_URL).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda …")]


def _check_free(index: SimilarityIndex) -> int:
    """The index's point count; a clear error (not a traceback) when another process holds its storage."""
    from defect_assist.similarity.local_storage import IndexBusyError

    try:
        return index.count()
    except IndexBusyError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from error


def index(
    data: Annotated[
        Path, typer.Option("--data", help="Image folder (MVTec layout understood).", exists=True)
    ],
    project: ProjectOpt = "default",
    reembed_stale: Annotated[
        bool, typer.Option(help="Re-embed images embedded by another model version.")
    ] = True,
    model_dir: ModelDirOpt = None,
    qdrant_path: QdrantPathOpt = None,
    qdrant_url: QdrantUrlOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Build or update the similarity index of a folder with the project's current model."""
    from defect_assist.core.progress import RichProgress
    from defect_assist.similarity.indexing import update_index
    from defect_assist.similarity.mvtec import walk_folder
    from defect_assist.similarity.service import open_context

    records = walk_folder(data)
    if not records:
        raise typer.BadParameter(f"no images in {data}")
    context = open_context(project, model_dir, qdrant_path, qdrant_url, device=device)
    try:
        _check_free(context.index)
        stale = context.index.mark_stale(context.model_version)
        if stale:
            console.print(f"{stale} indexed image(s) were embedded by another model version")
        with RichProgress() as progress:
            report = update_index(
                context.index,
                context.embedder,
                records,
                context.model_version,
                reembed_stale=reembed_stale,
                progress=progress,
            )
    finally:
        context.close()
    for path, error in report.failed.items():
        console.print(f"[yellow]skipped {path}: {error}[/yellow]")
    out.print_json(
        json.dumps({"project": project, "model_version": context.model_version, **report.summary()})
    )


def similar(
    image: Annotated[Path, typer.Argument(help="Query image.", exists=True, dir_okay=False)],
    k: Annotated[int, typer.Option("--k", help="Number of neighbours.", min=1)] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    project: ProjectOpt = "default",
    model_dir: ModelDirOpt = None,
    qdrant_path: QdrantPathOpt = None,
    qdrant_url: QdrantUrlOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Nearest neighbours of an image in the project's index, with similarity, labels and scores."""
    from defect_assist.similarity.indexing import query_similar
    from defect_assist.similarity.service import open_context

    context = open_context(project, model_dir, qdrant_path, qdrant_url, device=device)
    try:
        if not _check_free(context.index):
            raise typer.BadParameter(
                f"the index of project {project!r} is empty; run `defect-assist index` "
                "(or `defect-assist fiftyone`) first"
            )
        query, neighbours = query_similar(context.index, context.embedder, image, k=k)
    finally:
        context.close()
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "query": query,
                    "model_version": context.model_version,
                    "neighbours": [n.summary() for n in neighbours],
                }
            )
        )
        return
    console.print(
        f"query {image}: score {query['score']:.3f} ({'anomalous' if query['is_anomalous'] else 'normal'})"
    )
    print_neighbours(neighbours)


def print_neighbours(neighbours: list[Neighbour], console: Console = out) -> None:
    """The ``similar`` table, paths whole at any width (folded when narrow; see :func:`print_table`)."""
    from defect_assist.core.progress import print_table

    table = Table(
        "#", "similarity", "label", "defect type", "score", "split", Column("path", overflow="fold")
    )
    narrow = Table("#", "similarity / score", "label / defect type / split", Column("path", overflow="fold"))
    for rank, n in enumerate(neighbours, 1):
        p = n.payload
        score = "-" if p.get("score") is None else f"{p['score']:.3f}"
        stale = " (stale)" if p.get("stale") else ""
        similarity, path = f"{n.similarity:.4f}", str(p.get("path")) + stale
        label, defect, split = (str(p.get(key)) for key in ("label", "defect_type", "split"))
        table.add_row(*map(Text, (str(rank), similarity, label, defect, score, split, path)))
        narrow.add_row(*map(Text, (str(rank), f"{similarity}\n{score}", f"{label}\n{defect}\n{split}", path)))
    print_table(console, table, narrow)


def register(app: typer.Typer) -> None:
    """Add the similarity commands to the CLI."""
    app.command("index")(index)
    app.command("similar")(similar)
