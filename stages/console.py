"""Rank-0 console output: a rich progress bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from revq_pipe.stages.launch import launch

console = Console(stderr=True)


def is_main_process() -> bool:
    return launch().is_main


def log(message: str) -> None:
    """Print one line on rank 0 only."""
    if is_main_process():
        console.print(message, markup=False, highlight=False, soft_wrap=True)


class progress:
    """Context manager: `with progress(total, "encode train") as bar: bar.advance(n)`."""

    def __init__(self, total: int, description: str, enabled: bool = True, unit: str = "img",
                 interval_s: float = 10.0):
        self.total = total
        self.description = description
        self.enabled = enabled and is_main_process()
        self.unit = unit
        self.interval_s = interval_s
        self._rich = self.enabled and sys.stderr.isatty()
        self._done = 0

    def __enter__(self) -> "progress":
        self._start = self._last_line = time.perf_counter()
        if self._rich:
            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, rate="")
        return self

    def advance(self, n: int) -> None:
        self._done += n
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = self._done / max(now - self._start, 1e-9)
        if self._rich:
            self._bar.update(self._task, advance=n, rate=f"{rate:,.1f} {self.unit}/s")
        elif now - self._last_line >= self.interval_s or self._done >= self.total:
            self._last_line = now
            eta = (self.total - self._done) / rate if rate > 0 else float("inf")
            log(f"{self.description}: {self._done}/{self.total} {self.unit} "
                f"{rate:,.1f} {self.unit}/s eta {eta:,.0f}s")

    def __exit__(self, *exc) -> None:
        if self._rich:
            self._bar.stop()
