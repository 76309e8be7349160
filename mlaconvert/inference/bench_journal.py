"""The bench's journal: each finished measurement written down as it is made, one JSON line, so that a bench cut
short (a time limit, Ctrl-C, a lost machine) carries on with `--resume` where it stopped instead of measuring all
over again. The first line names the settings and the device; a resume under others is refused, since rows
measured under different settings or on another card would not compare.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlaconvert.errors import MlaconvertError
from mlaconvert.outputs import append_json_line, read_json_lines, write_json_lines


SUFFIX = ".measurements.jsonl"
# Part of a journal's identity: rows written by a bench that measured them otherwise (before each compiled row had
# a warm-up of its own, say) do not resume.
FORMAT = 2


def journal_path(folder: str | Path, stem: str) -> Path:
    """Where the bench whose report is `stem`.json writes down its measurements until that report is written."""
    return Path(folder) / f"{stem}{SUFFIX}"


class BenchJournal:
    def __init__(self, path: Path, identity: dict[str, Any], resume: bool):
        self.path = path
        self.identity = json.loads(json.dumps(identity))  # as it reads back: tuples become lists
        self.done: dict[str, Any] = {}
        if resume:
            self._read()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
        # Rewritten whole: a line a killed process left half-written must not run into the next one.
        write_json_lines(path, [self.identity, *({"key": key, "value": value} for key, value in self.done.items())])

    def _read(self) -> None:
        folder = self.path.parent
        if not self.path.is_file():
            others = sorted(p.name for p in folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []
            hint = (f"; '{folder}' holds {', '.join(others)}: resume with the settings and device that bench ran with"
                    if others else " (run without --resume)")
            raise MlaconvertError(f"nothing to resume: no '{self.path.name}' in '{folder}'{hint}")
        try:
            head, *entries = read_json_lines(self.path)
            done = {entry["key"]: entry["value"] for entry in entries}
        except (MlaconvertError, ValueError, KeyError, TypeError):
            raise MlaconvertError(f"'{self.path}' is not a bench journal; start over with --force") from None
        if not isinstance(head, dict) or head != self.identity:
            head = head if isinstance(head, dict) else {}
            differ = sorted(k for k in self.identity.keys() | head.keys() if head.get(k) != self.identity.get(k))
            raise MlaconvertError(f"'{self.path}' was measured with other settings ({', '.join(differ)} differ); "
                                  "start over with --force")
        self.done = done

    def measured(self, key: str, measure: Callable[[], Any]) -> tuple[Any, bool]:
        """What `key` measured: from the journal if an earlier run wrote it down (then True), else measured now
        and written down before it is returned."""
        if key in self.done:
            return self.done[key], True
        value = measure()
        append_json_line(self.path, {"key": key, "value": value})
        self.done[key] = value
        return value, False
