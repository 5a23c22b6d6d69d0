"""Which teacher a model uses: anomalib's official file, our cached distilled one (distilled when
missing), a random PDN or a given file; and loading its weights into anomalib's PDN."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defect_assist.core.models.efficientad.config import EfficientAdConfig
from defect_assist.core.models.efficientad.distill_config import DistillConfig
from defect_assist.core.models.efficientad.teacher.distill import distill_teacher
from defect_assist.core.models.efficientad.teacher.paths import (
    PROVENANCE_FILE,
    TEACHER_FILE,
    TeacherInfo,
    anomalib_teacher_path,
    default_teacher_name,
    natural_images_dir,
    official_teacher,
    teacher_root,
)
from defect_assist.core.settings import get_settings

logger = logging.getLogger(__name__)


def resolve_teacher(
    size: str,
    teacher: str = "auto",
    model_dir: str | Path | None = None,
    data: str | Path | None = None,
    distill_overrides: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> TeacherInfo:
    """Find (or make) the teacher for ``size``.

    ``teacher``: ``auto`` (official anomalib file if present, else our cached distilled teacher,
    distilling it first when missing), ``official``, ``distilled``, ``random`` (no pretraining, the
    ablation baseline) or a path to a ``.pth`` state dict with anomalib's keys.
    """
    if teacher not in {"auto", "official", "distilled", "random"}:
        path = Path(teacher)
        if not path.is_file():
            raise FileNotFoundError(f"teacher file {path} not found")
        return TeacherInfo(size, "file", path)
    if teacher == "random":
        return TeacherInfo(size, "random", None)
    official = official_teacher(size)
    if teacher in {"auto", "official"} and official is not None:
        return TeacherInfo(size, "official", official)
    if teacher == "official":
        raise FileNotFoundError(f"no official anomalib teacher at {anomalib_teacher_path(size)}")
    config = DistillConfig(size=size, data=str(data or natural_images_dir()), **(distill_overrides or {}))
    folder = teacher_root(model_dir or get_settings().model_dir) / default_teacher_name(size, config.backbone)
    provenance_file = folder / PROVENANCE_FILE
    if (folder / TEACHER_FILE).is_file() and provenance_file.is_file():
        provenance = json.loads(provenance_file.read_text())
        if provenance.get("fingerprint") != config.fingerprint():
            logger.info(
                "using the cached teacher %s, distilled with settings other than the current defaults "
                "(see its provenance.json); `defect-assist distill-teacher --fresh` re-distils it",
                folder,
            )
        return TeacherInfo(size, "distilled", folder / TEACHER_FILE, provenance)
    logger.info("no teacher for EfficientAd-%s yet: distilling one into %s", size, folder)
    return distill_teacher(config, folder, show_progress=show_progress)


def configured_teacher(config: EfficientAdConfig) -> TeacherInfo:
    """The teacher an EfficientAd config asks for (the served model and the Lightning module alike)."""
    return resolve_teacher(
        config.model_size,
        config.teacher,
        model_dir=config.model_dir,
        data=config.teacher_data,
        distill_overrides={"backbone": config.backbone},
    )


def load_teacher_weights(pdn: nn.Module, info: TeacherInfo) -> None:
    """Strictly load the teacher's state dict into ``pdn`` (anomalib's keys; padding does not change them)."""
    if info.path is None:
        return
    pdn.load_state_dict(torch.load(info.path, map_location="cpu", weights_only=True), strict=True)
