"""CFA's loss (anomalib's :class:`~anomalib.models.image.cfa.loss.CfaLoss`) and the validation loss.

anomalib's loss on the squared distances ``D`` of every patch feature to the memory bank, sorted
ascending, with radius ``r``, ``K`` nearest neighbours and ``J`` hard negatives::

    L_att = mean( max(0, D[:, :, :K] − r²) )
    L_rep = mean( max(0, r² − D[:, :, J:K+J] − 0.1) )        # anomalib slices D[:, :, J:]
    L = 1000 · (L_att + L_rep)
"""

from __future__ import annotations

import torch
from anomalib.models.image.cfa.loss import CfaLoss

__all__ = ["CfaLoss", "validation_loss"]


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, loss: CfaLoss, features: list[torch.Tensor], batch_size: int
) -> float:
    """Mean :class:`CfaLoss` of held-out normals' cached patch features (early-stopping signal)."""
    total, count = 0.0, 0
    for start in range(0, len(features), batch_size):
        batch = torch.cat(features[start : start + batch_size]).float()
        distance = model.compute_distance(model.descriptor.layer(batch))
        total += float(loss(distance)) * len(batch)
        count += len(batch)
    return total / max(count, 1)
