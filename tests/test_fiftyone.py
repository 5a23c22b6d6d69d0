"""FiftyOne exploration with the real bundled MongoDB, real Qdrant local storage and the plugin.

Builds a dataset (masks, heatmaps, verdicts, embeddings, 2-D plot, similarity on the project's
index), runs the plugin's operators programmatically (immediate and delegated), and screenshots the
App with headless Chromium (saved to artifacts/; docs/images/ holds a reviewed copy). The integration
test checks the one similarity index: `similar` and `index` after `fiftyone`, with nothing embedded
twice.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
_FO_DIR = Path(tempfile.mkdtemp(prefix="fo-test-"))
os.environ.setdefault("FIFTYONE_DATABASE_DIR", str(_FO_DIR / "db"))
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
os.environ["FIFTYONE_PLUGINS_DIR"] = str(ROOT / "plugins")
os.environ.setdefault("FIFTYONE_DEFAULT_APP_ADDRESS", "127.0.0.1")

fo = pytest.importorskip("fiftyone")
import fiftyone.operators as foo  # noqa: E402
from browser import headless_browser  # noqa: E402
from qdrant_client import QdrantClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from defect_assist.core.models.registry import create_model  # noqa: E402
from defect_assist.core.settings import get_settings  # noqa: E402
from defect_assist.core.store import ModelStore  # noqa: E402
from defect_assist.explore.fiftyone_dataset import (  # noqa: E402
    HASH_FIELD,
    SIMILARITY_KEY,
    VISUALIZATION_KEY,
    build_dataset,
)
from defect_assist.explore.qdrant_backend import QdrantLocalSimilarityIndex  # noqa: E402
from defect_assist.explore.review_tasks import build_tasks  # noqa: E402
from defect_assist.similarity.index import SimilarityIndex  # noqa: E402
from defect_assist.similarity.mvtec import walk_folder  # noqa: E402
from defect_assist_tools.cli import app as cli  # noqa: E402
from defect_assist_tools.local_label_studio import free_port  # noqa: E402

PROJECT = "fo"
PLUGIN = "@defect-assist/defect_assist"
LS_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="verdict" toName="image"><Choice value="Normal"/><Choice value="Anomalous"/></Choices>
  <BrushLabels name="defect" toName="image"><Label value="Defect"/></BrushLabels>
</View>"""


@pytest.fixture(scope="module")
def env(tmp_path_factory, make_tiny_mvtec):
    """A tiny MVTec copy, a published 64 px PatchCore and settings pointing at temp dirs."""
    root = make_tiny_mvtec(
        n_train=10,
        train_every=60,
        n_good=3,
        good_every=50,
        defects=("break", "fray"),
        n_defect=2,
        defect_every=8,
    )
    work = tmp_path_factory.mktemp("fowork")
    saved = {k: os.environ.get(k) for k in ("MODEL_DIR", "QDRANT_PATH", "QDRANT_URL", "CACHE_DIR", "DEVICE")}
    os.environ.update(
        MODEL_DIR=str(work / "models"),
        QDRANT_PATH=str(work / "qdrant"),
        QDRANT_URL="",
        CACHE_DIR=str(work / "cache"),
        DEVICE="cpu",
    )
    get_settings.cache_clear()
    model = create_model("patchcore", device="cpu", image_size=64)
    model.fit(sorted((root / "train" / "good").glob("*.jpg")))
    store = ModelStore(work / "models")
    store.publish(PROJECT, model)
    yield {"root": root, "work": work, "store": store, "model": model}
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def dataset(env):
    version = env["store"].current_version(PROJECT)
    ds = build_dataset(
        env["root"],
        env["model"],
        name="defect-assist-test",
        model_version=version,
        project=PROJECT,
        qdrant_path=env["work"] / "qdrant",  # QDRANT_PATH: the project's index
        persistent=False,
    )
    yield ds
    ds.delete()


