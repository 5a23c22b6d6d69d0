"""What determines a distilled EfficientAd teacher (kept free of torch so the CLI loads fast)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass
class DistillConfig:
    """Everything that determines a distilled teacher (its hash names the checkpoint)."""

    size: str = "small"
    backbone: str = "tf_efficientnet_lite0"
    data: str = ""  # folder of natural images (searched recursively)
    steps: int = 6400  # CPU default (21 min on 2 idle cores, once: cached); use 20k+ on a GPU
    batch_size: int = 4
    crop_size: int = 64  # PDN input; the backbone sees 2x (crop + 2 * context)
    context: int = 32  # pixels of image around the crop that the backbone (not the PDN) sees; multiple of 4
    target_strides: str = "8"  # backbone blocks regressed: "8", "16" or "8+16" (see README)
    # teacher = PDN with the adapter folded into its last layer (see folded_teacher_state)
    fold_adapter: bool = True
    lr: float = 1e-3
    weight_decay: float = 1e-5
    seed: int = 0
    holdout_fraction: float = 0.1
    stat_images: int = 64  # images used to estimate the target channel statistics
    checkpoint_every: int = 50

    def fingerprint(self) -> str:
        relevant = {k: v for k, v in asdict(self).items() if k != "checkpoint_every"}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
