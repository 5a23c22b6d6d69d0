"""Anomaly models behind one interface, and a registry to build or load them by kind."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from defect_assist.models.base import METADATA_FILE, AnomalyModel, Calibration, ModelMetadata, Prediction

# kind -> "module:Class"; modules are imported lazily so a kind's heavy deps load only when used.
MODEL_REGISTRY: dict[str, str] = {
    "patchcore": "defect_assist.models.patchcore:PatchcoreAnomalyModel",
    "efficientad": "defect_assist.models.efficientad:EfficientAdAnomalyModel",
}


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` importing each name of ``exports`` (name -> module) on first use."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def model_class(kind: str) -> type[AnomalyModel]:
    """The class implementing ``kind``."""
    if kind not in MODEL_REGISTRY:
        raise KeyError(f"unknown model {kind!r}; available: {', '.join(sorted(MODEL_REGISTRY))}")
    module_name, class_name = MODEL_REGISTRY[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def create_model(kind: str, device: str = "auto", **config: Any) -> AnomalyModel:
    """A new, unfitted model of ``kind`` with ``config`` overriding its defaults."""
    return model_class(kind)(device=device, **config)


def load_model(directory: str | Path, device: str = "auto") -> AnomalyModel:
    """Load a saved model of whatever kind its ``metadata.json`` names."""
    kind = json.loads((Path(directory) / METADATA_FILE).read_text())["kind"]
    return model_class(kind).from_directory(directory, device=device)


__all__ = [
    "MODEL_REGISTRY",
    "AnomalyModel",
    "Calibration",
    "ModelMetadata",
    "Prediction",
    "create_model",
    "lazy_exports",
    "load_model",
    "model_class",
]
