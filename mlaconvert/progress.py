"""The one progress bar every long job shows: on stderr, so results on stdout stay clean, and gone when done."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(*extra: ProgressColumn, disable: bool = False) -> Progress:
    """A transient bar: task description, bar, done/total, any extra columns, elapsed and remaining time."""
    columns = (TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), *extra, TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=Console(stderr=True), transient=True, disable=disable)
