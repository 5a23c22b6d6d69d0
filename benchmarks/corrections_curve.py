"""Served F1 and mask Dice vs the number of corrected defect images (issue 15).

One PatchCore fit on the train normals minus ``HEAD_NORMALS`` (the defect head's negatives, as a
retrain holds normals out). Then for each N: a copy of the model learns from the first N of a fixed
pseudo-random order of the test defect images with their masks (``evaluation.choose_corrected``, the
path ``evaluate --corrected`` and a Label Studio retrain take: tuned rule, cut memory or defect head,
and thresholds from labels)
and is scored on the test images outside the first ``max(N)`` — the same images for every N, never
one it learned from.

    python benchmarks/corrections_curve.py [--data ../shared/datasets/magnetic_tile] [--ns 0,5,10,20,40]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

from defect_assist.core.evaluation import (
    HEAD_NORMALS,
    choose_corrected,
    learn_corrections,
    load_category,
    score_model,
)
from defect_assist.core.models.registry import create_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/datasets/magnetic_tile")
    parser.add_argument("--ns", default="0,5,10,20,40")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ns = [int(n) for n in args.ns.split(",")]
    category = load_category(Path(args.data))
    train = list(category.train)
    random.Random(0).shuffle(train)
    head_normals, train = sorted(train[:HEAD_NORMALS]), sorted(train[HEAD_NORMALS:])
    reserved, tests = choose_corrected(category.test, max(ns))
    started = time.perf_counter()
    base = create_model("patchcore", device="cpu")
    base.fit(train)
    print(
        f"fit on {len(train)} normals in {time.perf_counter() - started:.0f} s; scoring {len(tests)} images"
    )
    rows = []
    for n in ns:
        model = copy.deepcopy(base)
        info = learn_corrections(model, reserved[:n], head_normals) if n else {}
        served = score_model(model, tests)["served"]
        rows.append({"n_corrected": n, **{k: served[k] for k in ("precision", "recall", "f1", "mean_dice")}})
        rows[-1] |= {
            "share_dice_ge_0_5": served["share_dice_ge_0_5"],
            "normals_with_mask": served["normals_with_mask"],
        }
        learned = info.get("defect_head", {})
        rows[-1] |= {k: learned.get(k) for k in ("served", "mask_relative", "rule_dice_on_corrections")}
        for key in ("cuts_dice_leave_one_out", "head_dice_cross_validated"):
            rows[-1][key] = learned.get(key)
        print(
            f"N {n:>2}: precision {served['precision']:.3f} recall {served['recall']:.3f} "
            f"F1 {served['f1']:.3f} Dice {served['mean_dice']:.3f} (≥0.5: {served['share_dice_ge_0_5']:.2f}) "
            f"normals masked {served['normals_with_mask']:.3f}; masks: {learned.get('served', 'rule')} "
            f"(relative {learned.get('mask_relative')}, "
            f"rule LOO Dice {learned.get('rule_dice_on_corrections')}, "
            f"cuts LOO Dice {learned.get('cuts_dice_leave_one_out')}, "
            f"head CV Dice {learned.get('head_dice_cross_validated')})",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
