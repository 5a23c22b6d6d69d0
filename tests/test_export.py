"""Exported models (ONNX, OpenVINO) serve what the torch model serves, on real magnetic-tile images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from defect_assist.core.export import (
    MANIFEST_FILE,
    ExportError,
    ExportManifest,
    check_parity,
    export_dir,
    export_model,
    use_export,
)
from defect_assist.core.settings import Settings
from defect_assist.core.store import ModelStore
from defect_assist.label_studio import LABELING_CONFIG
from defect_assist.serving import create_app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served_patchcore(magnetic_tile: Path, tmp_path_factory: pytest.TempPathFactory):
    """The default PatchCore (256 px, default layers and re-weighting) on 40 normals, saved to a folder."""
    import torch

    from defect_assist.core.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("patchcore", device="cpu")
    model.fit(sorted((magnetic_tile / "train" / "good").glob("*.jpg"))[::16][:40])
    directory = tmp_path_factory.mktemp("served") / "v0001"
    model.save(directory)
    return model, directory


@pytest.fixture(scope="module")
def real_images(magnetic_tile: Path) -> list[Path]:
    """Normals and every defect type: sizes differ, so most are letterboxed."""
    images = sorted((magnetic_tile / "test" / "good").glob("*.jpg"))[::30][:5]
    for defect in ("blowhole", "break", "crack", "fray", "uneven"):
        images += sorted((magnetic_tile / "test" / defect).glob("*.jpg"))[::7][:3]
    return images


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_exported_scores_and_masks_match_torch(
    served_patchcore, real_images: list[Path], engine: str
) -> None:
    model, directory = served_patchcore
    report = check_parity(model, directory, real_images, engine, batch_size=4)
    assert report.images == len(real_images)
    assert report.max_score_difference <= 1e-3
    assert report.max_map_difference <= 1e-3
    assert report.min_mask_iou >= 0.99
    assert report.verdicts_differing == 0
    assert model.runtime is None  # the check leaves the model as it found it


def test_the_export_graph_carries_threshold_normalisation_and_a_dynamic_batch(
    served_patchcore, real_images: list[Path]
) -> None:
    """Run the ONNX file alone, as a user of onnxruntime would: [0, 1] RGB in, calibrated verdict out."""
    import onnxruntime

    model, directory = served_patchcore
    manifest = use_export(model, directory, "onnxruntime") and ExportManifest.read(export_dir(directory))
    model.runtime = None
    assert manifest.formats == {"onnx": "model.onnx", "openvino": "openvino/model.xml"}
    assert manifest.image_threshold == pytest.approx(model.calibration.image_threshold)
    session = onnxruntime.InferenceSession(str(export_dir(directory) / "model.onnx"))
    loaded = model.load_batch(real_images[:5])
    mean = np.asarray(model.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(model.std, np.float32).reshape(1, 3, 1, 1)
    image = loaded.tensor.numpy() * std + mean
    valid = loaded.valid_mask(model.image_size, model.device).float().numpy()
    expected = model.predict(real_images[:5])
    for batch in (slice(0, 1), slice(0, 5)):
        raw, score, verdict = session.run(
            ["raw_score", "score", "is_anomalous"], {"image": image[batch], "valid": valid[batch]}
        )
        assert raw.shape == score.shape == verdict.shape == (batch.stop,)
        want = [p.score for p in expected[batch]]
        np.testing.assert_allclose(score, want, atol=1e-3)
        assert verdict.tolist() == [p.is_anomalous for p in expected[batch]]


def test_an_export_is_reused_and_made_again_for_another_model(served_patchcore, magnetic_tile: Path) -> None:
    model, directory = served_patchcore
    use_export(model, directory, "openvino")
    manifest_file = export_dir(directory) / MANIFEST_FILE
    written = manifest_file.stat().st_mtime_ns
    use_export(model, directory, "onnxruntime")
    assert manifest_file.stat().st_mtime_ns == written  # same model: no new export
    model.update(sorted((magnetic_tile / "train" / "good").glob("*.jpg"))[1:3])
    assert model.runtime is None  # the export holds the bank before the update
    model.save(directory)
    use_export(model, directory, "onnxruntime")
    assert manifest_file.stat().st_mtime_ns != written
    assert (
        ExportManifest.read(export_dir(directory)).training_fingerprint == model.metadata.training_fingerprint
    )
    model.runtime = None


def test_a_model_without_a_serving_graph_says_so(tmp_path: Path) -> None:
    from defect_assist.core.models.registry import create_model

    model = create_model("efficientad", device="cpu")
    with pytest.raises(ExportError, match="efficientad"):
        export_model(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_serve_uses_the_export_when_configured(
    served_patchcore, real_images: list[Path], tmp_path: Path
) -> None:
    """``INFERENCE_ENGINE=openvino``: /predict exports the published version on first load and
    serves the scores torch serves."""
    model, _ = served_patchcore
    store = ModelStore(tmp_path / "models")
    version = store.publish("3", model).version
    settings = Settings(
        model_dir=tmp_path / "models",
        device="cpu",
        inference_engine="openvino",
        label_studio_url="http://127.0.0.1:9",
        label_studio_api_key="t",
        label_studio_sync=False,
    )
    tasks = [{"id": i, "project": 3, "data": {"image": str(p)}} for i, p in enumerate(real_images[:6])]
    with TestClient(create_app(settings)) as client:
        answer = client.post(
            "/predict", json={"tasks": tasks, "project": 3, "label_config": LABELING_CONFIG.read_text()}
        )
        served = client.app.state.model.model_for("3")[1]  # type: ignore[attr-defined]
    assert answer.status_code == 200
    assert served.runtime is not None and served.runtime.engine == "openvino"
    assert (store.project_dir("3") / version / "export" / MANIFEST_FILE).exists()
    expected = model.predict(real_images[:6])
    scores = [r["score"] for r in answer.json()["results"]]
    np.testing.assert_allclose(scores, [p.score for p in expected], atol=1e-3)
