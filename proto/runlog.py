"""Run logs: one JSON object per line, flushed as written, so a crash loses at most a line.

The PS writes the run log; each worker writes its own beside it."""
from __future__ import annotations

import json
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
        line = json.dumps({"time": round(time.time(), 6), **record}, sort_keys=True)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
