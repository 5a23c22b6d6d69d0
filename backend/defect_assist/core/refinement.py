"""Learning from annotators' corrections: a small per-patch defect head on top of an anomaly model.

The unsupervised map says where an image differs from the normals; annotators' corrected masks say
which differences are defects and where their edges are. :class:`DefectHead` is a logistic regression
per patch on the model's patch inputs (for PatchCore: the memory-bank features, the patch score and
the score relative to the image's peak), trained on

* positives: patches of corrected defect images whose area is at least ``POSITIVE_SHARE`` defect;
* negatives: the other patches of those images and every patch of normal images;

classes balanced, features standardised. Its probability map replaces the model's mask map and its
threshold (chosen for mean Dice on the corrected images themselves) the mask rule's floor.

:class:`CutMemory` learns something simpler that carries over between images of one kind of defect:
for each corrected image the share of the peak (the mask rule's ``relative``) that reproduces its
mask best, keyed by a descriptor of its defect (the patch features pooled with weights on the most
anomalous patches). A served image takes the cut of the corrected defect it resembles most, so a
diffuse defect gets a wide cut and a small hole a tight one, whatever the annotators' mix.

:func:`choose_masks` serves whichever of the tuned rule, the cut memory and the head has the best
Dice on corrected images it was not fitted on. The verdict always comes from the model's calibrated
score (its threshold may come from the labels too: ``core.labeled_calibration``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from defect_assist.core.mask_rule import MaskRule
from defect_assist.core.served_metrics import dice_iou

POSITIVE_SHARE = 0.3
MIN_CORRECTED = 3
THRESHOLDS = np.round(np.arange(0.3, 0.96, 0.05), 2)
RELATIVE_CUTS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8)
DESCRIPTOR_SHARPNESS = 2.0  # softmax weight of a patch: exp(sharpness · score / std of the image's scores)


@dataclass
class Corrections:
    """Patch inputs and defect shares of the training images, and what scoring the threshold needs."""

    inputs: list[torch.Tensor]  # per image (C, h, w)
    shares: list[torch.Tensor]  # per image (h, w): share of the patch that is defect
    truths: list[np.ndarray]  # per corrected defect image: its mask on the model grid of the image area
    areas: list[tuple[int, int, int, int]]  # per corrected defect image: top, left, height, width
    mask_maps: list[np.ndarray] = field(default_factory=list)  # per corrected image: the model's mask map
    descriptors: list[torch.Tensor] = field(default_factory=list)  # per corrected image: defect descriptor

    def subset(self, chosen: list[int]) -> Corrections:
        """The corrected images ``chosen`` (indices) with every normal image."""
        n = len(self.truths)
        keep = [*chosen, *range(n, len(self.inputs))]
        return Corrections(
            [self.inputs[i] for i in keep],
            [self.shares[i] for i in keep],
            [self.truths[i] for i in chosen],
            [self.areas[i] for i in chosen],
            [self.mask_maps[i] for i in chosen] if self.mask_maps else [],
            [self.descriptors[i] for i in chosen] if self.descriptors else [],
        )


class DefectHead:
    """Logistic regression per patch: defect probability from the model's patch inputs."""

    def __init__(
        self, weight: torch.Tensor, bias: float, mean: torch.Tensor, std: torch.Tensor, threshold: float = 0.5
    ) -> None:
        self.weight, self.bias, self.mean, self.std = weight, float(bias), mean, std
        self.threshold = float(threshold)
        self.base = 0.0
        self.n_images = 0

    # ---------------------------------------------------------------- training
    @classmethod
    def fit(cls, corrections: Corrections, size: int, c: float = 0.1) -> DefectHead:
        """Train on ``corrections`` (model input ``size``), then choose the probability threshold."""
        from sklearn.linear_model import LogisticRegression

        x = torch.cat([i.flatten(1).T for i in corrections.inputs]).float()
        y = torch.cat([s.flatten() for s in corrections.shares]) >= POSITIVE_SHARE
        if not y.any() or y.all():
            raise ValueError("corrections need both defect and normal patches")
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        regression = LogisticRegression(C=c, class_weight="balanced", max_iter=500)
        regression.fit(((x - mean) / std).numpy(), y.numpy())
        head = cls(torch.from_numpy(regression.coef_[0]).float(), regression.intercept_[0], mean, std)
        head.threshold = head._best_threshold(corrections, size)
        normal = corrections.inputs[len(corrections.truths) :]
        probs = [head.probabilities(i[None]).flatten() for i in normal]
        head.base = float(torch.cat(probs).median()) if probs else 0.0
        head.n_images = len(corrections.truths)
        return head

    def dice(self, corrections: Corrections, size: int) -> float:
        """Mean Dice of this head's masks on the corrected images of ``corrections``."""
        maps = [
            self.upsampled(self.probabilities(i[None]), size)[0]
            for i in corrections.inputs[: len(corrections.truths)]
        ]
        return float(
            np.mean(
                [
                    dice_iou(m[top : top + h, left : left + w].numpy() > self.threshold, truth)[0]
                    for m, truth, (top, left, h, w) in zip(
                        maps, corrections.truths, corrections.areas, strict=True
                    )
                ]
            )
        )

    def _best_threshold(self, corrections: Corrections, size: int) -> float:
        maps = [
            self.upsampled(self.probabilities(i[None]), size)[0]
            for i in corrections.inputs[: len(corrections.truths)]
        ]
        best, best_dice = 0.5, -1.0
        for threshold in THRESHOLDS:
            dice = np.mean(
                [
                    dice_iou(m[top : top + h, left : left + w].numpy() > threshold, truth)[0]
                    for m, truth, (top, left, h, w) in zip(
                        maps, corrections.truths, corrections.areas, strict=True
                    )
                ]
            )
            if dice > best_dice:
                best, best_dice = float(threshold), float(dice)
        return best

    # ---------------------------------------------------------------- inference
    def probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        """Defect probability ``(B, h, w)`` of patch inputs ``(B, C, h, w)``."""
        batch, channels, height, width = inputs.shape
        flat = (
            inputs.float().permute(0, 2, 3, 1).reshape(-1, channels) - self.mean.to(inputs.device)
        ) / self.std.to(inputs.device)
        logits = flat @ self.weight.to(inputs.device) + self.bias
        return torch.sigmoid(logits).reshape(batch, height, width)

    @staticmethod
    def upsampled(probabilities: torch.Tensor, size: int) -> torch.Tensor:
        """``(B, h, w)`` probabilities bilinearly resized to the model input ``(B, size, size)``."""
        return F.interpolate(probabilities[:, None], size=(size, size), mode="bilinear", align_corners=False)[
            :, 0
        ]

    @property
    def rule(self) -> MaskRule:
        """The mask rule on the probability map: above the chosen threshold (or the peak's region)."""
        return MaskRule(floor=self.threshold, base=self.base, relative=0.0)

    # ---------------------------------------------------------------- persistence
    def state(self) -> dict[str, Any]:
        return {
            "weight": self.weight,
            "bias": self.bias,
            "mean": self.mean,
            "std": self.std,
            "threshold": self.threshold,
            "base": self.base,
            "n_images": self.n_images,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DefectHead:
        head = cls(state["weight"], state["bias"], state["mean"], state["std"], state["threshold"])
        head.base, head.n_images = float(state["base"]), int(state["n_images"])
        return head


def defect_descriptors(inputs: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, D)`` L2-normalised descriptors of each image's defect from patch inputs ``(B, D + 2, h, w)``
    (features, patch score, score / peak): the features averaged with softmax weights on the patch
    scores, so the most anomalous patches (inside the image area ``valid``, ``B x H x W``) dominate."""
    features, scores = inputs[:, :-2].float().flatten(2), inputs[:, -2].float().flatten(1)
    inside = torch.ones_like(scores, dtype=torch.bool)
    if valid is not None:
        inside = F.adaptive_max_pool2d(valid[:, None].float(), inputs.shape[-2:]).flatten(1) > 0
    count = inside.sum(1, keepdim=True).clamp_min(1)
    mean = (scores * inside).sum(1, keepdim=True) / count
    spread = (((scores - mean) ** 2 * inside).sum(1, keepdim=True) / count).sqrt().clamp_min(1e-6)
    peak = scores.masked_fill(~inside, -torch.inf).max(1, keepdim=True).values
    logits = (DESCRIPTOR_SHARPNESS * (scores - peak) / spread).masked_fill(~inside, -torch.inf)
    weights = torch.softmax(logits, 1)
    return F.normalize(torch.einsum("bn,bdn->bd", weights, features), dim=1)


@dataclass
class CutMemory:
    """Per corrected defect image: its descriptor and the relative cut that reproduces its mask best."""

    descriptors: torch.Tensor  # (M, D), L2-normalised
    relatives: torch.Tensor  # (M,)

    def relatives_for(self, descriptors: torch.Tensor) -> list[float]:
        """The cut of the most similar corrected defect for each descriptor ``(B, D)``."""
        nearest = (descriptors.float().cpu() @ self.descriptors.T).argmax(1)
        return [float(self.relatives[i]) for i in nearest]

    def state(self) -> dict[str, Any]:
        return {"descriptors": self.descriptors, "relatives": self.relatives}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CutMemory:
        return cls(state["descriptors"].float(), state["relatives"].float())


def patch_shares(
    mask: np.ndarray, top: int, left: int, height: int, width: int, size: int, grid: int
) -> torch.Tensor:
    """The share of each patch of the ``size`` px model input that the image's defect ``mask`` covers."""
    canvas = torch.zeros(1, 1, size, size)
    region = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=(height, width))
    canvas[..., top : top + height, left : left + width] = region
    return F.adaptive_avg_pool2d(canvas, grid)[0, 0]


