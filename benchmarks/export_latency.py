"""Exported PatchCore (ONNX Runtime, OpenVINO f32/bf16) against torch eager, same images, same run.

Fits the default PatchCore on ``--train`` magnetic-tile normals, exports it (``core.export``), checks
what is served on ``--n`` test images (score difference, mask IoU, verdicts) and times the inference
without decode (``_infer_with_mask_maps`` on prepared tensors), batch 1 and 8. Goal of issue 18:
exported ≤ 0.5x torch eager. OpenVINO bf16 uses the CPU's AMX / AVX-512 BF16 units where present.

    python benchmarks/export_latency.py [--train 650] [--n 24] [--image-size 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _serving import cpu_model
from inference_overhead import per_image

from defect_assist.core.export import ExportedRuntime, check_parity, export_dir, export_model
from defect_assist.core.models.registry import create_model

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/datasets/magnetic_tile")
    parser.add_argument("--train", type=int, default=650)
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    train = sorted((args.data / "train/good").glob("*.jpg"))[: args.train]
    tests = sorted((args.data / "test").rglob("*.jpg"))
    tests = tests[:: max(1, len(tests) // args.n)][: args.n]
    model = create_model("patchcore", device="cpu", image_size=args.image_size)
    model.fit(train)
    directory = Path(tempfile.mkdtemp()) / "v0001"
    model.save(directory)
    manifest = export_model(model, export_dir(directory))
    flags = Path("/proc/cpuinfo").read_text()
    units = [f for f in ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni") if f in flags]
    print(f"{cpu_model()} ({', '.join(units) or 'no bf16/int8 units'}), {torch.get_num_threads()} threads")
    print(
        f"bank {model.model.memory_bank.shape[0]} rows; export {manifest.export_seconds} s;",
        manifest.versions,
    )
    for engine in ("onnxruntime", "openvino"):
        r = check_parity(model, directory, tests, engine)
        print(
            f"parity {engine}: {r.images} images, max score diff {r.max_score_difference:.1e}, "
            f"min mask IoU {r.min_mask_iou:.4f}, verdicts differing {r.verdicts_differing}"
        )
    engines = {
        "onnxruntime": ExportedRuntime(export_dir(directory), "onnxruntime"),
        "openvino f32": ExportedRuntime(export_dir(directory), "openvino"),
        "openvino bf16": ExportedRuntime(export_dir(directory), "openvino", precision="bf16"),
    }
    for batch in (1, 8):
        chunks = [model.load_batch(tests[i : i + batch]) for i in range(0, len(tests), batch)]
        tensors = [(b.tensor, b.valid_mask(model.image_size, model.device)) for b in chunks]
        model.runtime = None

        def infer(tensors: list = tensors) -> list:
            return [model._infer_with_mask_maps(t, v) for t, v in tensors]

        eager = per_image(infer, len(tests), args.repeats)
        print(
            f"\nbatch {batch}, {len(tests)} images, {args.image_size} px:",
            f"torch eager {eager * 1000:.1f} ms/image",
        )
        for name, runtime in engines.items():
            model.runtime = runtime
            seconds = per_image(infer, len(tests), args.repeats)
            print(
                f"  {name:<14} {seconds * 1000:7.1f} ms/image  {seconds / eager:5.2f}x torch (goal <= 0.5x)"
            )
        model.runtime = None
    started = time.perf_counter()
    model.predict(tests, batch_size=8)
    print(
        "\ntorch predict end to end, batch 8:",
        f"{(time.perf_counter() - started) / len(tests) * 1000:.1f} ms/image",
    )


if __name__ == "__main__":
    main()
