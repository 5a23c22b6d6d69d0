"""Exported models: the served graph written as ONNX and OpenVINO IR, and run in place of torch.

:func:`export_model` writes a fitted model's serving graph (preprocessing, network, memory-bank
search, maps, the calibrated score and verdict: :mod:`defect_assist.core.models.patchcore.export`)
into a folder beside the model's weights::

    export/
      export.json          formats, input size, outputs, threshold, tool versions
      model.onnx           ONNX (opset 17), batch dimension dynamic
      openvino/model.xml   OpenVINO IR converted from the ONNX file (+ model.bin)

:class:`ExportedRuntime` runs one of them with onnxruntime or OpenVINO; :func:`use_export` attaches
it to the model, whose predictions (score, verdict, maps, mask cut, similarity vectors) then come
from the runtime through the same post-processing as the eager model. ``serve`` does this when
``INFERENCE_ENGINE`` is ``onnxruntime`` or ``openvino`` (exporting on first load when the folder is
missing). The parity of the two paths is checked by ``tests/test_export.py`` on real images.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defect_assist.core.models.base import AnomalyModel

logger = logging.getLogger(__name__)

ENGINES = ("torch", "onnxruntime", "openvino")
EXPORT_DIR = "export"
MANIFEST_FILE = "export.json"
ONNX_FILE = "model.onnx"
OPENVINO_FILE = "openvino/model.xml"
OPSET = 17


class ExportError(RuntimeError):
    """The model cannot be exported or its export cannot be run."""


@dataclass
class ExportManifest:
    """What ``export.json`` records of one export."""

    model_kind: str
    model_created: str  # with the training fingerprint: which saved model this export is of
    training_fingerprint: str
    image_size: int
    inputs: list[str]
    outputs: list[str]
    image_threshold: float
    formats: dict[str, str] = field(default_factory=dict)  # format -> file, relative to the folder
    versions: dict[str, str] = field(default_factory=dict)
    export_seconds: float = 0.0

    @classmethod
    def read(cls, directory: Path) -> ExportManifest:
        return cls(**json.loads((directory / MANIFEST_FILE).read_text()))


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import openvino

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.__version__,
    }


def export_model(model: AnomalyModel, directory: str | Path, openvino: bool = True) -> ExportManifest:
    """Write ``model``'s serving graph as ONNX (and OpenVINO IR) into ``directory``, replacing it whole.

    The folder is built beside its target and renamed into place, so a reader never sees half an
    export. Raises :class:`ExportError` for a model without a serving graph or without the packages.
    """
    target = Path(directory)
    try:
        graph = model.serving_graph().eval()
        import openvino as ov
    except (NotImplementedError, ImportError, ValueError) as error:
        raise ExportError(f"cannot export {model.kind}: {error}") from error
    started = time.perf_counter()
    temporary = target.with_name(f".{target.name}-{uuid.uuid4().hex}")
    temporary.mkdir(parents=True)
    try:
        size = model.image_size
        example = (torch.rand(2, 3, size, size), torch.ones(2, size, size))
        names = list(graph.input_names) + list(graph.output_names)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
            torch.onnx.export(
                copy.deepcopy(graph).cpu(),  # a copy: moving the graph would move the served model
                example,
                str(temporary / ONNX_FILE),
                input_names=list(graph.input_names),
                output_names=list(graph.output_names),
                dynamic_axes={name: {0: "batch"} for name in names},
                opset_version=OPSET,
                dynamo=False,
            )
        formats = {"onnx": ONNX_FILE}
        if openvino:
            (temporary / OPENVINO_FILE).parent.mkdir()
            ov.save_model(
                ov.Core().read_model(str(temporary / ONNX_FILE)),
                str(temporary / OPENVINO_FILE),
                compress_to_fp16=False,
            )
            formats["openvino"] = OPENVINO_FILE
        metadata = model.metadata
        manifest = ExportManifest(
            model_kind=model.kind,
            model_created=metadata.created if metadata is not None else "",
            training_fingerprint=metadata.training_fingerprint if metadata is not None else "",
            image_size=size,
            inputs=list(graph.input_names),
            outputs=list(graph.output_names),
            image_threshold=float(model.calibration.image_threshold),  # type: ignore[union-attr]
            formats=formats,
            versions=_versions(),
            export_seconds=round(time.perf_counter() - started, 2),
        )
        (temporary / MANIFEST_FILE).write_text(json.dumps(asdict(manifest), indent=2))
        if target.exists():
            shutil.rmtree(target)
        temporary.rename(target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return manifest


class ExportedRuntime:
    """One exported graph loaded in onnxruntime or OpenVINO; :meth:`run` maps inputs to outputs.

    ``precision`` (OpenVINO only): ``f32`` (the default, for parity with torch) or ``bf16`` (the
    matrix units of CPUs with AMX or AVX-512 BF16; faster, scores differ by about 1e-2).
    """

    def __init__(self, directory: str | Path, engine: str, threads: int = 0, precision: str = "f32") -> None:
        self.directory = Path(directory)
        self.manifest = ExportManifest.read(self.directory)
        self.engine = engine
        if engine == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            path = self.directory / self.manifest.formats["onnx"]
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        elif engine == "openvino":
            import openvino as ov

            if "openvino" not in self.manifest.formats:
                raise ExportError(f"{self.directory} has no OpenVINO export")
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            core = ov.Core()
            path = self.directory / self.manifest.formats["openvino"]
            self._compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        else:
            raise ExportError(f"unknown engine {engine!r}: one of {', '.join(ENGINES[1:])}")

    def run(self, image: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by name for images ``(B, 3, S, S)`` in [0, 1] and valid pixels ``(B, S, S)``."""
        feeds = [np.ascontiguousarray(image, np.float32), np.ascontiguousarray(valid, np.float32)]
        if self.engine == "onnxruntime":
            values = self._session.run(None, dict(zip(self.manifest.inputs, feeds, strict=True)))
        else:
            result = self._compiled(feeds)
            values = [result[output] for output in self._compiled.outputs]
        return dict(zip(self.manifest.outputs, values, strict=True))


