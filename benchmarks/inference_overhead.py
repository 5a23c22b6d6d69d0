"""Served PatchCore latency over the bare backbone forward, same images, same run (issue 18).

Fits the default PatchCore on ``--train`` magnetic-tile normals (650: the ~28k-row bank a project
serves), then times on ``--n`` test images, batch 1 and batch 8:

- ``decode``: reading and letterboxing the images (``load_batch``), which every path pays;
- ``backbone``: the feature extractor's forward on the prepared tensor (what the backbone costs);
- ``embedding``: backbone + anomalib's 3x3 pooling + layer concatenation;
- ``scored``: embedding + nearest-neighbour search + image score + both maps (``_infer_with_mask_maps``);
- ``predict``: ``model.predict`` end to end (decode, the above, maps back to the image size, mask rule).

Prints each median per image and its ratio to the backbone (goal of issue 18: served ≤ 1.5x backbone).
Then what similarity indexing pays per image: ``predict`` + a second decode and ``embed`` (the two
passes it took before) against ``predict_and_embed`` (one decode, one backbone forward), in images/s.

    python benchmarks/inference_overhead.py [--train 650] [--n 32] [--image-size 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _serving import cpu_model

from defect_assist.core.models.registry import create_model

ROOT = Path(__file__).resolve().parents[1]


def per_image(fn: Callable[[], object], images: int, repeats: int) -> float:
    """Median seconds per image of ``fn`` (which handles ``images`` images), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) / images)
    return statistics.median(times)


@torch.no_grad()
def two_passes(model, tests: list[Path], batch: int = 8) -> None:
    """What indexing did before ``predict_and_embed``: ``predict``, then decode and ``embed`` again."""
    model.predict(tests, batch_size=batch)
    for start in range(0, len(tests), batch):
        model.embed(model.load_batch(tests[start : start + batch]).tensor)


@torch.no_grad()
def time_batch(model, tests: list[Path], batch: int, repeats: int) -> dict[str, float]:
    """Median seconds per image of each stage at one batch size."""
    chunks = [tests[i : i + batch] for i in range(0, len(tests), batch)]
    loaded = [model.load_batch(chunk) for chunk in chunks]
    tensors = [(b.tensor, b.valid_mask(model.image_size, model.device)) for b in loaded]
    extractor, n = model.model.feature_extractor, len(tests)

    def each(step: Callable[[torch.Tensor, torch.Tensor], object]) -> Callable[[], None]:
        return lambda: [step(t, v) for t, v in tensors]

    return {
        "decode": per_image(lambda: [model.load_batch(c) for c in chunks], n, repeats),
        "backbone": per_image(
            each(lambda t, v: extractor(t.contiguous(memory_format=torch.channels_last))), n, repeats
        ),
        "embedding": per_image(each(lambda t, v: model.model.patch_embedding(t)), n, repeats),
        "scored": per_image(each(model._infer_with_mask_maps), n, repeats),
        "predict": per_image(lambda: model.predict(tests, batch_size=batch), n, repeats),
    }


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/datasets/magnetic_tile")
    parser.add_argument("--train", type=int, default=650)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    train = sorted((args.data / "train/good").glob("*.jpg"))[: args.train]
    tests = sorted((args.data / "test").rglob("*.jpg"))
    tests = tests[:: max(1, len(tests) // args.n)][: args.n]
    model = create_model("patchcore", device="cpu", image_size=args.image_size)
    started = time.perf_counter()
    model.fit(train)
    bank = int(model.model.memory_bank.shape[0])
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"fit on {len(train)} normals in {time.perf_counter() - started:.0f} s; bank {bank} rows")

    for batch in (1, 8):
        figures = time_batch(model, tests, batch, args.repeats)
        backbone = figures["backbone"]
        print(f"\nbatch {batch}, {len(tests)} images, {args.image_size} px, median of {args.repeats} passes")
        for name, seconds in figures.items():
            print(f"  {name:<10} {seconds * 1000:8.1f} ms/image   {seconds / backbone:5.2f}x backbone")
        served = figures["predict"] - figures["decode"]
        print(f"  served without decode: {served / backbone:.2f}x backbone (goal <= 1.5x)")

    two = per_image(lambda: two_passes(model, tests), len(tests), args.repeats)
    one = per_image(lambda: model.predict_and_embed(tests), len(tests), args.repeats)
    print(f"\nindexing (score + embedding, batch 8): two passes {1 / two:.1f} images/s, ", end="")
    print(f"one pass {1 / one:.1f} images/s: {two / one:.2f}x")


if __name__ == "__main__":
    main()
