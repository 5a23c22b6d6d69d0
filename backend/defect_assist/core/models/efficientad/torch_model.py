"""anomalib 2.7's EfficientAd network and training step, fed offline.

The network, the losses (hard student-teacher loss + ImageNet penalty, autoencoder loss,
student-autoencoder loss), the teacher channel statistics and the map-normalisation quantiles are
anomalib's (:class:`anomalib.models.image.efficient_ad.torch_model.EfficientAdModel` and the logic
of its Lightning module). What differs: the teacher comes from :mod:`.teacher` (official file,
distilled, or random), and the penalty images from a local ``ImageFolder`` (no imagenette
download). Training batch size is 1, as in the paper and anomalib.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from anomalib.models.image.efficient_ad.torch_model import (
    AutoEncoder,
    EfficientAdModel,
    EfficientAdModelSize,
    reduce_tensor_elems,
)
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms.v2 import CenterCrop, Compose, RandomGrayscale, Resize, ToDtype, ToImage

from defect_assist.core.models.efficientad.teacher import (
    TEACHER_OUT_CHANNELS,
    TeacherInfo,
    load_teacher_weights,
)

AE_MIN_INPUT = 256  # the encoder's five stride-2 convolutions and final 8x8 kernel need >= 256 px


class ResizingAutoEncoder(AutoEncoder):
    """anomalib's autoencoder, its *input* upsampled to 256 px when smaller (same weights and keys).

    The decoder still targets the PDN output grid of ``image_size``, so EfficientAd runs at 128-224 px
    (the CPU schedule); at >= 256 px it is exactly anomalib's autoencoder.
    """

    def forward(self, x: torch.Tensor, image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        if min(x.shape[-2:]) < AE_MIN_INPUT:
            x = F.interpolate(x, size=(AE_MIN_INPUT, AE_MIN_INPUT), mode="bilinear", align_corners=False)
        return super().forward(x, image_size)


MAP_BORDERS = ("replicate", "zeros")
PDN_MAP_MARGIN = 4  # cells the unpadded PDN's output grid lacks on each side (stride 4: 16 px)


class OfflineEfficientAdModel(EfficientAdModel):
    """anomalib's EfficientAd network; how the map is extended over the image border is a choice.

    Without PDN padding the output grid misses ``PDN_MAP_MARGIN`` cells on every side. anomalib pads
    them with zeros (``map_border="zeros"``): a zero distance, i.e. "certainly normal", so a defect
    touching the image border (tile breaks, edge bands) cannot score there. At 128 px that margin is
    16 px of every side, a quarter of the image. ``"replicate"`` (our default) extends the nearest
    computed cell instead. Weights, losses and training are unchanged.
    """

    def __init__(self, *args: object, map_border: str = "replicate", **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        if map_border not in MAP_BORDERS:
            raise ValueError(f"map_border must be one of {MAP_BORDERS}; got {map_border!r}")
        self.map_border = map_border

    def compute_maps(
        self,
        batch: torch.Tensor,
        student_output: torch.Tensor,
        distance_st: torch.Tensor,
        normalize: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Student-teacher and student-autoencoder maps at ``batch``'s size, normalised by the quantiles."""
        if self.map_border == "zeros" or not self.pad_maps:
            return super().compute_maps(batch, student_output, distance_st, normalize)
        image_size = batch.shape[-2:]
        with torch.no_grad():
            ae_output = self.ae(batch, image_size)
            grid_st = distance_st.mean(dim=1, keepdim=True)
            student_ae = student_output[:, self.teacher_out_channels :]
            grid_stae = (ae_output - student_ae).pow(2).mean(dim=1, keepdim=True)
        margin = (PDN_MAP_MARGIN,) * 4
        map_st, map_stae = (
            F.interpolate(F.pad(grid, margin, mode="replicate"), size=image_size, mode="bilinear")
            for grid in (grid_st, grid_stae)
        )
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


class PenaltyImages:
    """Endless batch-1 stream of natural images from a local ``ImageFolder`` (anomalib's transforms)."""

    def __init__(self, folder: str | Path, image_size: int, seed: int = 0) -> None:
        if not Path(folder).is_dir():
            raise FileNotFoundError(
                f"penalty image folder {folder} not found (one sub-folder per class, as ImageNet)"
            )
        transform = Compose(
            [
                ToImage(),
                Resize((image_size * 2, image_size * 2), antialias=True),
                RandomGrayscale(p=0.3),
                CenterCrop((image_size, image_size)),
                ToDtype(torch.float32, scale=True),
            ]
        )
        self.dataset = ImageFolder(str(folder), transform=transform)
        self.generator = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(self.dataset, batch_size=1, shuffle=True, generator=self.generator)
        self._iterator: Iterator = iter(self.loader)

    def __len__(self) -> int:
        return len(self.dataset)

    def next(self) -> torch.Tensor:
        try:
            return next(self._iterator)[0]
        except StopIteration:
            self._iterator = iter(self.loader)
            return next(self._iterator)[0]


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


@torch.no_grad()
def validation_loss(model: EfficientAdModel, images: list[torch.Tensor]) -> float:
    """Early-stopping signal on held-out normals: mean ST + AE-teacher + ST-AE squared distances."""
    was_training = model.training
    model.eval()
    c = model.teacher_out_channels
    total = 0.0
    for image in images:
        teacher = model._normalize_teacher(model.teacher(image))
        student = model.student(image)
        ae = model.ae(image, image.shape[-2:])
        total += float(
            ((teacher - student[:, :c]) ** 2).mean()
            + ((teacher - ae) ** 2).mean()
            + ((ae - student[:, c:]) ** 2).mean()
        )
    model.train(was_training)
    return total / max(len(images), 1)