def export_dir(model_directory: str | Path) -> Path:
    """Where the export of the model saved in ``model_directory`` lives."""
    return Path(model_directory) / EXPORT_DIR


def use_export(model: AnomalyModel, model_directory: str | Path, engine: str, **options: Any) -> AnomalyModel:
    """Serve ``model`` (saved in ``model_directory``) through its export with ``engine``.

    Exports first when the folder is missing or was made of another model; ``torch`` detaches any
    runtime. Returns the model.
    """
    if engine == "torch":
        model.runtime = None
        return model
    directory = export_dir(model_directory)
    wanted = "openvino" if engine == "openvino" else "onnx"
    manifest = ExportManifest.read(directory) if (directory / MANIFEST_FILE).exists() else None
    metadata = model.metadata
    same_model = (
        manifest is not None
        and metadata is not None
        and model.calibration is not None
        and (manifest.model_created, manifest.training_fingerprint, manifest.image_threshold)
        == (metadata.created, metadata.training_fingerprint, float(model.calibration.image_threshold))
    )
    if not same_model or wanted not in manifest.formats:  # type: ignore[union-attr]
        logger.info("exporting %s to %s", model.kind, directory)
        export_model(model, directory)
    model.runtime = ExportedRuntime(directory, engine, **options)
    return model


@dataclass
class ParityReport:
    """How far an engine's predictions are from torch's on the same images."""

    engine: str
    images: int
    max_score_difference: float  # normalised score (0.5 = threshold)
    max_map_difference: float  # normalised anomaly map
    min_mask_iou: float  # images where both masks are empty count as 1
    verdicts_differing: int


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union


def check_parity(
    model: AnomalyModel, model_directory: str | Path, images: list[Any], engine: str, batch_size: int = 8
) -> ParityReport:
    """Predict ``images`` with torch and through the export with ``engine``; compare what is served."""
    previous = model.runtime
    try:
        model.runtime = None
        eager = model.predict(images, batch_size=batch_size)
        exported = use_export(model, model_directory, engine).predict(images, batch_size=batch_size)
    finally:
        model.runtime = previous
    pairs = [(a, b) for a, b in zip(eager, exported, strict=True) if a.error is None and b.error is None]
    if not pairs:
        raise ExportError("no readable image to compare")
    return ParityReport(
        engine=engine,
        images=len(pairs),
        max_score_difference=max(abs(a.score - b.score) for a, b in pairs),
        max_map_difference=max(float(np.abs(a.anomaly_map - b.anomaly_map).max()) for a, b in pairs),
        min_mask_iou=min(_iou(a.mask, b.mask) for a, b in pairs),
        verdicts_differing=sum(a.is_anomalous != b.is_anomalous for a, b in pairs),
    )
