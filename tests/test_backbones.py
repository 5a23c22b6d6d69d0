"""The offline ImageNet weights are really loaded: classification far above chance."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from defect_assist.core import backbones
from defect_assist.core.images import load_image

pytestmark = pytest.mark.unit


def _imagenet_batch(root: Path, size: int, mean, std, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize-256/centre-crop-224 style preprocessing; labels from the sorted synset folders."""
    from PIL import Image

    synsets = sorted(p.name for p in root.iterdir() if p.is_dir())
    # imagenet_sample holds every 4th class: index in the full 1000-class list is 4 * position.
    images, labels = [], []
    for position, synset in enumerate(synsets[::step]):
        path = next((root / synset).iterdir())
        image = Image.fromarray(load_image(path))
        scale = int(size / 0.875) / min(image.size)
        image = image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC
        )
        left, top = (image.width - size) // 2, (image.height - size) // 2
        images.append(np.asarray(image.crop((left, top, left + size, top + size))))
        labels.append(4 * position * step)
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    tensor = (tensor - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return tensor, torch.tensor(labels)


@pytest.mark.slow  # ~20 s each on two busy cores (125 ImageNet images at 224 px)
@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_offline_weights_classify_imagenet_sample(name: str, imagenet_sample: Path) -> None:
    synsets = sorted(p.name for p in imagenet_sample.iterdir() if p.is_dir())
    assert len(synsets) == 250
    model = backbones.load_classifier(name)
    mean, std = backbones.normalisation(name)
    images, labels = _imagenet_batch(imagenet_sample, 224, mean, std, step=2)  # 125 images
    with torch.no_grad():
        logits = torch.cat([model(chunk) for chunk in images.split(25)])
    top5 = logits.topk(5, dim=1).indices
    top5_accuracy = (top5 == labels[:, None]).any(dim=1).float().mean().item()
    # chance is 0.005; the published top-5 of these weights is ~0.92–0.94
    assert top5_accuracy > 0.85, top5_accuracy


def test_random_weights_do_not_classify(imagenet_sample: Path) -> None:
    model = backbones.load_classifier("tf_efficientnet_lite0", pretrained=False)
    mean, std = backbones.normalisation("tf_efficientnet_lite0")
    images, labels = _imagenet_batch(imagenet_sample, 224, mean, std, step=10)
    with torch.no_grad():
        top5 = model(images).topk(5, dim=1).indices
    assert (top5 == labels[:, None]).any(dim=1).float().mean().item() < 0.2


def test_mapping_by_order_fails_loudly_on_mismatch() -> None:
    source = OrderedDict(a=torch.zeros(3, 3), b=torch.zeros(4))
    with pytest.raises(backbones.BackboneWeightsError, match="shape mismatch"):
        backbones.map_state_dict_by_order(source, ["x", "y"], [torch.Size([3, 3]), torch.Size([5])])
    with pytest.raises(backbones.BackboneWeightsError, match="tensors"):
        backbones.map_state_dict_by_order(source, ["x"], [torch.Size([3, 3])])


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1"])
def test_feature_extractor_gets_the_classifier_weights(name: str) -> None:
    from defect_assist.core.models.patchcore.torch_model import FastPatchcoreModel

    model = FastPatchcoreModel(backbone=name)
    reference = backbones.pretrained_state_dict(name)
    extractor = model.feature_extractor.feature_extractor.state_dict()
    for key in ("conv_stem.weight", "blocks.4.0.conv_pw.weight"):
        assert torch.equal(extractor[key], reference[key]), key


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="unknown backbone"):
        backbones.get_spec("resnet9000")