def learn_from_corrections(
    model: Any, defects: list[tuple[Any, np.ndarray]], normals: list[Any], batch_size: int = 8
) -> LearnedMasks:
    """Learn the served masks of ``model`` from corrected defect images and normal images.

    ``defects``: (image source, ``HxW`` bool mask at the image's size) pairs; ``normals``: image
    sources. Raises ``ValueError`` with fewer than ``MIN_CORRECTED`` usable defect images.
    """
    size = model.image_size
    corrections = Corrections([], [], [], [])
    sources = [source for source, _ in defects] + list(normals)
    masks: list[np.ndarray | None] = [mask for _, mask in defects] + [None] * len(normals)
    for start in range(0, len(sources), batch_size):
        loaded = model.load_batch(sources[start : start + batch_size], start)
        if loaded.tensor is None:
            continue
        tensor, valid = loaded.tensor.to(model.device), loaded.valid_mask(size, model.device)
        _, _, mask_maps_t, inputs = model._infer_with_patch_inputs(tensor, valid)
        mask_maps = mask_maps_t.float().cpu().numpy()
        descriptors = defect_descriptors(inputs, valid).cpu()
        for j, index in enumerate(loaded.indices):
            p, mask = loaded.placements[j], masks[index]
            grid = inputs.shape[-1]
            if mask is None:
                corrections.inputs.append(inputs[j].cpu())
                corrections.shares.append(torch.zeros(grid, grid))
                continue
            if mask.shape != (p.original_height, p.original_width) or not mask.any():
                continue
            shares = patch_shares(mask, p.top, p.left, p.height, p.width, size, grid)
            truth = F.interpolate(
                torch.from_numpy(mask.astype(np.float32))[None, None], size=(p.height, p.width)
            )
            corrections.inputs.insert(len(corrections.truths), inputs[j].cpu())
            corrections.shares.insert(len(corrections.truths), shares)
            corrections.areas.append((p.top, p.left, p.height, p.width))
            corrections.truths.append(truth[0, 0].numpy() > 0.5)
            corrections.mask_maps.append(mask_maps[j, p.top : p.top + p.height, p.left : p.left + p.width])
            corrections.descriptors.append(descriptors[j])
    if len(corrections.truths) < MIN_CORRECTED:
        raise ValueError(
            f"need at least {MIN_CORRECTED} corrected defect images, got {len(corrections.truths)}"
        )
    return choose_masks(corrections, model.calibration.mask_rule(), size)


