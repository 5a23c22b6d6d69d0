"""Distil a PDN teacher: the seeded, resumable training loop, its checkpoints and its quality measure."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from defect_assist.core import backbones
from defect_assist.core.models.efficientad.distill_config import DistillConfig
from defect_assist.core.models.efficientad.teacher.data import (
    NaturalImages,
    list_natural_images,
    split_holdout,
)
from defect_assist.core.models.efficientad.teacher.network import DistillationNet, folded_teacher_state
from defect_assist.core.models.efficientad.teacher.paths import (
    CHECKPOINT_FILE,
    PROVENANCE_FILE,
    TEACHER_FILE,
    TeacherInfo,
)
from defect_assist.core.models.efficientad.teacher.targets import BackboneTargets

logger = logging.getLogger(__name__)

TeacherProgress = Callable[[str, int, int, dict[str, float]], None]  # (stage, done, total, metrics)


def regression_error(
    net: DistillationNet, targets: BackboneTargets, loader: torch.utils.data.DataLoader
) -> float:
    """Mean squared error on standardised targets (1.0 ≈ always predicting the channel mean)."""
    was_training = net.training
    net.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for images in loader:
            crops, target = targets.split(images)
            prediction = net(crops)
            total += float(F.mse_loss(prediction, target, reduction="sum"))
            count += target.numel()
    net.train(was_training)
    return total / max(count, 1)


def distill_teacher(
    config: DistillConfig,
    out_dir: str | Path,
    progress: TeacherProgress | None = None,
    resume: bool = True,
    show_progress: bool = True,
) -> TeacherInfo:
    """Distil (or resume distilling) a PDN teacher into ``out_dir``; returns where it was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run = Distillation(config, out)
    if resume:
        run.resume()
    if run.step == 0:
        run.start()
    run.train(progress, show_progress)
    return run.write(started)


class Distillation:
    """One distillation run into ``out``: seeded networks, optimiser and data; resumable from a checkpoint."""

    def __init__(self, config: DistillConfig, out: Path) -> None:
        self.config, self.out = config, out
        self.train_files, self.held_files = split_holdout(
            list_natural_images(config.data), config.holdout_fraction
        )
        self.fingerprint = config.fingerprint()
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        self.targets = BackboneTargets(config.backbone, context=config.context, strides=config.target_strides)
        self.window = config.crop_size + 2 * config.context
        self.net = DistillationNet(config.size, self.targets.channels)
        self.optimizer = torch.optim.Adam(
            self.net.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        steps = config.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))),
        )
        generator = torch.Generator().manual_seed(config.seed)
        self.loader = torch.utils.data.DataLoader(
            NaturalImages(self.train_files, self.window, train=True),
            batch_size=config.batch_size,
            shuffle=True,
            drop_last=True,
            generator=generator,
            num_workers=0,
        )
        self.eval_loader = self._eval_loader(self.held_files)
        self.step, self.history = 0, []

    def _eval_loader(self, files: list[Path]) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(NaturalImages(files, self.window, train=False), batch_size=16)

    def held_out_error(self) -> float:
        return regression_error(self.net, self.targets, self.eval_loader) if self.held_files else math.nan

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_FILE

    def resume(self) -> None:
        """Continue from the checkpoint in ``out`` when it was written for the same configuration."""
        if not self.checkpoint_path.is_file():
            return
        checkpoint = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        if checkpoint.get("fingerprint") != self.fingerprint:
            logger.warning("checkpoint in %s is for another configuration; starting over", self.out)
            return
        self.net.load_state_dict(checkpoint["net"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.targets.mean.copy_(checkpoint["target_mean"])
        self.targets.std.copy_(checkpoint["target_std"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        random.setstate(checkpoint["rng"]["python"])
        np.random.set_state(checkpoint["rng"]["numpy"])
        self.step, self.history = int(checkpoint["step"]), list(checkpoint["history"])
        logger.info("resuming teacher distillation at step %d", self.step)

    def save_checkpoint(self) -> None:
        state = {
            "step": self.step,
            "fingerprint": self.fingerprint,
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "target_mean": self.targets.mean,
            "target_std": self.targets.std,
            "history": self.history,
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "numpy": np.random.get_state(),
            },
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path)

    # ------------------------------------------------------------------ training
    def start(self) -> None:
        """A fresh run: target statistics from the first training images, then the initial held-out error."""
        stats = self._eval_loader(self.train_files[: self.config.stat_images])
        self.targets.estimate_statistics(list(stats))
        self.history.append({"step": 0, "heldout_error": self.held_out_error()})

    def train(self, progress: TeacherProgress | None, show_progress: bool) -> None:
        """Train up to ``config.steps``; the held-out error and a checkpoint every ``checkpoint_every``."""
        steps, every = self.config.steps, self.config.checkpoint_every
        self.net.train()
        bar = tqdm(
            total=steps, initial=self.step, desc=f"distil PDN-{self.config.size}", disable=not show_progress
        )
        running = None
        while self.step < steps:
            for images in self.loader:
                if self.step >= steps:
                    break
                value = self._step(images)
                running = value if running is None else 0.95 * running + 0.05 * value
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}")
                if progress:
                    progress("distill", self.step, steps, {"loss": running})
                if self.step % every == 0 or self.step == steps:
                    # held-out error at every checkpoint (cheap: a few dozen held-out windows)
                    self.history.append(
                        {"step": self.step, "train_loss": running, "heldout_error": self.held_out_error()}
                    )
                    self.save_checkpoint()
        bar.close()

    def _step(self, images: torch.Tensor) -> float:
        crops, target = self.targets.split(images)
        loss = F.mse_loss(self.net(crops), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return float(loss.detach())

    # ------------------------------------------------------------------ result
    def write(self, started: float) -> TeacherInfo:
        """Save ``teacher.pth`` (anomalib's keys; adapter folded in) and ``provenance.json``."""
        final_error = self.held_out_error()
        config = self.config
        state = (
            folded_teacher_state(self.net, config.seed) if config.fold_adapter else self.net.pdn.state_dict()
        )
        torch.save(state, self.out / TEACHER_FILE)
        provenance = self.provenance(final_error, time.perf_counter() - started)
        (self.out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
        return TeacherInfo(config.size, "distilled", self.out / TEACHER_FILE, provenance)

    def provenance(self, final_error: float, seconds: float) -> dict[str, Any]:
        config, spec = self.config, backbones.get_spec(self.config.backbone)
        return {
            "kind": "efficientad-teacher",
            "size": config.size,
            "config": asdict(config),
            "fingerprint": self.fingerprint,
            "backbone": spec.timm_name,
            "backbone_weights": spec.weights_package,
            "targets": f"{self.targets.channels} channels: stride-{config.target_strides} features of the 2x"
            f"-upsampled crop plus {config.context} px context per side (centre cells kept), 3x3 averaged, "
            "standardised; 1x1 adapter 384 -> targets",
            "n_train_images": len(self.train_files),
            "n_heldout_images": len(self.held_files),
            "heldout_regression_error": final_error,
            "initial_heldout_regression_error": self.history[0].get("heldout_error")
            if self.history
            else math.nan,
            "history": self.history,
            "seconds_this_run": round(seconds, 1),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__,
        }
