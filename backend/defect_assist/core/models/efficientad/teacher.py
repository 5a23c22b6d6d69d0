"""EfficientAd teacher: distil a PDN from an offline ImageNet backbone, or use anomalib's official file.

EfficientAd's teacher is a patch description network (PDN, anomalib's ``Small``/``Medium
PatchDescriptionNetwork``) pretrained to regress the features of an ImageNet CNN on natural images.
anomalib downloads that teacher; offline we distil our own:

* **Targets.** The offline EfficientNet-Lite weights (``tf_efficientnet_lite0`` by default), run on
  the crop upsampled 2x (as the paper feeds 512 px to WideResNet-101 for a 256 px PDN input), so
  the backbone's stride-8 grid equals the PDN's stride-4 output grid. By default the stride-8 block
  (40 ch for Lite0; its receptive field matches the small PDN's) is regressed; ``target_strides="8+16"``
  adds the stride-16 block (112 ch, bilinearly upsampled). Features are locally averaged (3x3,
  PatchCore's aggregation) and standardised per channel (statistics from the distillation images).
* **Context.** The backbone sees the crop plus ``context`` pixels of image on every side and the
  targets are the centre cells, so small crops get the targets of the same region inside a whole
  image rather than features dominated by the backbone's zero padding.
* **Channel matching.** The PDN keeps anomalib's 384 output channels (so the weights load into
  anomalib unchanged); a learned 1x1 convolution (384 -> targets) maps its output onto the targets.
  After distillation it is folded into the PDN's last linear convolution (:func:`folded_teacher_state`),
  so all 384 outputs span the regressed target space.
* **Training.** Padded PDN (``padding=True``, as in the reference pretraining), random resized crops,
  flips, colour jitter and random grayscale (of the whole window); Adam with cosine decay; MSE.
  Seeded; a checkpoint every ``checkpoint_every`` steps makes an interrupted run resume where it
  stopped.
* **Quality.** Normalised regression error (MSE of standardised targets, 1.0 = predicting the mean)
  on held-out natural images (a fixed 10 % of the folder, chosen by file-name hash).

The result is cached under ``<MODEL_DIR>/_teachers/<name>/`` (``teacher.pth`` with anomalib's keys,
``provenance.json``, ``checkpoint.pt``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.models.image.efficient_ad.torch_model import (
    MediumPatchDescriptionNetwork,
    SmallPatchDescriptionNetwork,
)
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import v2

from defect_assist.core import backbones
from defect_assist.core.images import IMAGE_EXTENSIONS
from defect_assist.core.models.efficientad.distill_config import DistillConfig

logger = logging.getLogger(__name__)

TEACHER_FILE = "teacher.pth"
PROVENANCE_FILE = "provenance.json"
CHECKPOINT_FILE = "checkpoint.pt"
OUR_MARKER_SUFFIX = ".defect_assist.json"  # sidecar marking a teacher *we* installed for anomalib
TEACHER_OUT_CHANNELS = 384
SIZES = ("small", "medium")
TARGET_BLOCKS = {"8": 2, "16": 3}  # target stride -> timm feature index (EfficientNet-Lite)


def _parse_strides(strides: str) -> list[str]:
    parts = [p.strip() for p in str(strides).split("+") if p.strip()]
    if not parts or any(p not in TARGET_BLOCKS for p in parts):
        raise ValueError(f"target strides must be '8', '16' or '8+16', got {strides!r}")
    return parts


TeacherProgress = Callable[[str, int, int, dict[str, float]], None]  # (stage, done, total, metrics)


# --------------------------------------------------------------------------- locations
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


def build_pdn(size: str, padding: bool = False) -> nn.Module:
    """anomalib's PDN of ``size`` (small | medium) with 384 output channels."""
    if size == "small":
        return SmallPatchDescriptionNetwork(out_channels=TEACHER_OUT_CHANNELS, padding=padding)
    if size == "medium":
        return MediumPatchDescriptionNetwork(out_channels=TEACHER_OUT_CHANNELS, padding=padding)
    raise ValueError(f"teacher size must be one of {SIZES}, not {size!r}")


# --------------------------------------------------------------------------- configuration
@dataclass
class TeacherInfo:
    """A resolved teacher: its weights file, where it came from and what we know of its quality."""

    size: str
    source: str  # official | distilled | random | file
    path: Path | None
    provenance: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- data
