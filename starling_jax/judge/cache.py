"""The append-only cache of answered requests: one JSON object per line, flushed and fsync'd as it is written, so
a run killed at any moment loses at most the line being written (a torn last line is ignored on reading), and a
restarted run re-sends no request whose answer is on disk.

A record: `key` (sha256 of judge spec, template sha256, row content, order index and the order itself), `attempt`
(0 = the first request, n = the n-th re-ask after an unusable reply), `row`, `order`, `reply`, and `ranking`
(presented positions best-first) or `error` (why the reply was not usable)."""

from __future__ import annotations

import json
import os
import threading
from collections import defaultdict
from pathlib import Path


class Cache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[str, list[dict]] = defaultdict(list)
        self.torn_lines = 0
        if self.path.is_file():
            with self.path.open("rb") as f:
                for raw in f:
                    try:
                        record = json.loads(raw)
                        self.records[record["key"]].append(record)
                    except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write
                        self.torn_lines += 1
        for attempts in self.records.values():
            attempts.sort(key=lambda r: r.get("attempt", 0))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = None

    def attempts(self, key: str) -> list[dict]:
        return list(self.records.get(key, ()))

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            if self._file is None:
                torn = self.path.is_file() and self.path.stat().st_size > 0 and _last_byte(self.path) != b"\n"
                self._file = self.path.open("a", encoding="utf-8")
                if torn:  # end a line torn by a kill so the next record starts on its own line
                    self._file.write("\n")
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.records[record["key"]].append(record)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)
