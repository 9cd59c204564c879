"""Run logs: one JSON object per line, flushed as written, so a crash loses at most a line.

The PS writes the run log; each worker writes its own beside it. A process that restarts (a
resumed PS, a worker that takes its rank again) appends to its log, on a line of its own after
one its predecessor may have left cut short. A float that is not finite
(an η not measured yet or of a frozen block, a diverged loss) is written as null: JSON has no
NaN, and Python's NaN token breaks strict readers such as jq."""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("freezeps.runlog")


class JsonlLog:
    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            cut_short = _ends_mid_line(path)
            self._file = open(path, "a", encoding="utf-8")
            if cut_short:  # a process died writing this log's last line: ours start lines of their own
                self._file.write("\n")

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


def _ends_mid_line(path: Path) -> bool:
    """Whether the file at `path` exists and its last line has no end."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _finite(value):
    """`value` with every float that is not finite replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_jsonl(path: Path) -> list[dict]:
    """A run log's records ([] where there is none). A line that is not JSON was cut short by
    its process's death (a crash loses at most the line it was writing; a restarted process
    appends after it): it is left out, with a warning naming it."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            log.warning("%s line %d is not a JSON record (%s): left out", path, number, e)
    return records