def list_natural_images(folder: str | Path) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images under {folder}")
    return files


def split_holdout(files: list[Path], fraction: float) -> tuple[list[Path], list[Path]]:
    """Deterministic split by file-name hash (stable when files are added)."""

    def bucket(path: Path) -> float:
        return int(hashlib.sha256(path.name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    held = [p for p in files if bucket(p) < fraction]
    train = [p for p in files if bucket(p) >= fraction]
    if not train:
        train, held = files, []
    return train, held


class NaturalImages(torch.utils.data.Dataset):
    """Natural images as ``[0, 1]`` RGB crops; augmented for training, centre crops for evaluation."""

    def __init__(self, files: list[Path], crop_size: int, train: bool) -> None:
        """``crop_size`` here is the full window (PDN crop plus context on both sides)."""
        self.files = files
        if train:
            self.transform = v2.Compose(
                [
                    v2.RandomResizedCrop(crop_size, scale=(0.15, 1.0), antialias=True),
                    v2.RandomHorizontalFlip(),
                    v2.RandomApply([v2.ColorJitter(0.3, 0.3, 0.3, 0.05)], p=0.8),
                    v2.RandomGrayscale(p=0.2),
                ]
            )
        else:
            self.transform = v2.Compose([v2.Resize(crop_size, antialias=True), v2.CenterCrop(crop_size)])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
        return self.transform(tensor).float() / 255.0


# --------------------------------------------------------------------------- targets
class BackboneTargets(nn.Module):
    """Standardised, locally averaged stride-8 + stride-16 features of an offline ImageNet backbone.

    With ``context`` > 0 the backbone sees a window ``context`` pixels larger on every side than the
    PDN's crop and the targets are the window's centre cells (:meth:`split`): the backbone's large
    receptive field then sees real image content instead of zero padding at the crop borders, so the
    targets of a small crop equal those of the same region inside a whole image.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: bool = True,
        context: int = 0,
        strides: str = "8+16",
    ) -> None:
        super().__init__()
        import timm

        if context % 4:
            raise ValueError("context must be a multiple of 4 (the PDN's output stride)")
        self.context = context

        spec = backbones.get_spec(backbone)
        self.extractor = timm.create_model(
            spec.timm_name,
            features_only=True,
            out_indices=tuple(TARGET_BLOCKS[s] for s in _parse_strides(strides)),
            pretrained=False,
        )
        if pretrained:
            backbones.load_into(self.extractor, spec.timm_name)
        self.extractor.eval().requires_grad_(False)
        self.channels = int(sum(self.extractor.feature_info.channels()))
        self.register_buffer("in_mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("in_std", torch.tensor(spec.std).view(1, 3, 1, 1))
        self.register_buffer("mean", torch.zeros(1, self.channels, 1, 1))
        self.register_buffer("std", torch.ones(1, self.channels, 1, 1))

    @torch.no_grad()
    def raw(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` in [0, 1] at PDN resolution -> features on a grid of ``size / 4``."""
        x = F.interpolate(images, scale_factor=2.0, mode="bilinear", align_corners=False)
        grid = (x.shape[-2] // 8, x.shape[-1] // 8)  # the stride-8 grid = the PDN's stride-4 grid
        features = [F.avg_pool2d(f, 3, 1, 1) for f in self.extractor((x - self.in_mean) / self.in_std)]
        features = [
            f if f.shape[-2:] == grid else F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            for f in features
        ]
        return torch.cat(features, dim=1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.raw(images) - self.mean) / self.std

    def _centre(self, features: torch.Tensor) -> torch.Tensor:
        m = self.context // 4
        return features[..., m : features.shape[-2] - m, m : features.shape[-1] - m] if m else features

    @torch.no_grad()
    def split(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows (crop + context) -> (PDN input crops, standardised targets on the crops' output grid)."""
        c = self.context
        crops = windows[..., c : windows.shape[-2] - c, c : windows.shape[-1] - c] if c else windows
        return crops, self._centre(self(windows))

    @torch.no_grad()
    def estimate_statistics(self, batches: list[torch.Tensor]) -> None:
        feats = torch.cat(
            [self._centre(self.raw(b)).permute(0, 2, 3, 1).reshape(-1, self.channels) for b in batches]
        )
        self.mean.copy_(feats.mean(0).view(1, -1, 1, 1))
        self.std.copy_(feats.std(0).clamp_min(1e-6).view(1, -1, 1, 1))


class DistillationNet(nn.Module):
    """Padded PDN + learned 1x1 adapter onto the backbone's target channels."""

    def __init__(self, size: str, target_channels: int) -> None:
        super().__init__()
        self.pdn = build_pdn(size, padding=True)
        self.adapter = nn.Conv2d(TEACHER_OUT_CHANNELS, target_channels, kernel_size=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.pdn(images))


def folded_teacher_state(net: DistillationNet, seed: int = 0) -> dict[str, torch.Tensor]:
    """The PDN's state dict with the 1x1 adapter folded into its last (linear) convolution.

    The last layer becomes ``R @ adapter @ last`` with ``R`` (384 x targets) a seeded random matrix
    with orthonormal columns: the 384 outputs then span exactly the regressed target space (distances
    equal those of the adapter's predictions) instead of carrying the adapter's untrained null space.
    Same keys and shapes as anomalib's PDN.
    """
    state = {k: v.detach().clone() for k, v in net.pdn.state_dict().items()}
    last = "conv4" if isinstance(net.pdn, SmallPatchDescriptionNetwork) else "conv6"
    weight, bias = state[f"{last}.weight"].double(), state[f"{last}.bias"].double()
    adapter_w = net.adapter.weight.detach()[:, :, 0, 0].double()  # targets x 384
    adapter_b = net.adapter.bias.detach().double()
    generator = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(
        torch.randn(TEACHER_OUT_CHANNELS, adapter_w.shape[0], generator=generator, dtype=torch.float64)
    )
    mix = rotation @ adapter_w  # 384 x 384
    state[f"{last}.weight"] = torch.einsum("oc,cihw->oihw", mix, weight).float()
    state[f"{last}.bias"] = (rotation @ (adapter_w @ bias + adapter_b)).float()
    return state


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


def linear_probe_error(
    pdn: nn.Module,
    targets: BackboneTargets,
    train: torch.utils.data.DataLoader,
    held: torch.utils.data.DataLoader,
    ridge: float = 1e-3,
) -> float:
    """Held-out error of the best linear map (ridge least squares) from the PDN's 384 outputs to the targets.

    Comparable between a distilled and a randomly initialised PDN (the latter has no trained adapter).
    """

    def features(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        with torch.no_grad():
            for images in loader:
                crops, target = targets.split(images)
                xs.append(pdn(crops).permute(0, 2, 3, 1).reshape(-1, TEACHER_OUT_CHANNELS).double())
                ys.append(target.permute(0, 2, 3, 1).reshape(-1, targets.channels).double())
        return torch.cat(xs), torch.cat(ys)

    pdn.eval()
    x, y = features(train)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-8)
    xn = torch.cat([(x - mu) / sd, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    weights = torch.linalg.solve(xn.T @ xn + ridge * len(x) * torch.eye(xn.shape[1], dtype=x.dtype), xn.T @ y)
    xh, yh = features(held)
    xhn = torch.cat([(xh - mu) / sd, torch.ones(len(xh), 1, dtype=xh.dtype)], 1)
    return float(((xhn @ weights - yh) ** 2).mean())


# --------------------------------------------------------------------------- distillation
def _save_checkpoint(
    path: Path,
    step: int,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    targets: BackboneTargets,
    fingerprint: str,
    history: list[dict[str, float]],
) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "step": step,
            "fingerprint": fingerprint,
            "net": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "target_mean": targets.mean,
            "target_std": targets.std,
            "history": history,
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "numpy": np.random.get_state(),
            },
        },
        tmp,
    )
    tmp.replace(path)


def distill_teacher(
    config: DistillConfig,
    out_dir: str | Path,
    progress: TeacherProgress | None = None,
    resume: bool = True,
    show_progress: bool = True,
) -> TeacherInfo:
    """Distil (or resume distilling) a PDN teacher into ``out_dir``; returns where it was written."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = list_natural_images(config.data)
    train_files, held_files = split_holdout(files, config.holdout_fraction)
    fingerprint = config.fingerprint()
    started = time.perf_counter()

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    targets = BackboneTargets(config.backbone, context=config.context, strides=config.target_strides)
    window = config.crop_size + 2 * config.context
    net = DistillationNet(config.size, targets.channels)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / max(config.steps, 1))),
    )
    generator = torch.Generator().manual_seed(config.seed)
    train_set = NaturalImages(train_files, window, train=True)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        generator=generator,
        num_workers=0,
    )
    eval_loader = torch.utils.data.DataLoader(NaturalImages(held_files, window, train=False), batch_size=16)

    step, history = 0, []
    checkpoint_path = out / CHECKPOINT_FILE
    if resume and checkpoint_path.is_file():
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if checkpoint.get("fingerprint") == fingerprint:
            net.load_state_dict(checkpoint["net"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            targets.mean.copy_(checkpoint["target_mean"])
            targets.std.copy_(checkpoint["target_std"])
            torch.set_rng_state(checkpoint["rng"]["torch"])
            random.setstate(checkpoint["rng"]["python"])
            np.random.set_state(checkpoint["rng"]["numpy"])
            step, history = int(checkpoint["step"]), list(checkpoint["history"])
            logger.info("resuming teacher distillation at step %d", step)
        else:
            logger.warning("checkpoint in %s is for another configuration; starting over", out)
    if step == 0:
        stat_loader = torch.utils.data.DataLoader(
            NaturalImages(train_files[: config.stat_images], window, train=False), batch_size=16
        )
        targets.estimate_statistics(list(stat_loader))
        initial_error = regression_error(net, targets, eval_loader) if held_files else math.nan
        history.append({"step": 0, "heldout_error": initial_error})

    net.train()
    bar = tqdm(total=config.steps, initial=step, desc=f"distil PDN-{config.size}", disable=not show_progress)
    running = None
    while step < config.steps:
        for images in loader:
            if step >= config.steps:
                break
            crops, target = targets.split(images)
            loss = F.mse_loss(net(crops), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            value = float(loss.detach())
            running = value if running is None else 0.95 * running + 0.05 * value
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
            if progress:
                progress("distill", step, config.steps, {"loss": running})
            if step % config.checkpoint_every == 0 or step == config.steps:
                # held-out error at every checkpoint (cheap: a few dozen held-out windows)
                history.append(
                    {
                        "step": step,
                        "train_loss": running,
                        "heldout_error": regression_error(net, targets, eval_loader)
                        if held_files
                        else math.nan,
                    }
                )
                _save_checkpoint(
                    checkpoint_path, step, net, optimizer, scheduler, targets, fingerprint, history
                )
    bar.close()

    final_error = regression_error(net, targets, eval_loader) if held_files else math.nan
    teacher_state = folded_teacher_state(net, config.seed) if config.fold_adapter else net.pdn.state_dict()
    torch.save(teacher_state, out / TEACHER_FILE)
    provenance = {
        "kind": "efficientad-teacher",
        "size": config.size,
        "config": asdict(config),
        "fingerprint": fingerprint,
        "backbone": backbones.get_spec(config.backbone).timm_name,
        "backbone_weights": backbones.get_spec(config.backbone).weights_package,
        "targets": f"{targets.channels} channels: stride-{config.target_strides} features of the 2x-upsampled"
        f" crop plus {config.context} px context per side (centre cells kept), 3x3 averaged, standardised; "
        "1x1 adapter 384 -> targets",
        "n_train_images": len(train_files),
        "n_heldout_images": len(held_files),
        "heldout_regression_error": final_error,
        "initial_heldout_regression_error": history[0].get("heldout_error") if history else math.nan,
        "history": history,
        "seconds_this_run": round(time.perf_counter() - started, 1),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
    return TeacherInfo(config.size, "distilled", out / TEACHER_FILE, provenance)


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
    from defect_assist.core.settings import get_settings

    settings = get_settings()
    config = DistillConfig(
        size=size, data=str(data or settings.datasets_dir / "imagenet_sample"), **(distill_overrides or {})
    )
    folder = teacher_root(model_dir or settings.model_dir) / default_teacher_name(size, config.backbone)
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


def load_teacher_weights(pdn: nn.Module, info: TeacherInfo) -> None:
    """Strictly load the teacher's state dict into ``pdn`` (anomalib's keys; padding does not change them)."""
    if info.path is None:
        return
    pdn.load_state_dict(torch.load(info.path, map_location="cpu", weights_only=True), strict=True)
