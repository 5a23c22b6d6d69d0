"""Progress reporting shared by the commands: ``(stage, done, total)`` callbacks drawn as rich bars."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

ProgressCallback = Callable[[str, int, int], None]  # (stage, done, total)
console = Console(stderr=True)


class RichProgress:
    """A ``(stage, done, total)`` progress callback drawing rich progress bars, one per stage."""

    def __init__(self, enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("{task.description:>12}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> RichProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


def parse_options(options: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs into model options (values parsed as JSON when possible)."""
    parsed: dict[str, Any] = {}
    for option in options or []:
        key, separator, value = option.partition("=")
        if not separator:
            raise ValueError(f"expected key=value, got {option!r}")
        try:
            parsed[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key.strip()] = value
    return parsed
