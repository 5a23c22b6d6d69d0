"""The teacher network: anomalib's PDN, the distillation adapter, and folding the adapter into the PDN."""

from __future__ import annotations

import torch
from anomalib.models.image.efficient_ad.torch_model import (
    MediumPatchDescriptionNetwork,
    SmallPatchDescriptionNetwork,
)
from torch import nn

TEACHER_OUT_CHANNELS = 384
SIZES = ("small", "medium")


def build_pdn(size: str, padding: bool = False) -> nn.Module:
    """anomalib's PDN of ``size`` (small | medium) with 384 output channels."""
    if size == "small":
        return SmallPatchDescriptionNetwork(out_channels=TEACHER_OUT_CHANNELS, padding=padding)
    if size == "medium":
        return MediumPatchDescriptionNetwork(out_channels=TEACHER_OUT_CHANNELS, padding=padding)
    raise ValueError(f"teacher size must be one of {SIZES}, not {size!r}")


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