@dataclass
class LearnedMasks:
    """What the corrections taught, and which of it is served (the best on images it was not fitted on)."""

    relative: float | None  # the unsupervised rule's share of the peak that fits the corrections best
    head: DefectHead | None  # served instead of the rule only when it wins on held-out corrected images
    rule_dice: float  # the tuned rule, leave-one-out (the cut chosen on the other corrected images)
    head_dice: float | None  # the head, 2-fold cross-validated
    cuts: CutMemory | None = None  # served when it wins: each image takes its nearest corrected cut
    cuts_dice: float | None = None  # the cut memory, leave-one-out

    @property
    def n_images(self) -> int | None:
        """Corrected images behind what is served (``None`` for the rule)."""
        return self.head.n_images if self.head else len(self.cuts.relatives) if self.cuts else None

    @property
    def served(self) -> str:
        return "defect head" if self.head else "nearest corrected cut" if self.cuts else "mask rule"

    def info(self) -> dict[str, Any]:
        return {
            "served": self.served,
            "mask_relative": self.relative,
            "rule_dice_on_corrections": round(self.rule_dice, 4),
            "cuts_dice_leave_one_out": None if self.cuts_dice is None else round(self.cuts_dice, 4),
            "head_dice_cross_validated": None if self.head_dice is None else round(self.head_dice, 4),
            "n_defect_images": self.n_images,
            "threshold": self.head.threshold if self.head else None,
        }


