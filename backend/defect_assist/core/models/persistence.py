"""Saving and loading a fitted model: ``metadata.json`` (readable) and ``weights.pt`` (its tensors)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from defect_assist.core.calibration import Calibration
from defect_assist.core.models.metadata import METADATA_FILE, WEIGHTS_FILE, ModelMetadata
from defect_assist.core.refinement import CutMemory, DefectHead

if TYPE_CHECKING:
    from defect_assist.core.models.base import AnomalyModel

Model = TypeVar("Model", bound="AnomalyModel")


def save_model(model: AnomalyModel, directory: Path) -> None:
    """Write the model's metadata and weights (with what it learned from corrections) to ``directory``."""
    if model.metadata is None or model.calibration is None:
        raise RuntimeError("cannot save an unfitted model")
    directory.mkdir(parents=True, exist_ok=True)
    model.metadata.calibration = asdict(model.calibration)
    payload = {
        "kind": model.kind,
        "config": model.config.to_dict(),
        "state": model._state(),
        "defect_head": model.defect_head.state() if model.defect_head else None,
        "cut_memory": model.cut_memory.state() if model.cut_memory else None,
    }
    torch.save(payload, directory / WEIGHTS_FILE)
    (directory / METADATA_FILE).write_text(json.dumps(asdict(model.metadata), indent=2, default=str))


def load_saved_model(cls: type[Model], directory: Path, device: str = "auto") -> Model:
    """A model of class ``cls`` as :func:`save_model` wrote it (options missing from older saves take
    ``cls.saved_model_defaults``)."""
    metadata = ModelMetadata(**json.loads((directory / METADATA_FILE).read_text()))
    payload = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=False)
    model = cls(device=device, **{**cls.saved_model_defaults, **payload["config"]})
    model._load_state(payload["state"])
    if payload.get("defect_head"):
        model.defect_head = DefectHead.from_state(payload["defect_head"])
    if payload.get("cut_memory"):
        model.cut_memory = CutMemory.from_state(payload["cut_memory"])
    model.metadata = metadata
    model.calibration = Calibration(**metadata.calibration)
    return model
