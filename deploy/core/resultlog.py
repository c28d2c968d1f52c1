"""An append-only, resumable JSON-lines result log (the robustness checks' counterpart of certify's TSV log).

Format (UTF-8):
    {"meta": {...}}          <- first line: the run's settings (sorted keys); a rerun must match them
    {"key": "...", ...}      <- one JSON object per finished item, written whole, flushed and fsynced
A crash can leave at most one partial last line (no newline): reopening cuts it away, and the run goes on with the keys
not yet in the file, so no row is lost or repeated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from arq_deploy.core.errors import ArqError


class ResultLogMismatchError(ArqError):
    """The log on disk was written by a run with other settings."""


def _normalise(obj: dict) -> dict:
    return json.loads(json.dumps(obj, sort_keys=True))


class JsonlLog:
    """Rows keyed by a string `key`; `meta` (JSON-serialisable) pins the settings the rows depend on."""

    def __init__(self, path: str | os.PathLike, meta: dict):
        self.path = Path(path)
        self.meta = _normalise(meta)
        self._rows: dict[str, dict] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load()
        else:
            self._write_line({"meta": self.meta}, mode="w")

    def _load(self) -> None:
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):  # an interrupted last row
            with open(self.path, "r+b") as f:
                f.truncate(keep)
        lines = data[:keep].decode("utf-8").splitlines()
        try:
            head = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            head = None
        if not isinstance(head, dict) or "meta" not in head:
            raise ResultLogMismatchError(f"{self.path} is not a result log of this tool: move it away or pick "
                                         "another --out")
        if head["meta"] != self.meta:
            diff = sorted(k for k in set(head["meta"]) | set(self.meta) if head["meta"].get(k) != self.meta.get(k))
            raise ResultLogMismatchError(f"{self.path} was written with other settings ({', '.join(diff)} differ): "
                                         "rerun with the same settings or pick another --out")
        for line in lines[1:]:
            row = json.loads(line)
            self._rows[row["key"]] = row

    def _write_line(self, obj: dict, mode: str = "a") -> None:
        with open(self.path, mode, encoding="utf-8") as f:
            f.write(json.dumps(obj, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: str) -> dict | None:
        return self._rows.get(key)

    def rows(self) -> list[dict]:
        """Finished rows in the order they were written."""
        return list(self._rows.values())

    def append(self, key: str, row: dict) -> dict:
        if key in self._rows:
            raise ValueError(f"row {key!r} is already in {self.path}")
        row = _normalise({**row, "key": key})
        self._write_line(row)
        self._rows[key] = row
        return row
