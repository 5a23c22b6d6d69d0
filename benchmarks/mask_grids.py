"""Cache PatchCore patch-score grids for mask-rule experiments (issue 15).

Fits the served PatchCore (default config, or ``-o key=value``) the way ``AnomalyModel.fit`` does:
the train normals minus a held-out 10 % (same seed and order), scores the held-out normals *before*
they join the bank (as calibration does), absorbs them, then scores every test image. Saves per
image the patch grid, the letterbox placement and (test) the ground-truth mask at ``EVAL_SIZE``, so
``benchmarks/mask_rules.py`` can try smoothing and mask rules in seconds without refitting.

    python benchmarks/mask_grids.py --out artifacts/mask-grids/default.npz [-o layers=...]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch

from defect_assist.core.evaluation import EVAL_SIZE, load_category, read_mask, resize_for_eval, split_of
from defect_assist.core.models.batches import as_sources, readable
from defect_assist.core.models.registry import create_model


def parse_options(pairs: list[str]) -> dict[str, object]:
    import json

    options: dict[str, object] = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


@torch.no_grad()
def grids(
    model, paths: list[Path], features: list[np.ndarray] | None = None
) -> tuple[list[np.ndarray], list[tuple[int, ...]], list[float]]:
    out, placements, scores = [], [], []
    for start in range(0, len(paths), 16):
        loaded = model.load_batch(paths[start : start + 16], start)
        assert not loaded.errors, loaded.errors
        valid = loaded.valid_mask(model.image_size, model.device)
        image_scores, _, grid = model.model.score(loaded.tensor.to(model.device), valid)
        if features is not None:
            embedding = model.model.patch_embedding(loaded.tensor.to(model.device))
            features.extend(embedding.half().cpu().numpy())
        out.extend(grid.float().cpu().numpy())
        scores.extend(image_scores.float().cpu().numpy().tolist())
        placements.extend(
            (p.top, p.left, p.height, p.width, p.original_height, p.original_width) for p in loaded.placements
        )
    return out, placements, scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/datasets/magnetic_tile")
    parser.add_argument("--out", required=True)
    parser.add_argument("-o", "--option", action="append", default=[])
    parser.add_argument("--features", action="store_true", help="also keep patch features (float16)")
    args = parser.parse_args()
    category = load_category(Path(args.data))
    model = create_model("patchcore", device="cpu", **parse_options(args.option))
    sources = readable(as_sources(category.train))
    order = list(range(len(sources)))
    random.Random(0).shuffle(order)
    n_holdout = max(5, min(200, round(len(sources) * 0.1)))
    holdout = [sources[i] for i in order[:n_holdout]]
    train = [sources[i] for i in order[n_holdout:]]
    started = time.perf_counter()
    torch.manual_seed(0)
    model._fit(model._batch_factory(train, 16), len(train), lambda *a: None)
    print(f"fit {time.perf_counter() - started:.0f} s, bank {model.model.memory_bank.shape}")
    holdout_features: list[np.ndarray] | None = [] if args.features else None
    test_features: list[np.ndarray] | None = [] if args.features else None
    holdout_grids, holdout_places, holdout_scores = grids(model, holdout, holdout_features)
    model._extend(model._batch_factory(holdout, 16), len(holdout), lambda *a: None)
    tests = category.test
    test_grids, test_places, test_scores = grids(model, [t.path for t in tests], test_features)
    truths = []
    for test in tests:
        if test.mask_path is None:
            truths.append(np.zeros((EVAL_SIZE, EVAL_SIZE), bool))
        else:
            truths.append(resize_for_eval(read_mask(test.mask_path), is_mask=True).bool().numpy())
    np.savez_compressed(
        args.out,
        holdout_grids=np.stack(holdout_grids),
        holdout_places=np.asarray(holdout_places),
        holdout_scores=np.asarray(holdout_scores),
        test_scores=np.asarray(test_scores),
        test_grids=np.stack(test_grids),
        test_places=np.asarray(test_places),
        truths=np.packbits(np.stack(truths), axis=-1),
        types=np.asarray([t.defect_type for t in tests]),
        splits=np.asarray([split_of(t) for t in tests]),
        names=np.asarray([t.path.name for t in tests]),
        image_size=model.image_size,
        **(
            {"holdout_features": np.stack(holdout_features), "test_features": np.stack(test_features)}
            if holdout_features and test_features
            else {}
        ),
    )
    print(f"saved {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