@pytest.mark.e2e
def test_dataset_has_labels_heatmaps_embeddings_and_brain_runs(dataset, env) -> None:
    assert len(dataset) == 10 + 3 + 4
    anomalous = dataset.match({"ground_truth.label": "anomalous"})
    assert len(anomalous) == 4 and set(anomalous.values("defect_type")) == {"break", "fray"}
    for sample in anomalous:
        gt = sample["gt_mask"].get_mask()
        assert gt.dtype == np.uint8 and set(np.unique(gt)) <= {0, 1} and gt.any()
        assert gt.shape == Image.open(sample.filepath).size[::-1]
    for sample in dataset:
        assert isinstance(sample["anomaly_map"], fo.Heatmap) and sample["anomaly_map"].range == [0, 255]
        heat = sample["anomaly_map"].get_map()
        assert heat.shape == Image.open(sample.filepath).size[::-1]
        assert (
            isinstance(sample["prediction"], fo.Classification) and 0 <= sample["prediction"].confidence <= 1
        )
        assert (
            sample["prediction"].label in {"normal", "anomalous"}
            and sample["score"] == sample["prediction"].confidence
        )
        assert isinstance(sample["pred_mask"], fo.Segmentation)
        pred_mask = sample["pred_mask"].get_mask() > 0  # the served mask: present exactly when anomalous
        assert pred_mask.shape == heat.shape and pred_mask.any() == (
            sample["prediction"].label == "anomalous"
        )
        assert len(sample["embedding"]) == len(dataset.first()["embedding"])
    assert "train" in dataset.first().tags
    assert set(dataset.list_brain_runs()) == {VISUALIZATION_KEY, SIMILARITY_KEY}
    viz = dataset.load_brain_results(VISUALIZATION_KEY)
    assert viz.points.shape == (len(dataset), 2)
    assert dataset.info["defect_assist"]["visualization"] in {"umap", "pca"}


@pytest.mark.e2e
def test_app_similarity_sort_uses_qdrant_with_current_client(dataset, env) -> None:
    # fiftyone-brain's own qdrant backend calls QdrantClient.search, which this client no longer has
    assert not hasattr(QdrantClient, "search")
    index = dataset.load_brain_results(SIMILARITY_KEY)
    assert isinstance(index, QdrantLocalSimilarityIndex) and index.total_index_size == len(dataset)
    query = dataset.match({"defect_type": "fray"}).first()
    view = dataset.sort_by_similarity(query.id, k=5, brain_key=SIMILARITY_KEY)  # what the App's sort calls
    assert view.first().id == query.id and len(view) == 5
    vectors = np.stack(dataset.values("embedding"))
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = np.argsort(-(unit @ unit[dataset.values("id").index(query.id)]))[:5]
    assert view.values("id") == [dataset.values("id")[i] for i in expected]
    # the brain run is a view of the project's one index (QDRANT_PATH), not a collection of its own
    assert index.config.collection_name == SimilarityIndex(PROJECT, path=env["work"] / "qdrant").collection
    client = QdrantClient(path=str(env["work"] / "qdrant"))  # nothing holds the storage between operations
    try:
        assert [c.name for c in client.get_collections().collections] == [index.config.collection_name]
        assert client.count(index.config.collection_name).count == len(dataset)
    finally:
        client.close()


