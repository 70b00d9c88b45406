"""The raw measurements of one `helix bench` session, written as they come."""

from __future__ import annotations

import json
import time
from pathlib import Path


class RawRecord:
    """`data` (the raw JSON: info, rows, sweeps), saved to `path` after every row, and the
    session's deadline (rows left after it are recorded as skipped)."""

    def __init__(self, data: dict, path: str | None, deadline_s: float | None):
        self.data, self.path, self.deadline_s = data, Path(path) if path else None, deadline_s
        self._t0 = time.perf_counter()

    def add(self, key: str, row: dict) -> None:
        self.data.setdefault(key, []).append(row)
        self.save()

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1))

    def late(self) -> bool:
        return self.deadline_s is not None and self.elapsed_s() > self.deadline_s

    def elapsed_s(self) -> float:
        return time.perf_counter() - self._t0
