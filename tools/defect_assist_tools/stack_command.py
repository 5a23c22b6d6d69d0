"""``defect-assist stack``: the embedded one-machine stack on the sample data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from defect_assist.core.settings import get_settings


def stack(
    data: Annotated[
        Path | None,
        typer.Option(help="Sample data, MVTec layout (default <DATASETS_DIR>/magnetic_tile)."),
    ] = None,
    project: Annotated[
        str,
        typer.Option(
            help="Model store project when Label Studio is off: a number, since the backend serves "
            "Label Studio project ids (with Label Studio: the demo project's id)."
        ),
    ] = "0",
    port: Annotated[int, typer.Option(help="ML backend port.")] = 9090,
    label_studio: Annotated[
        bool,
        typer.Option(
            "--label-studio/--no-label-studio",
            help="Run Label Studio (installed into .ls-venv on the first run).",
        ),
    ] = True,
    label_studio_port: Annotated[int, typer.Option(help="Label Studio port.")] = 8080,
    tasks: Annotated[int, typer.Option(help="Sample test images imported into the demo LS project.")] = 24,
    max_train: Annotated[
        int | None, typer.Option(help="Train the first model on at most N normals (default all).")
    ] = None,
    smoke: Annotated[bool, typer.Option("--smoke", help="Exit after the start-up check.")] = False,
    state_dir: Annotated[
        Path | None, typer.Option(help="Logs and Label Studio data (default var/stack).")
    ] = None,
) -> None:
    """Run the embedded stack: Redis, a retrain worker, the ML backend and Label Studio."""
    from defect_assist_tools.stack import StackOptions, run_stack  # httpx: the server extra

    if not label_studio and not (project.isascii() and project.isdigit()):
        raise typer.BadParameter(
            f"{project!r}: the backend's /predict serves numeric (Label Studio) project ids",
            param_hint="--project",
        )
    options = StackOptions(
        data=data or get_settings().datasets_dir / "magnetic_tile",
        project=project,
        backend_port=port,
        label_studio=label_studio,
        label_studio_port=label_studio_port,
        tasks=tasks,
        max_train=max_train,
        smoke=smoke,
    )
    if state_dir is not None:
        options.state_dir = state_dir
    raise typer.Exit(run_stack(options))
