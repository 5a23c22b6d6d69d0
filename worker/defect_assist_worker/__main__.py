"""``python -m defect_assist_worker [--burst] [--device D] [--name N]``: the worker without the full CLI."""

from __future__ import annotations

import argparse

from defect_assist_worker.worker import run_worker


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m defect_assist_worker", description=__doc__)
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda … (default DEVICE)")
    parser.add_argument("--name", default=None, help="worker name")
    args = parser.parse_args()
    run_worker(burst=args.burst, device=args.device, name=args.name)


if __name__ == "__main__":
    main()
