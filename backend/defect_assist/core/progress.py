"""Console output shared by the commands: ``(stage, done, total)`` progress callbacks drawn as rich
bars (or a line per stage start and end when not at a terminal), and tables printed with every value
whole at any width."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

ProgressCallback = Callable[[str, int, int], None]  # (stage, done, total)
console = Console(stderr=True)
_STDERR = console


class RichProgress:
    """A ``(stage, done, total)`` progress callback: one live rich bar per stage at a terminal; elsewhere
    (logs, CI, pipes, the stack's child processes) a line when a stage starts and one when it ends, with
    its elapsed seconds, instead of a line per update."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.console = _STDERR if console is None else console
        self.enabled = enabled
        self.live = self.console.is_terminal and not self.console.is_dumb_terminal
        self.progress = Progress(
            TextColumn("{task.description:>12}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not (enabled and self.live),
            transient=False,
        )
        self.tasks: dict[str, Any] = {}
        # stage → [done, total, started (monotonic), ended] of the stage's current run (lines mode)
        self.runs: dict[str, list[Any]] = {}

    def __enter__(self) -> RichProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)
        for stage, (done, total, started, ended) in self.runs.items():
            if not ended:  # interrupted, or the caller never reported the end
                self._line(f"{stage} stopped at {done}/{total} after {time.monotonic() - started:.1f}s")
        self.runs.clear()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.live:
            if stage not in self.tasks:
                self.tasks[stage] = self.progress.add_task(stage, total=total)
            self.progress.update(self.tasks[stage], completed=done, total=total)
            return
        run = self.runs.get(stage)
        if run is None or (run[3] and done < run[0]):  # first report, or the stage runs again
            run = self.runs[stage] = [done, total, time.monotonic(), False]
            if done < total:
                self._line(f"{stage} started: {done}/{total}")
        elif run[3]:
            return  # repeated end report
        run[0], run[1] = done, total
        if done >= total:
            run[3] = True
            self._line(f"{stage} done: {done}/{total} in {time.monotonic() - run[2]:.1f}s")

    def print(self, *objects: Any) -> None:
        """Print above the live bars (or as a plain line): messages between progress updates."""
        if self.enabled:
            self.console.print(*objects)

    def _line(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, markup=False)


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


FOLDED_MIN = 6  # the narrowest a column folds to before the one-line (``no_wrap``) columns fold too
ROOMY = 16  # a layout is chosen when its folding columns get this much (or all they need)


def _needed_width(table: Table, console: Console, strict: bool) -> int:
    """Width ``table`` needs with its ``no_wrap`` columns on one line and the others folded to lines of
    ``FOLDED_MIN`` characters; ``strict``: only the columns marked ``overflow="fold"`` (paths, reasons)
    fold, to lines of ``ROOMY`` characters, the others are on one line."""
    options = console.options.update_width(1_000_000)
    left, right = table.padding[3], table.padding[1]
    count = len(table.columns)
    width = (count - 1 + 2 * table.show_edge) if table.box else 0
    width += count * (left + right) - (0 if table.pad_edge else left + right)
    for column in table.columns:
        sizes = [Measurement.get(console, options, cell) for cell in (column.header, *column.cells)]
        longest_line = max(size.maximum for size in sizes)
        if column.no_wrap or (strict and column.overflow != "fold"):
            width += longest_line
        else:
            width += min(longest_line, ROOMY if strict else FOLDED_MIN)
    return width


def print_table(out: Console, *layouts: Table) -> None:
    """Print a table with every value whole (never cut with "…"), given one or more layouts of it,
    widest first.

    At a terminal: the first layout that fits the width with only its ``overflow="fold"`` columns
    (paths, reasons) wrapping, given ``ROOMY`` characters; else the last one, wrapping where it must
    (its ``no_wrap`` columns kept on one line while the others keep ``FOLDED_MIN`` characters).
    Not at a terminal (piped, logs): the first layout as wide as its longest row, one line a row.
    """
    if not out.is_terminal:
        table = layouts[0]
        natural = Measurement.get(out, out.options.update_width(1_000_000), table).maximum
        wide = Console(file=out.file, width=max(natural, out.width), no_color=out.no_color, highlight=False)
        wide.print(_folding(table), crop=False)
        return
    width = out.width
    for layout in layouts:
        if _needed_width(layout, out, strict=True) <= width:
            for column in layout.columns:
                column.no_wrap = column.no_wrap or column.overflow != "fold"
            out.print(_folding(layout))
            return
    table = layouts[-1]
    if _needed_width(table, out, strict=False) > width:
        for column in table.columns:
            column.no_wrap = False
    out.print(_folding(table))


def _folding(table: Table) -> Table:
    """``table`` with every column folding what does not fit rather than cutting it with "…"."""
    for column in table.columns:
        column.overflow = "fold"
    return table
