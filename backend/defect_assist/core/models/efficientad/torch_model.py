"""anomalib 2.7's EfficientAd network, fed offline (no Lightning here).

The network, the losses (hard student-teacher loss + ImageNet penalty, autoencoder loss,
student-autoencoder loss), the teacher channel statistics and the map-normalisation quantiles are
anomalib's (:class:`anomalib.models.image.efficient_ad.torch_model.EfficientAdModel` and the logic
of its Lightning module). What differs: the teacher comes from :mod:`.teacher` (official file,
distilled, or random), the autoencoder accepts inputs below 256 px (:class:`ResizingAutoEncoder`),
and how the maps cover the image border is a choice (:mod:`.anomaly_map`). Training batch size is
1, as in the paper and anomalib.
"""

from __future__ import annotations

import torch
from anomalib.models.image.efficient_ad.torch_model import (
    AutoEncoder,
    EfficientAdModel,
    EfficientAdModelSize,
    reduce_tensor_elems,
)
from torch.nn import functional as F

from defect_assist.core.models.efficientad.anomaly_map import PDN_MAP_MARGIN, AnomalyMapGenerator
from defect_assist.core.models.efficientad.teacher.network import TEACHER_OUT_CHANNELS
from defect_assist.core.models.efficientad.teacher.paths import TeacherInfo
from defect_assist.core.models.efficientad.teacher.resolve import load_teacher_weights

AE_MIN_INPUT = 256  # the encoder's five stride-2 convolutions and final 8x8 kernel need >= 256 px


class ResizingAutoEncoder(AutoEncoder):
    """anomalib's autoencoder, its *input* upsampled to 256 px when smaller (same weights and keys).

    The decoder still targets the PDN output grid of ``image_size``, so EfficientAd runs at 128-224 px
    (the CPU schedule); at >= 256 px it is exactly anomalib's autoencoder.
    """

    def forward(self, x: torch.Tensor, image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        if x.dim() == 3:  # anomalib's Lightning module computes the map quantiles image by image
            x = x[None]  # (anomalib's ImageNet normalisation broadcasts such an image to a batch of 1)
        if min(x.shape[-2:]) < AE_MIN_INPUT:
            x = F.interpolate(x, size=(AE_MIN_INPUT, AE_MIN_INPUT), mode="bilinear", align_corners=False)
        return super().forward(x, image_size)


class OfflineEfficientAdModel(EfficientAdModel):
    """anomalib's EfficientAd network; its maps cover the image border as ``map_border`` says.

    Weights, losses and training are anomalib's; ``map_border="zeros"`` is anomalib's map too.
    """

    def __init__(self, *args: object, map_border: str = "replicate", **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        margin = PDN_MAP_MARGIN if self.pad_maps else 0
        self.anomaly_map_generator = AnomalyMapGenerator(border=map_border, margin=margin)

    @property
    def map_border(self) -> str:
        return self.anomaly_map_generator.border

    def compute_maps(
        self,
        batch: torch.Tensor,
        student_output: torch.Tensor,
        distance_st: torch.Tensor,
        normalize: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Student-teacher and student-autoencoder maps at ``batch``'s size, normalised by the quantiles."""
        image_size = batch.shape[-2:]
        with torch.no_grad():
            ae_output = self.ae(batch, image_size)
            grid_st = distance_st.mean(dim=1, keepdim=True)
            student_ae = student_output[:, self.teacher_out_channels :]
            grid_stae = (ae_output - student_ae).pow(2).mean(dim=1, keepdim=True)
        map_st = self.anomaly_map_generator(grid_st, image_size)
        map_stae = self.anomaly_map_generator(grid_stae, image_size)
        if normalize and self.is_set(self.quantiles):
            q = self.quantiles
            map_st = 0.1 * (map_st - q["qa_st"]) / (q["qb_st"] - q["qa_st"])
            map_stae = 0.1 * (map_stae - q["qa_ae"]) / (q["qb_ae"] - q["qa_ae"])
        return map_st, map_stae


def build_model(
    size: str,
    teacher: TeacherInfo | None,
    padding: bool = False,
    pad_maps: bool = True,
    map_border: str = "replicate",
) -> OfflineEfficientAdModel:
    """anomalib's EfficientAd model with ``teacher``'s weights (random init when ``None`` or ``random``)."""
    model = OfflineEfficientAdModel(
        teacher_out_channels=TEACHER_OUT_CHANNELS,
        model_size=EfficientAdModelSize(size),
        padding=padding,
        # anomalib documents pad_maps as "only relevant if padding=False" but pads regardless; a padded
        # PDN's grid already covers the image, so the margin exists only without padding.
        pad_maps=pad_maps and not padding,
        map_border=map_border,
    )
    model.ae = ResizingAutoEncoder(out_channels=TEACHER_OUT_CHANNELS, padding=padding)
    if teacher is not None:
        load_teacher_weights(model.teacher, teacher)
    model.teacher.eval().requires_grad_(False)
    return model


@torch.no_grad()
def teacher_channel_mean_std(model: EfficientAdModel, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Channel mean/std of the teacher's outputs over the training images (anomalib's computation)."""
    n, total, total_sq = 0, None, None
    for image in images:
        y = model.teacher(image)
        total = torch.sum(y, dim=[0, 2, 3]) if total is None else total + torch.sum(y, dim=[0, 2, 3])
        total_sq = (
            torch.sum(y**2, dim=[0, 2, 3]) if total_sq is None else total_sq + torch.sum(y**2, dim=[0, 2, 3])
        )
        n += y[:, 0].numel()
    assert total is not None and total_sq is not None
    mean = total / n
    std = torch.sqrt(total_sq / n - mean**2)
    return {"mean": mean.float()[None, :, None, None], "std": std.float()[None, :, None, None]}


@torch.no_grad()
def map_norm_quantiles(model: EfficientAdModel, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """0.9 / 0.995 quantiles of the student-teacher and student-autoencoder maps on normal images."""
    maps_st, maps_ae = [], []
    for image in images:
        map_st, map_ae = model.get_maps(image, normalize=False)
        maps_st.append(map_st)
        maps_ae.append(map_ae)
    st, ae = reduce_tensor_elems(torch.cat(maps_st)), reduce_tensor_elems(torch.cat(maps_ae))
    return {
        "qa_st": torch.quantile(st, 0.9),
        "qb_st": torch.quantile(st, 0.995),
        "qa_ae": torch.quantile(ae, 0.9),
        "qb_ae": torch.quantile(ae, 0.995),
    }