def _cut_dices(corrections: Corrections, rule: MaskRule) -> np.ndarray:
    """Dice ``(images, cuts)`` of the rule at each of ``RELATIVE_CUTS`` on each corrected image."""
    return np.array(
        [
            [dice_iou(replace(rule, relative=a).apply(m, True), t)[0] for a in RELATIVE_CUTS]
            for m, t in zip(corrections.mask_maps, corrections.truths, strict=True)
        ]
    )


def choose_masks(corrections: Corrections, rule: MaskRule | None, size: int) -> LearnedMasks:
    """Tune the rule's relative cut, build the cut memory and fit the head on the corrected images;
    serve the one with the best Dice on corrected images it was not fitted on (leave-one-out for the
    rule and the memory, 2-fold for the head): a head from a few images can do worse than no head."""
    relative, rule_dice, cuts, cuts_dice = None, 0.0, None, None
    n = len(corrections.truths)
    if rule is not None:
        dices = _cut_dices(corrections, rule)
        relative = RELATIVE_CUTS[int(dices.mean(0).argmax())]
        others = [np.delete(dices, j, axis=0).mean(0).argmax() for j in range(n)]
        rule_dice = float(np.mean([dices[j, others[j]] for j in range(n)]))
        if len(corrections.descriptors) == n > 1:
            descriptors = torch.stack(corrections.descriptors).float()
            similarity = descriptors @ descriptors.T
            similarity.fill_diagonal_(-torch.inf)
            nearest = similarity.argmax(1).numpy()
            own = dices.argmax(1)
            cuts_dice = float(np.mean([dices[j, own[nearest[j]]] for j in range(n)]))
            relatives = torch.tensor([RELATIVE_CUTS[i] for i in own], dtype=torch.float32)
            cuts = CutMemory(descriptors, relatives) if cuts_dice > rule_dice else None
    folds = [list(range(0, n, 2)), list(range(1, n, 2))]
    try:
        held = [
            DefectHead.fit(corrections.subset(a), size).dice(corrections.subset(b), size)
            for a, b in (folds, folds[::-1])
        ]
    except ValueError:  # a fold without defect patches
        return LearnedMasks(relative, None, rule_dice, None, cuts, cuts_dice)
    head_dice = float(np.average(held, weights=[len(folds[1]), len(folds[0])]))
    best_other = max(rule_dice, cuts_dice or 0.0)
    if head_dice > best_other or rule is None:
        head = DefectHead.fit(corrections, size)
        return LearnedMasks(relative, head, rule_dice, head_dice, None, cuts_dice)
    return LearnedMasks(relative, None, rule_dice, head_dice, cuts, cuts_dice)
