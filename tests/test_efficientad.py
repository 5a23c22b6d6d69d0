"""EfficientAd offline: teacher distillation (seeded, resumable, anomalib keys), the map border, the
Lightning module in anomalib's Engine, embeddings for similarity search, and the model end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from defect_assist.core.models.efficientad.distill_config import DistillConfig
from defect_assist.core.models.efficientad.teacher import network, paths, resolve, targets
from defect_assist.core.models.efficientad.teacher.distill import distill_teacher
from defect_assist.core.models.efficientad.teacher.paths import TeacherInfo
from defect_assist.core.models.efficientad.torch_model import build_model

pytestmark = pytest.mark.unit

TINY = {
    "steps": 4,
    "batch_size": 2,
    "crop_size": 64,
    "stat_images": 8,
    "checkpoint_every": 2,
    "holdout_fraction": 0.25,
}


@pytest.fixture(scope="module")
def natural_images(imagenet_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 ImageNet-sample images in ImageFolder layout (symlinks)."""
    root = tmp_path_factory.mktemp("natural")
    for path in sorted(imagenet_sample.rglob("*.JPEG"))[::16][:16]:
        (root / path.parent.name).mkdir(exist_ok=True)
        (root / path.parent.name / path.name).symlink_to(path)
    return root


@pytest.fixture(scope="module")
def tiny_teacher(natural_images: Path, tmp_path_factory: pytest.TempPathFactory) -> TeacherInfo:
    return distill_teacher(
        DistillConfig(data=str(natural_images), **TINY),
        tmp_path_factory.mktemp("t") / "pdn",
        show_progress=False,
    )


def test_tiny_teacher_loads_into_anomalib_pdn(tiny_teacher: TeacherInfo) -> None:
    from anomalib.models.image.efficient_ad.torch_model import SmallPatchDescriptionNetwork

    pdn = SmallPatchDescriptionNetwork(out_channels=384)
    pdn.load_state_dict(torch.load(tiny_teacher.path, weights_only=True), strict=True)
    assert pdn(torch.rand(1, 3, 128, 128)).shape == (1, 384, 24, 24)
    provenance = json.loads(tiny_teacher.path.with_name("provenance.json").read_text())
    assert provenance["config"]["steps"] == 4 and provenance["backbone"] == "tf_efficientnet_lite0"
    assert provenance["n_heldout_images"] > 0 and np.isfinite(provenance["heldout_regression_error"])
    assert provenance["config"]["context"] == 32 and [h["step"] for h in provenance["history"]] == [0, 2, 4]


