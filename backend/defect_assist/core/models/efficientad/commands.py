"""``defect-assist distill-teacher``: distil (or resume) an EfficientAd PDN teacher offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from defect_assist.core.models.efficientad.distill_config import DistillConfig

DEFAULTS = DistillConfig()


def register(app: typer.Typer) -> None:
    """Add the EfficientAd commands to the CLI."""

    @app.command("distill-teacher")
    def distill_teacher_command(
        size: Annotated[str, typer.Option(help="PDN size: small or medium.")] = DEFAULTS.size,
        data: Annotated[
            Path | None,
            typer.Option(help="Folder of natural images (default <DATASETS_DIR>/imagenet_sample)."),
        ] = None,
        backbone: Annotated[
            str, typer.Option(help="Offline ImageNet backbone giving the targets.")
        ] = DEFAULTS.backbone,
        steps: Annotated[int, typer.Option(help="Optimisation steps.")] = DEFAULTS.steps,
        batch_size: Annotated[int, typer.Option(help="Crops per step.")] = DEFAULTS.batch_size,
        crop_size: Annotated[
            int, typer.Option(help="PDN input crop (the backbone sees 2x).")
        ] = DEFAULTS.crop_size,
        context: Annotated[
            int, typer.Option(help="Pixels of context per side that only the backbone sees (multiple of 4).")
        ] = DEFAULTS.context,
        target_strides: Annotated[
            str, typer.Option(help="Backbone blocks to regress: 8, 16 or 8+16 (stride).")
        ] = DEFAULTS.target_strides,
        lr: Annotated[float, typer.Option(help="Adam learning rate (cosine decay).")] = DEFAULTS.lr,
        seed: Annotated[int, typer.Option(help="Random seed.")] = DEFAULTS.seed,
        name: Annotated[str | None, typer.Option(help="Cache name under <MODEL_DIR>/_teachers/.")] = None,
        model_dir: Annotated[Path | None, typer.Option(help="Model store root (default MODEL_DIR).")] = None,
        fresh: Annotated[bool, typer.Option("--fresh", help="Ignore an existing checkpoint.")] = False,
        install_anomalib: Annotated[
            bool,
            typer.Option(
                "--install-anomalib", help="Also copy it to where anomalib's EfficientAd reads its teacher."
            ),
        ] = False,
    ) -> None:
        """Distil a PDN teacher from an offline ImageNet backbone; cached with provenance."""
        from defect_assist.core.models.efficientad.teacher.distill import distill_teacher
        from defect_assist.core.models.efficientad.teacher.paths import (
            default_teacher_name,
            install_for_anomalib,
            natural_images_dir,
            official_teacher,
            teacher_root,
        )
        from defect_assist.core.settings import get_settings

        if official_teacher(size):
            typer.echo(
                f"note: anomalib's official teacher exists at {official_teacher(size)}; "
                "EfficientAd with teacher=auto uses it, teacher=distilled uses this one"
            )
        config = DistillConfig(
            size=size,
            backbone=backbone,
            data=str(data or natural_images_dir()),
            steps=steps,
            batch_size=batch_size,
            crop_size=crop_size,
            context=context,
            target_strides=target_strides,
            lr=lr,
            seed=seed,
        )
        folder = teacher_root(model_dir or get_settings().model_dir) / (
            name or default_teacher_name(size, backbone)
        )
        info = distill_teacher(config, folder, resume=not fresh)
        typer.echo(
            json.dumps(
                {
                    "teacher": str(info.path),
                    "heldout_regression_error": info.provenance["heldout_regression_error"],
                    "initial_heldout_regression_error": info.provenance["initial_heldout_regression_error"],
                },
                indent=2,
            )
        )
        if install_anomalib:
            installed = install_for_anomalib(info.path, size, overwrite=True)
            typer.echo(f"anomalib teacher: {installed or 'official file kept'}")