@pytest.mark.e2e
def test_plugin_operators(dataset, env) -> None:
    uris = {op.uri for op in foo.list_operators()}
    for name in ("find_similar", "compute_predictions", "send_to_label_studio", "trigger_retrain"):
        assert f"{PLUGIN}/{name}" in uris
    store: ModelStore = env["store"]
    version = store.current_version(PROJECT)

    # no `defect-assist index` first: building the dataset filled the project's index
    query = dataset.match({"defect_type": "break"}).first()
    result = foo.execute_operator(
        f"{PLUGIN}/find_similar",
        ctx={"dataset": dataset.name, "selected": [query.id], "params": {"k": 4, "project": PROJECT}},
    )
    assert result.error is None, result.error
    assert result.result["source"].startswith("qdrant:") and len(result.result["neighbours"]) == 4
    assert result.result["in_dataset"] == 4 and query.filepath not in [
        n["path"] for n in result.result["neighbours"]
    ]

    # compute_predictions is delegated: queued, then run by the delegated-operation executor
    from fiftyone.operators.delegated import DelegatedOperationService

    service = DelegatedOperationService()
    queued = foo.execute_operator(
        f"{PLUGIN}/compute_predictions", ctx={"dataset": dataset.name, "params": {"project": PROJECT}}
    )
    assert queued.delegated
    ops = service.get_queued_operations(operator=f"{PLUGIN}/compute_predictions", dataset_name=dataset.name)
    assert len(ops) == 1
    done = service.execute_operation(ops[0])
    assert done.error is None, done.error
    assert done.result["samples"] == len(dataset) and done.result["index"]["unchanged"] == len(dataset)
    assert done.result["index"]["added"] == 0 and done.result["index"]["reembedded"] == 0

    # retrain in-process (use_queue=False; the queue path is defect_assist_worker.enqueue_retrain)
    retrain = foo.execute_operator(
        f"{PLUGIN}/trigger_retrain",
        ctx={"dataset": dataset.name, "params": {"project": PROJECT, "delegate": False, "use_queue": False}},
    )
    assert retrain.error is None, retrain.error
    assert store.current_version(PROJECT) != version
    assert retrain.result.get("job_id") or retrain.result["version"] == store.current_version(PROJECT)
    with SimilarityIndex(PROJECT, path=env["work"] / "qdrant") as index:
        assert index.mark_stale(store.current_version(PROJECT)) == len(dataset)  # new version → all stale


@pytest.mark.e2e
def test_label_studio_tasks_carry_predictions(dataset) -> None:
    from label_studio_sdk.converter.brush import decode_rle

    samples = dataset.sort_by("score", reverse=True).limit(2)
    tasks = build_tasks(samples, LS_CONFIG)
    assert len(tasks) == 2
    for task, sample in zip(tasks, samples, strict=True):
        assert task["data"]["image"].endswith(Path(sample.filepath).name)
        prediction = task["predictions"][0]
        assert (
            prediction["model_version"] == sample["model_version"] and prediction["score"] == sample["score"]
        )
        choice = next(r for r in prediction["result"] if r["type"] == "choices")
        assert choice["value"]["choices"] == [
            "Anomalous" if sample["prediction"].label == "anomalous" else "Normal"
        ]
        brush = [r for r in prediction["result"] if r["type"] == "brushlabels"]
        mask = sample["pred_mask"].get_mask() > 0
        if mask.any():
            h, w = brush[0]["original_height"], brush[0]["original_width"]
            decoded = decode_rle(brush[0]["value"]["rle"]).reshape(h, w, 4)[..., 0] > 0
            assert np.array_equal(decoded, mask)


