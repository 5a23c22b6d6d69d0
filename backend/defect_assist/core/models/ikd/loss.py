"""IKD's losses: adaptive hard sample mining (AHSM) and the context similarity loss (CSL).

Both act on one feature level at a time, on channel-L2-normalised features ``f̂ = f / ||f||₂`` of the
teacher (``t``) and the student (``s``), shape ``(B, C, H, W)``. The per-pixel discrepancy is

    d(b, p) = ½ ||f̂_t(b, p) − f̂_s(b, p)||²₂ = 1 − cos(f_t(b, p), f_s(b, p))        (1)

(STPM's distillation loss, which IKD builds on). The training loss sums over the levels ``l``:

    L = Σ_l [ L_AHSM(d_l) + λ · L_CSL(f̂_t,l, f̂_s,l) ]                                 (4)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F


def discrepancy(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Eq. (1): ``1 − cos`` between teacher and student features per pixel, ``(B, C, H, W) -> (B, H, W)``."""
    return 1.0 - F.cosine_similarity(teacher, student, dim=1, eps=1e-8)


def ahsm_loss(distances: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """Adaptive hard sample mining: the mean discrepancy of the batch's hard pixels.

    With ``μ`` and ``σ`` the mean and (population) standard deviation of all discrepancies ``d_i``
    of the batch at this level, taken without gradient so the threshold follows training::

        H = { i : d_i ≥ μ + α σ },     L_AHSM = (1 / |H|) Σ_{i ∈ H} d_i                 (2)

    Easy pixels (already imitated) drop out, so the gradient concentrates on the pixels with the
    most knowledge left to learn; the threshold adapts as the discrepancies shrink. ``H`` always
    holds the largest ``d_i`` (for ``α ≥ 0`` and ``σ`` computed over the same values).
    """
    flat = distances.reshape(-1)
    with torch.no_grad():
        threshold = flat.mean() + alpha * flat.std(unbiased=False)
        hard = flat >= threshold
        if not bool(hard.any()):  # rounding: keep the hardest pixel
            hard = flat == flat.max()
    return flat[hard].mean()


def context_similarity(features: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities between the batch's samples at every position, ``(H·W, B, B)``.

    ``S_p[i, j] = ⟨f̂(i, p), f̂(j, p)⟩`` for samples ``i, j`` of the batch and position ``p``.
    """
    normalised = F.normalize(features, dim=1, eps=1e-8).flatten(2).permute(2, 0, 1)  # (P, B, C)
    return normalised @ normalised.transpose(1, 2)


def csl_loss(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Context similarity loss: the student reproduces the teacher's similarity structure of the batch.

    With ``S^t_p`` and ``S^s_p`` the :func:`context_similarity` matrices of the teacher and the
    student at position ``p`` (``P`` positions, ``B`` samples)::

        L_CSL = 1 / (P B²) Σ_p Σ_{i,j} ( S^t_p[i, j] − S^s_p[i, j] )²                   (3)

    Pixel-wise distillation (1) only ties each student feature to its own teacher feature; (3) also
    makes the student place normal features relative to each other as the teacher does, i.e.
    distils the context of the normal-data manifold. Zero for a batch of one.
    """
    return (context_similarity(teacher) - context_similarity(student)).pow(2).mean()


class IkdLoss(torch.nn.Module):
    """Eq. (4) over the feature levels; ``last`` keeps the terms of the latest call for logging."""

    def __init__(self, csl_weight: float = 1.0, ahsm_alpha: float = 0.0) -> None:
        super().__init__()
        self.csl_weight = float(csl_weight)
        self.ahsm_alpha = float(ahsm_alpha)
        self.last: dict[str, float] = {}

    def forward(self, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
        pairs = list(zip(teacher, student, strict=True))
        ahsm = torch.stack([ahsm_loss(discrepancy(t, s), self.ahsm_alpha) for t, s in pairs]).sum()
        csl = torch.stack([csl_loss(t, s) for t, s in pairs]).sum()
        self.last = {"ahsm": float(ahsm.detach()), "csl": float(csl.detach())}
        return ahsm + self.csl_weight * csl
