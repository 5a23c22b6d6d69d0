"""EfficientAd's options (stored in each saved model's metadata) and its two training schedules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from defect_assist.core.models.config import ModelConfig

# Training schedules. ``paper``: anomalib/paper settings (70k steps at 256 px, no early stopping) for
# GPU workers. ``cpu``: what fits in ~15 min on 2 CPU cores for ~600 images (see README).
SCHEDULES: dict[str, dict[str, Any]] = {
    "paper": {
        "image_size": 256,
        "max_steps": 70_000,
        "lr": 1e-4,
        "val_every": 0,
        "patience": 0,
        "time_budget_s": 0,
    },
    "cpu": {
        "image_size": 128,
        "max_steps": 1500,
        "lr": 2e-4,
        "val_every": 100,
        "patience": 4,
        "time_budget_s": 660,
    },
}


@dataclass
class EfficientAdConfig(ModelConfig):
    """EfficientAd options. ``None`` values come from the ``schedule`` (auto = paper on CUDA, else cpu).

    ``model_size`` (small | medium); ``teacher`` (auto | official | distilled | random | path to a
    .pth); ``teacher_data`` (natural images to distil from; default ``<DATASETS_DIR>/imagenet_sample``);
    ``penalty_dir`` (ImageFolder of natural images for the penalty loss; same default);
    ``val_every`` (steps between validation checks, 0 = never); ``patience`` (checks without >1 %
    improvement before stopping, 0 = never); ``time_budget_s`` (0 = none); ``resize`` (squash, as
    anomalib, or letterbox); ``map_border`` (replicate, or anomalib's zeros).
    """

    backbone: str = "tf_efficientnet_lite0"  # source of the distilled teacher's targets
    model_size: str = "small"
    teacher: str = "auto"
    teacher_data: str | None = None
    penalty_dir: str | None = None
    model_dir: str | None = None
    schedule: str = "auto"
    image_size: int | None = None
    max_steps: int | None = None
    lr: float | None = None
    weight_decay: float = 1e-5
    val_every: int | None = None
    patience: int | None = None
    time_budget_s: int | None = None
    val_fraction: float = 0.05
    padding: bool = False
    pad_maps: bool = True
    map_border: str = "replicate"
    resize: str = "squash"  # as anomalib; letterbox bars move from image to image (README)

    def resolved(self, cuda: bool) -> EfficientAdConfig:
        """This config with ``schedule`` chosen and every ``None`` filled from it."""
        schedule = self.schedule if self.schedule != "auto" else ("paper" if cuda else "cpu")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be auto, {' or '.join(SCHEDULES)}; got {schedule!r}")
        values = self.to_dict() | {"schedule": schedule}
        for key, value in SCHEDULES[schedule].items():
            if values.get(key) is None:
                values[key] = value
        for key in ("image_size", "max_steps", "val_every", "patience", "time_budget_s"):
            values[key] = int(values[key])
        values["lr"] = float(values["lr"])
        return EfficientAdConfig(**values)
