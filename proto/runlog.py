"""Run logs: one JSON object per line, flushed as written, so a crash loses at most a line.

The PS writes the run log; each worker writes its own beside it. A float that is not finite
(an η not measured yet or of a frozen block, a diverged loss) is written as null: JSON has no
NaN, and Python's NaN token breaks strict readers such as jq."""
from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path


class JsonlLog:
    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._file is None:
            return
        line = json.dumps(_finite({"time": round(time.time(), 6), **record}), sort_keys=True, allow_nan=False)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _finite(value):
    """`value` with every float that is not finite replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
