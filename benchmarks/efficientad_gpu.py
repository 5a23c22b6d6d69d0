"""EfficientAd inference throughput at 256 px: batch 1 and batched, fp32 and fp16 (GPU).

Usage: ``python benchmarks/efficientad_gpu.py [--size small|medium] [--batch 16] [--iters 200] [--cpu]``.
Throughput does not depend on the weights, so the teacher is random and no training is needed.
Without a CUDA device it says so and exits (``--cpu`` measures fp32 on the CPU instead).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from defect_assist.core.models.efficientad.torch_model import build_model


def images_per_second(
    model: torch.nn.Module, batch: int, dtype: torch.dtype, device: str, iters: int
) -> float:
    x = torch.rand(batch, 3, 256, 256, device=device)
    with (
        torch.inference_mode(),
        torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32),
    ):
        for _ in range(max(iters // 10, 3)):
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="small", choices=["small", "medium"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--cpu", action="store_true", help="measure fp32 on the CPU when there is no GPU")
    args = parser.parse_args()
    if torch.cuda.is_available():
        device, dtypes = "cuda", {"fp32": torch.float32, "fp16": torch.float16}
    elif args.cpu:
        device, dtypes, args.iters = "cpu", {"fp32": torch.float32}, min(args.iters, 10)
    else:
        print(
            "No CUDA GPU is available here: EfficientAd GPU throughput could not be measured "
            "(run this script on a GPU worker; --cpu measures the CPU instead)."
        )
        return
    model = build_model(args.size, None).to(device).eval()
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "size": args.size,
        "image_size": 256,
    }
    for name, dtype in dtypes.items():
        for batch in (1, args.batch):
            results[f"{name}_batch{batch}_images_per_s"] = round(
                images_per_second(model, batch, dtype, device, args.iters), 1
            )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
