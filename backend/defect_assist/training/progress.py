"""Progress of a training run: stage, overall %, ETA, and facts (mode, version …) for whoever watches."""

from __future__ import annotations

import time
from typing import Any

# Stage → (start %, end %) of the overall progress.
STAGES: dict[str, tuple[float, float]] = {
    "fetch": (0, 5),
    "download": (5, 20),
    "reference": (20, 20),  # the current version scores the check set
    "train": (20, 85),
    "calibrate": (20, 85),
    "features": (20, 60),
    "coreset": (60, 85),
    "evaluate": (85, 90),
    "check": (90, 95),
    "publish": (95, 100),
}


class TrainingProgress:
    """``(stage, done, total)`` callback turning stages into one % and ETA; :meth:`report` receives them.

    The base class keeps the last report in :attr:`facts`; the worker's job progress stores it in
    the rq job, the CLI draws bars. ``min_interval`` throttles reports within a stage.
    """

    def __init__(self, min_interval: float = 0.5) -> None:
        self.min_interval = min_interval
        self.started = time.monotonic()
        self.last_report = 0.0
        self.percent = 0.0
        self.facts: dict[str, Any] = {}

    def report(self, facts: dict[str, Any]) -> None:
        """Receive new facts (stage, percent, eta_s, mode …); override to publish them."""
        self.facts.update(facts)

    def set(self, **facts: Any) -> None:
        """Report facts that are not stage progress (mode, version, error …)."""
        self.report(facts)

    def __call__(self, stage: str, done: int, total: int) -> None:
        low, high = STAGES.get(stage, (self.percent, self.percent))
        fraction = done / total if total else 1.0
        self.percent = max(self.percent, low + (high - low) * min(fraction, 1.0))
        elapsed = time.monotonic() - self.started
        eta = elapsed * (100 - self.percent) / self.percent if self.percent > 1 else None
        now = time.monotonic()
        if now - self.last_report >= self.min_interval or done >= total:
            self.last_report = now
            self.report(
                {
                    "stage": stage,
                    "stage_done": done,
                    "stage_total": total,
                    "percent": round(self.percent, 1),
                    "eta_s": None if eta is None else round(eta, 1),
                    "elapsed_s": round(elapsed, 1),
                }
            )
