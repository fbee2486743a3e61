"""The output folder's manifest.json: one record per item, rewritten atomically on every change.

Record states: ``queued`` (a prompt id was chosen and written here *before* the prompt was
posted, so a crash at any point leaves the id behind for the next run to look up on the host),
``done`` (outputs downloaded, file names listed), ``failed`` (with the error message).
Items of the batch file without a record are pending.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from pathlib import Path

NAME = "manifest.json"
VERSION = 1


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class Manifest:
    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / NAME
        self.header: dict = {}
        self.records: dict[str, dict] = {}
        self.order: list[str] = []  # the current batch's ids, in queue order

    def load(self) -> "Manifest":
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise RuntimeError(f"cannot read {self.path}: {e}") from e
            if data.get("version") != VERSION:
                raise RuntimeError(f"{self.path}: unknown manifest version {data.get('version')}")
            self.header = {k: v for k, v in data.items() if k not in ("items", "summary")}
            self.records = {r["id"]: r for r in data.get("items", [])}
        if not self.header.get("batch_id"):
            self.header.update(version=VERSION, batch_id=uuid.uuid4().hex, created=now_iso())
        return self

    @property
    def batch_id(self) -> str:
        return self.header["batch_id"]

    def get(self, item_id: str) -> dict | None:
        return self.records.get(item_id)

    def update(self, item_id: str, **fields) -> dict:
        record = self.records.setdefault(item_id, {"id": item_id})
        record.update(fields)
        return record

    def forget(self, item_id: str, *keys: str) -> None:
        for key in keys:
            self.records.get(item_id, {}).pop(key, None)

    def summary(self) -> dict:
        counts = {"total": len(self.order), "done": 0, "failed": 0, "queued": 0, "pending": 0}
        for item_id in self.order:
            status = self.records.get(item_id, {}).get("status", "pending")
            counts[status if status in counts else "pending"] += 1
        return counts

    def save(self) -> None:
        self.header["updated"] = now_iso()
        current = set(self.order)
        items = [self.records.get(i) or {"id": i, "status": "pending"} for i in self.order]
        items += [r for i, r in self.records.items() if i not in current]  # earlier batch files' items
        data = {**self.header, "summary": self.summary(), "items": items}
        atomic_write(self.path, (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode())


class FolderLock:
    """An exclusive lock on the output folder, so two runs never work on one manifest.

    The OS drops it when the process dies (also on SIGKILL). No-op where fcntl is missing.
    """

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".lock"
        self.file = None

    def acquire(self) -> bool:
        try:
            import fcntl
        except ImportError:
            return True
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            self.file = None
            return False
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return True

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