def test_distill_teacher_command_uses_the_config_defaults(natural_images: Path, tmp_path: Path) -> None:
    """`distill-teacher` writes into the model store; options it is not given are DistillConfig's."""
    from dataclasses import asdict

    from typer.testing import CliRunner

    from defect_assist_tools.cli import app

    args = ["distill-teacher", "--data", str(natural_images), "--model-dir", str(tmp_path)]
    args += ["--steps", "2", "--batch-size", "2", "--name", "cli"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "_teachers" / "cli"
    assert json.loads(result.stdout[result.stdout.index("{") :])["teacher"] == str(folder / "teacher.pth")
    stored = json.loads((folder / "provenance.json").read_text())["config"]
    expected = asdict(DistillConfig(data=str(natural_images), steps=2, batch_size=2))
    assert stored == expected


def test_context_targets_align_with_pdn_output() -> None:
    """The backbone sees crop + context; the targets are the centre cells, on the PDN's output grid."""
    backbone = targets.BackboneTargets(pretrained=False, context=16)
    crops, target = backbone.split(torch.rand(2, 3, 96, 96))
    assert crops.shape == (2, 3, 64, 64) and target.shape == (2, backbone.channels, 16, 16)
    net = network.DistillationNet("small", backbone.channels)
    assert net(crops).shape == target.shape
    with pytest.raises(ValueError):
        targets.BackboneTargets(pretrained=False, context=6)


@pytest.mark.parametrize("size", ["small", "medium"])
def test_folded_teacher_keeps_the_adapter_geometry(size: str) -> None:
    """Folding the adapter into the last layer: anomalib's keys/shapes, same pairwise distances."""
    net = network.DistillationNet(size, 40).eval()
    pdn = network.build_pdn(size, padding=True).eval()
    pdn.load_state_dict(network.folded_teacher_state(net, seed=0), strict=True)
    with torch.no_grad():
        x = torch.rand(2, 3, 64, 64)
        a, b = net(x).flatten(2).transpose(1, 2), pdn(x).flatten(2).transpose(1, 2)
    assert b.shape[-1] == 384
    assert torch.allclose(torch.cdist(a, a), torch.cdist(b, b), atol=1e-3)


def test_replicated_map_border_scores_the_image_edge() -> None:
    """The unpadded PDN grid misses 4 cells (16 px) per side: replicated, not zeros as anomalib pads."""
    from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel

    image = torch.rand(1, 3, 256, 256)  # anomalib's own autoencoder needs >= 256 px
    replicate = build_model("small", None, map_border="replicate").eval()
    zeros = build_model("small", None, map_border="zeros").eval()
    anomalib = EfficientAdModel(teacher_out_channels=384, padding=False, pad_maps=True).eval()
    zeros.load_state_dict(replicate.state_dict())
    anomalib.load_state_dict(replicate.state_dict())
    maps = {}
    with torch.no_grad():
        for name, model in (("replicate", replicate), ("zeros", zeros), ("anomalib", anomalib)):
            student, distance = model.compute_student_teacher_distance(image)
            maps[name] = model.compute_maps(image, student, distance, normalize=False)[0][0, 0]
        grid = distance.mean(dim=1)[0]
    assert grid.shape == (56, 56) and maps["replicate"].shape == (256, 256)
    torch.testing.assert_close(maps["zeros"], maps["anomalib"])  # "zeros" is anomalib's computation
    # The outer 16 px: anomalib scores zero distance there ("certainly normal"); replicated: the edge cells.
    assert float(maps["zeros"][:8].abs().max()) == 0.0
    torch.testing.assert_close(maps["replicate"][0, 0], grid[0, 0])
    torch.testing.assert_close(maps["replicate"][-1, -1], grid[-1, -1])
    assert float(maps["replicate"][:16].min()) >= float(grid.min()) - 1e-6
    torch.testing.assert_close(maps["replicate"][40:216, 40:216], maps["zeros"][40:216, 40:216])


def test_padded_pdn_maps_have_no_margin() -> None:
    """With padding=True the grid covers the image: no margin is added, whatever pad_maps says."""
    from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel

    image = torch.rand(1, 3, 256, 256)
    padded = build_model("small", None, padding=True, pad_maps=True).eval()
    anomalib = EfficientAdModel(teacher_out_channels=384, padding=True, pad_maps=False).eval()
    anomalib.load_state_dict(padded.state_dict())
    with torch.no_grad():
        student, distance = padded.compute_student_teacher_distance(image)
        ours = padded.compute_maps(image, student, distance, normalize=False)[0]
        reference = anomalib.compute_maps(image, student, distance, normalize=False)[0]
    assert distance.shape[-2:] == (64, 64) and not padded.pad_maps
    torch.testing.assert_close(ours, reference)


def test_distillation_is_seeded_and_resumes(
    natural_images: Path, tiny_teacher: TeacherInfo, tmp_path: Path
) -> None:
    config = DistillConfig(data=str(natural_images), **TINY)
    again = distill_teacher(config, tmp_path / "again", show_progress=False)
    reference = torch.load(tiny_teacher.path, weights_only=True)
    repeated = torch.load(again.path, weights_only=True)
    assert all(torch.equal(reference[k], repeated[k]) for k in reference)  # same seed, same weights

    class Interrupt(Exception):
        pass

    def stop_at_three(stage: str, step: int, total: int, metrics: dict[str, float]) -> None:
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        distill_teacher(config, tmp_path / "resumed", progress=stop_at_three, show_progress=False)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["step"] == 2
    steps_seen: list[int] = []
    resumed = distill_teacher(
        config, tmp_path / "resumed", progress=lambda s, d, t, m: steps_seen.append(d), show_progress=False
    )
    assert steps_seen == [3, 4] and resumed.path.is_file()


def test_official_teacher_is_preferred(
    tiny_teacher: TeacherInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert paths.official_teacher("small") is None
    installed = paths.install_for_anomalib(tiny_teacher.path, "small")  # ours: marked, not "official"
    assert installed == paths.anomalib_teacher_path("small") and installed.is_file()
    assert paths.official_teacher("small") is None
    installed.with_name(
        installed.name + paths.OUR_MARKER_SUFFIX
    ).unlink()  # now it looks like anomalib's file
    info = resolve.resolve_teacher("small", "auto", model_dir=tmp_path / "models")
    assert info.source == "official" and info.path == installed
    assert paths.install_for_anomalib(tiny_teacher.path, "small", overwrite=True) is None  # never replaced


@pytest.fixture(scope="module")
def tiny_tile(make_tiny_mvtec) -> Path:
    """A small MVTec-layout copy: 12 train normals, 3 test normals, 2 break + 2 uneven."""
    return make_tiny_mvtec(n_train=12, n_good=3, n_defect=2)


@pytest.fixture(scope="module")
def tiny_model(tiny_tile: Path, natural_images: Path):
    """EfficientAd with a random teacher, 20 steps at 128 px (shared by the embedding tests)."""
    from defect_assist.core.models.registry import create_model

    model = create_model(
        "efficientad",
        device="cpu",
        teacher="random",
        penalty_dir=str(natural_images),
        image_size=128,
        max_steps=20,
        val_every=0,
        patience=0,
        time_budget_s=0,
    )
    model.fit(sorted((tiny_tile / "train" / "good").glob("*.jpg")), seed=0)
    return model


def test_lightning_module_has_the_served_defaults(natural_images: Path) -> None:
    """OfflineEfficientAd = the served model on CPU: same resolved config, network and input size."""
    from anomalib.data.transforms.utils import extract_transforms_by_type
    from torchvision.transforms.v2 import Resize

    from defect_assist.core.models.efficientad.anomaly_model import EfficientAdAnomalyModel
    from defect_assist.core.models.efficientad.lightning_model import OfflineEfficientAd
    from defect_assist.core.models.efficientad.torch_model import ResizingAutoEncoder

    served = EfficientAdAnomalyModel(device="cpu")
    module = OfflineEfficientAd()
    assert module.efficientad_config == served.config
    assert (served.config.model_size, served.config.image_size, served.config.map_border) == (
        "small",
        128,
        "replicate",
    )
    assert module.model_size.value == "small" and module.lr == served.config.lr
    assert module.imagenet_dir == paths.natural_images_dir()
    assert isinstance(module.model.ae, ResizingAutoEncoder) and module.model.map_border == "replicate"
    assert module.model.state_dict().keys() == served.model.state_dict().keys()
    (resize,) = extract_transforms_by_type(module.pre_processor.transform, Resize)
    assert list(resize.size) == [128, 128]
    assert OfflineEfficientAd(imagenet_dir=natural_images).imagenet_dir == natural_images


@pytest.mark.slow
def test_lightning_module_trains_in_anomalibs_engine(
    tiny_tile: Path, natural_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """anomalib's Engine fits OfflineEfficientAd (random teacher, 3 steps) and predicts maps, no download."""
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.models.image.efficient_ad import lightning_model as anomalib_efficientad

    from defect_assist.core.models.efficientad.lightning_model import OfflineEfficientAd

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("OfflineEfficientAd tried to download")

    monkeypatch.setattr(anomalib_efficientad, "download_and_extract", no_download)
    datamodule = Folder(
        name="tile",
        root=tiny_tile,
        normal_dir="train/good",
        abnormal_dir=["test/break", "test/uneven"],
        normal_test_dir="test/good",
        train_batch_size=1,
        eval_batch_size=4,
        num_workers=0,
        seed=0,
    )
    torch.manual_seed(0)
    model = OfflineEfficientAd(imagenet_dir=natural_images, teacher="random", visualizer=False)
    engine = Engine(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=3,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    engine.fit(model, datamodule=datamodule)
    assert model.teacher_info is not None and model.teacher_info.source == "random"
    assert model.model.is_set(model.model.mean_std) and model.model.is_set(model.model.quantiles)
    batches = engine.predict(model, datamodule=datamodule)
    assert batches and sum(len(b.image) for b in batches) == len(datamodule.test_data)
    for batch in batches:  # at the served model's 128 px; scores normalised by anomalib's post-processor
        n = len(batch.image)
        assert (
            tuple(batch.anomaly_map.shape[-2:]) == (128, 128) and batch.anomaly_map.numel() == n * 128 * 128
        )
        assert batch.pred_score.numel() == n and torch.isfinite(batch.anomaly_map).all()
        assert bool(((batch.pred_score >= 0) & (batch.pred_score <= 1)).all())


def test_embed_fills_both_parts(tiny_model, tiny_tile: Path) -> None:
    """embed(): channel-standardised teacher features pooled over the image and over the anomaly map."""
    from defect_assist.core.models.prediction import Embedding

    images = sorted((tiny_tile / "test").rglob("*.jpg"))[:3]
    embedding = tiny_model.embed(tiny_model.load_batch(images).tensor)
    assert isinstance(embedding, Embedding)
    assert embedding.pooled.shape == (3, 384) and embedding.defect.shape == (3, 384)
    assert torch.isfinite(embedding.pooled).all() and torch.isfinite(embedding.defect).all()
    assert not torch.allclose(embedding.pooled, embedding.defect)  # the defect part follows the map
    arrays = tiny_model.embed_images(images)
    assert arrays.pooled.shape == arrays.defect.shape == (3, 384) and arrays.errors == [None] * 3


def test_similarity_index_finds_the_indexed_image(tiny_model, tiny_tile: Path, tmp_path: Path) -> None:
    """An EfficientAd model indexes a folder in embedded Qdrant; an indexed image is its own nearest."""
    from defect_assist.similarity.embedding import SimilarityEmbedder
    from defect_assist.similarity.index import SimilarityIndex
    from defect_assist.similarity.indexing import query_similar, update_index
    from defect_assist.similarity.mvtec import walk_folder

    records = walk_folder(tiny_tile)
    embedder = SimilarityEmbedder(tiny_model, "v1-efficientad")
    with SimilarityIndex("efficientad", path=tmp_path / "qdrant") as index:
        report = update_index(index, embedder, records, "v1-efficientad")
        assert report.added == report.total == len(records) and not report.failed
        for record in (records[0], records[-1]):  # a train normal, a test defect
            _, neighbours = query_similar(index, embedder, record.path, k=3, exclude_self=False)
            assert neighbours[0].payload["path"] == str(Path(record.path).resolve())
            assert neighbours[0].similarity == pytest.approx(1.0, abs=1e-4)
            assert neighbours[1].similarity < neighbours[0].similarity


def pasted_natural_patches(
    normals: list[Path], natural: list[Path], seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[int, int, int, int]]]:
    """Synthetic defects: a quarter-size natural-image patch pasted into each normal tile.

    Returns the clean images, the pasted ones and each patch's (top, left, height, width).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    clean, pasted, boxes = [], [], []
    for normal, source in zip(normals, natural, strict=False):
        image = np.asarray(Image.open(normal).convert("RGB"))
        height, width = image.shape[:2]
        ph, pw = height // 4, width // 4
        top = int(rng.integers(height // 8, height - ph - height // 8))
        left = int(rng.integers(width // 8, width - pw - width // 8))
        defect = image.copy()
        patch = Image.open(source).convert("RGB").resize((pw, ph))
        defect[top : top + ph, left : left + pw] = np.asarray(patch)
        clean.append(image)
        pasted.append(defect)
        boxes.append((top, left, ph, pw))
    return clean, pasted, boxes


@pytest.mark.slow
def test_efficientad_end_to_end(
    tiny_teacher: TeacherInfo,
    natural_images: Path,
    imagenet_sample: Path,
    train_normals: list[Path],
    test_images: dict[str, list[Path]],
    tmp_path: Path,
) -> None:
    """Train a tiny EfficientAd (24 normals, 300 steps at 128 px): shapes, persistence, and detection.

    Detection is checked on synthetic defects (natural-image patches pasted into held-out normals):
    at this size the real magnetic-tile defects are ranked at chance (measured pairwise AUROC
    0.42-0.64 for 60-300 steps and three seeds), so they are only used for the shape checks; the real-data
    figures are in the model's README (1,500 steps, full data).
    """
    from defect_assist.core.models.registry import create_model, load_model

    model = create_model(
        "efficientad",
        device="cpu",
        teacher=str(tiny_teacher.path),
        penalty_dir=str(natural_images),
        image_size=128,
        max_steps=300,
        val_every=100,
        patience=0,
        time_budget_s=0,
    )
    assert model.config.resize == "squash" and model.config.map_border == "replicate"
    report = model.fit(train_normals, seed=0)
    assert report.details["steps"] == 300 and report.details["teacher"] == "file"
    normals, defects = test_images["normal"], test_images["anomalous"]
    predictions = model.predict(normals + defects)
    assert all(p.ok for p in predictions)
    for path, prediction in zip(normals + defects, predictions, strict=True):
        from PIL import Image

        width, height = Image.open(path).size
        assert prediction.anomaly_map.shape == (height, width) and prediction.mask.shape == (height, width)
        assert 0.0 <= prediction.score <= 1.0

    penalty = {path.name for path in natural_images.rglob("*.JPEG")}
    unseen = [path for path in sorted(imagenet_sample.rglob("*.JPEG"))[8::16] if path.name not in penalty]
    clean, pasted, boxes = pasted_natural_patches(normals, unseen)
    scored = model.predict(clean + pasted)
    clean_raw = np.array([p.raw_score for p in scored[: len(clean)]])
    pasted_raw = np.array([p.raw_score for p in scored[len(clean) :]])
    pairwise_auroc = float((pasted_raw[:, None] > clean_raw[None, :]).mean())
    assert pairwise_auroc >= 0.9, (pasted_raw, clean_raw)
    assert (pasted_raw > clean_raw).sum() >= len(clean) - 1  # each tile scores higher with the patch
    localised = [
        p.anomaly_map[top : top + ph, left : left + pw].mean() > p.anomaly_map.mean()
        for p, (top, left, ph, pw) in zip(scored[len(clean) :], boxes, strict=True)
    ]
    assert sum(localised) >= len(clean) - 1  # the map is higher on the patch than on the tile

    model.save(tmp_path / "m")
    reloaded = load_model(tmp_path / "m", device="cpu")
    assert reloaded.predict_one(defects[0]).raw_score == pytest.approx(
        predictions[len(normals)].raw_score, rel=1e-5
    )
    scores, maps = model._infer(model.load_batch(defects[:2]).tensor)
    assert scores.shape == (2,) and maps.shape == (2, 128, 128)

    payload = torch.load(tmp_path / "m" / "weights.pt", weights_only=False)
    payload["config"].pop("map_border")  # as written before the option existed
    torch.save(payload, tmp_path / "m" / "weights.pt")
    assert load_model(tmp_path / "m", device="cpu").model.map_border == "zeros"