@pytest.mark.integration
def test_one_similarity_index_for_fiftyone_and_the_cli(env, tmp_path: Path, monkeypatch) -> None:
    """`similar` right after building the dataset finds its images (no `index` pass); neither `index`
    nor a rebuild embeds anything again; the App's similarity sort reads the same collection."""
    project, qdrant = "shared", tmp_path / "qdrant"
    store: ModelStore = env["store"]
    store.publish(project, env["model"])
    version = store.current_version(project)
    model = store.load(project, version, device="cpu")
    embedded: list[str] = []
    predict_and_embed = model.predict_and_embed

    def counting(images, batch_size=8):
        embedded.extend(str(i) for i in images)
        return predict_and_embed(images, batch_size=batch_size)

    monkeypatch.setattr(model, "predict_and_embed", counting)
    n = len(walk_folder(env["root"]))
    build = dict(name="defect-assist-shared", model_version=version, project=project, persistent=False)
    dataset = build_dataset(env["root"], model, qdrant_path=qdrant, **build)
    try:
        first = dataset.info["defect_assist"]["index"]
        assert (first["added"], first["total_points"], len(embedded)) == (n, n, n)

        common = ["--project", project, "--model-dir", str(store.root), "--qdrant-path", str(qdrant)]
        common += ["--device", "cpu"]
        runner = CliRunner()
        query = dataset.match({"defect_type": "fray"}).first()
        result = runner.invoke(
            cli, ["similar", query.filepath, "--k", "3", "--json", *common], catch_exceptions=False
        )
        assert result.exit_code == 0, result.output  # not "the index is empty"
        hits = [h["path"] for h in json.loads(result.stdout)["neighbours"]]
        assert len(hits) == 3 and set(hits) <= set(dataset.values("filepath")) and query.filepath not in hits

        result = runner.invoke(cli, ["index", "--data", str(env["root"]), *common], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert (report["added"], report["reembedded"], report["unchanged"], report["total_points"]) == (
            0,
            0,
            n,
            n,
        )

        embedded.clear()  # the second pass: every image is in the index already
        dataset = build_dataset(env["root"], model, qdrant_path=qdrant, **build)
        second = dataset.info["defect_assist"]["index"]
        assert (second["added"], second["reembedded"], second["unchanged"], embedded) == (0, 0, n, [])
        assert len(dataset.exists("anomaly_map")) == n  # the heatmaps were still predicted

        with SimilarityIndex(project, path=qdrant) as index:
            assert index.count() == n  # replacing the brain run left the shared index alone
            stored = index.vectors(dataset.values(HASH_FIELD))
        for sample in dataset:
            assert np.allclose(sample["embedding"], stored[sample[HASH_FIELD]][0])
        results = dataset.load_brain_results(SIMILARITY_KEY)
        assert results.config.collection_name == index.collection and results.total_index_size == n
        query = dataset.match({"defect_type": "fray"}).first()
        view = dataset.sort_by_similarity(query.id, k=4, brain_key=SIMILARITY_KEY)
        assert view.first().id == query.id and len(view) == 4
        assert view.values("filepath")[1:] == hits  # the same neighbours as `defect-assist similar`
    finally:
        dataset.delete()


def _screenshot(url: str, out: Path) -> None:
    """Open the App in headless Chromium (driven by Playwright), wait for the grid, save a PNG."""
    with headless_browser() as browser:
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(url, wait_until="load", timeout=90_000)  # (the App keeps a connection open: no idle)
        page.get_by_text("anomaly_map").first.wait_for(timeout=90_000)  # sidebar rendered
        page.wait_for_timeout(15_000)  # let the grid load thumbnails and draw the overlays
        dismiss = page.get_by_text("Dismiss")
        if dismiss.count():
            dismiss.first.click()
            page.wait_for_timeout(1_000)
        page.screenshot(path=str(out))


@pytest.mark.e2e
def test_app_screenshot_with_heatmaps(dataset) -> None:
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("Debian chromium not installed (apt-get install -y chromium)")
    dataset.persistent = True  # the App server is another process
    port = free_port()
    session = fo.launch_app(
        dataset.sort_by("score", reverse=True), port=port, address="127.0.0.1", remote=True, auto=False
    )
    out = ROOT / "artifacts" / "fiftyone-app.png"
    out.parent.mkdir(exist_ok=True)
    try:
        deadline = time.time() + 60
        import urllib.request

        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read()
                break
            except OSError:
                time.sleep(1)
        out.unlink(missing_ok=True)
        _screenshot(f"http://127.0.0.1:{port}/datasets/{dataset.name}", out)
    finally:
        session.close()
        dataset.persistent = False
    image = np.asarray(Image.open(out).convert("RGB")).astype(np.int16)
    assert image.shape[:2] == (1000, 1600)
    assert image.std() > 20  # a rendered grid, not a blank page
