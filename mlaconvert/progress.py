"""The one progress display every long job shows, on stderr so results on stdout stay clean.

On a terminal: a transient bar. Piped or logged (stdout or stderr not a terminal) a live bar would print
nothing at all, so instead each task gets a plain line every few seconds: done/total, rate and time left.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

PLAIN_EVERY_S = 5.0


class PlainProgress(Progress):
    """A Progress that draws nothing and prints one line per task at most every `every` seconds."""

    def __init__(self, *columns: ProgressColumn, console: Console, every: float) -> None:
        super().__init__(*columns, console=console, disable=True)  # tasks are tracked, nothing is drawn
        self._out, self._every, self._printed = console, every, {}
        self._ended: set[TaskID] = set()

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> TaskID:
        task = super().add_task(description, *args, **kwargs)
        self._printed[task] = time.monotonic()
        return task

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._report(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._report(task_id)

    def _report(self, task_id: TaskID) -> None:
        now = time.monotonic()
        task = self._tasks[task_id]
        # The last step always gets its line (once): a log ending at 1/2 would read as a job that stalled.
        ending = task.finished and task_id not in self._ended
        if now - self._printed[task_id] < self._every and not ending:
            return
        self._printed[task_id] = now
        if task.finished:
            self._ended.add(task_id)
        rate = f"{task.speed:.3g}/s" if task.speed else "-"
        left = f"{task.time_remaining:.0f} s left" if task.time_remaining is not None else "time left unknown"
        info = task.fields.get("info")
        line = f"{task.description} {task.completed:g}/{task.total:g}, {rate}, {left}" + (f", {info}" if info else "")
        self._out.print(line, highlight=False, markup=False, soft_wrap=True)


def progress_bar(*extra: ProgressColumn, disable: bool = False, every: float | None = None) -> Progress:
    """A transient bar (task description, bar, done/total, extra columns, elapsed and remaining time) on a
    terminal; plain lines every `every` seconds when the output is piped or logged."""
    console = Console(stderr=True)
    if not disable and not (sys.stdout.isatty() and console.is_terminal):
        return PlainProgress(console=console, every=PLAIN_EVERY_S if every is None else every)
    columns = (TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), *extra, TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console, transient=True, disable=disable)
