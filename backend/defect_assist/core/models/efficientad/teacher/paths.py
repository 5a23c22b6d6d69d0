"""Where teachers live: anomalib's official file, our cache in the model store, and copies for anomalib.

A resolved teacher is a :class:`TeacherInfo`: its weights file (anomalib's PDN keys), where it came
from and what is known of its quality.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defect_assist.core import backbones
from defect_assist.core.settings import get_settings

logger = logging.getLogger(__name__)

TEACHER_FILE = "teacher.pth"
PROVENANCE_FILE = "provenance.json"
CHECKPOINT_FILE = "checkpoint.pt"
OUR_MARKER_SUFFIX = ".defect_assist.json"  # sidecar marking a teacher *we* installed for anomalib


@dataclass
class TeacherInfo:
    """A resolved teacher: its weights file, where it came from and what we know of its quality."""

    size: str
    source: str  # official | distilled | random | file
    path: Path | None
    provenance: dict[str, Any] = field(default_factory=dict)


def natural_images_dir() -> Path:
    """The default folder of natural images (distillation and penalty): ``<DATASETS_DIR>/imagenet_sample``."""
    return get_settings().datasets_dir / "imagenet_sample"


def anomalib_teacher_path(size: str) -> Path:
    """Where anomalib 2.7 reads its teacher: ``<XDG_CACHE_HOME or ~/.cache>/anomalib/pre_trained/...``."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (
        cache
        / "anomalib"
        / "pre_trained"
        / "efficientad_pretrained_weights"
        / f"pretrained_teacher_{size}.pth"
    )


def official_teacher(size: str) -> Path | None:
    """anomalib's official teacher file when the user has it (a file we installed there does not count)."""
    path = anomalib_teacher_path(size)
    marker = path.with_name(path.name + OUR_MARKER_SUFFIX)
    return path if path.is_file() and not marker.exists() else None


def teacher_root(model_dir: str | Path) -> Path:
    """Cache folder of distilled teachers inside the model store."""
    return Path(model_dir) / "_teachers"


def default_teacher_name(size: str, backbone: str = "tf_efficientnet_lite0") -> str:
    return f"pdn_{size}_{backbone_short(backbone)}"


def backbone_short(name: str) -> str:
    return backbones.get_spec(name).timm_name.replace("tf_efficientnet_", "")


def install_for_anomalib(teacher_file: str | Path, size: str, overwrite: bool = False) -> Path | None:
    """Copy a distilled teacher to where anomalib's EfficientAd reads it, so ``anomalib train`` works offline.

    Never replaces an official file; a sidecar ``*.defect_assist.json`` marks the copy as ours.
    """
    path = anomalib_teacher_path(size)
    if official_teacher(size) is not None:
        logger.info("official anomalib teacher present at %s; not replaced", path)
        return None
    if path.exists() and not overwrite:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(teacher_file, path)
    provenance = Path(teacher_file).with_name(PROVENANCE_FILE)
    marker = {"installed_by": "defect-assist", "source": str(teacher_file)}
    if provenance.is_file():
        marker["provenance"] = json.loads(provenance.read_text())
    path.with_name(path.name + OUR_MARKER_SUFFIX).write_text(json.dumps(marker, indent=2, default=str))
    return path
