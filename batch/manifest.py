"""The output folder's manifest.json: one record per item, rewritten atomically on every change.

A record's ``batch`` (seed, size, index), when its prompt rendered several items as one latent
batch, says how to render its image again: that seed and batch size, image ``index`` of the batch.

Record states: ``queued`` (a prompt id was chosen and written here *before* the prompt was
posted, so a crash at any point leaves the id behind for the next run to look up on the host),
``done`` (outputs downloaded, file names listed), ``failed`` (with the error message).
Items of the batch file without a record are pending. ``server`` names the ComfyUI server a
queued item was posted to (where the next run looks its prompt id up) and the one that rendered a
done item; every transition back to pending clears it.

A record changes only through the transition methods of ``Manifest`` (``pending``, ``queued``,
``done``, ``failed``, ...): each sets the state's fields and drops those the new state makes stale.
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
PENDING, QUEUED, DONE, FAILED = "pending", "queued", "done", "failed"


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

    def status(self, item_id: str) -> str | None:
        return self.records.get(item_id, {}).get("status")

    # -- transitions (the caller saves) --------------------------------------------------------
    def _enter(self, item_id: str, status: str, drop: tuple[str, ...] = (), **fields) -> None:
        record = self.records.setdefault(item_id, {"id": item_id})
        record.update(status=status, **fields)
        for key in drop:
            record.pop(key, None)

    def pending(self, item_id: str) -> None:
        """To be queued by this run: a new item, a failed one tried again, a record without a prompt id."""
        self._enter(item_id, PENDING, drop=("error", "server", "batch"))

    def queued(self, item_id: str, source: str, params: dict, server: str | None = None,
               prompt_id: str | None = None, batch: dict | None = None) -> str:
        """About to be posted; returns the prompt id to post it under: ``prompt_id`` when given (the items of
        one latent batch share one), else the recorded one if the record is still queued (it was recorded,
        then the tool died or the host forgot it: the host never ran it), else a new one. A new id counts an
        attempt. ``batch``: seed, size and index of its image in the prompt's latent batch.
        """
        record = self.records.get(item_id) or {}
        recorded = record.get("prompt_id") if record.get("status") == QUEUED else None
        prompt_id = prompt_id or recorded or str(uuid.uuid4())
        self._enter(item_id, QUEUED, drop=("error", "outputs", "finished_at", "render_seconds", "encoder_ran")
                    + (() if server else ("server",)) + (() if batch else ("batch",)), prompt_id=prompt_id,
                    queued_at=now_iso(), attempts=record.get("attempts", 0) + (prompt_id != recorded),
                    source=source, params=params, **({"server": server} if server else {}),
                    **({"batch": batch} if batch else {}))
        return prompt_id

    def posted_as(self, item_id: str, prompt_id: str) -> None:
        """The host took the prompt under an id of its own (hosts too old to take the client's)."""
        self.records[item_id]["prompt_id"] = prompt_id

    def cancelled(self, item_id: str) -> None:
        """Taken off the host's queue before it started (Ctrl-C): the next run queues it under a new id."""
        self._enter(item_id, PENDING, drop=("prompt_id", "queued_at", "server", "batch"))

    def released(self, item_id: str) -> None:
        """Back to the pool from a server that died, or that this run does not use: another server renders it
        under a new prompt id (the old one belongs to that server; whatever it still makes of it is ignored)."""
        self._enter(item_id, PENDING, drop=("prompt_id", "queued_at", "server", "outputs", "batch"))

    def done(self, item_id: str, outputs: list[str], render_seconds: float | None, encoder_ran: bool,
             host_outputs: list[dict], server: str | None = None) -> None:
        """Its images are downloaded into the output folder as ``outputs``; ``server`` rendered them."""
        self._enter(item_id, DONE, drop=("error",), outputs=outputs, finished_at=now_iso(),
                    render_seconds=render_seconds, encoder_ran=encoder_ran, host_outputs=host_outputs,
                    **({"server": server} if server else {}))

    def failed(self, item_id: str, error: str, server: str | None = None, **about) -> None:
        """It cannot be rendered as it stands; ``server``: the one that reported it (None: found here, before
        any server); ``about``: the item's ``source`` and ``params`` when known."""
        self._enter(item_id, FAILED, drop=() if server else ("server",), error=error, finished_at=now_iso(),
                    **({"server": server} if server else {}), **about)

    def outputs_lost(self, item_id: str) -> None:
        """Done, but its images are gone here and on the host: render it again under a new prompt id."""
        self._enter(item_id, PENDING, drop=("prompt_id", "error", "outputs", "server", "batch"))

    def summary(self) -> dict:
        counts = {"total": len(self.order), DONE: 0, FAILED: 0, QUEUED: 0, PENDING: 0}
        for item_id in self.order:
            status = self.records.get(item_id, {}).get("status", PENDING)
            counts[status if status in counts else PENDING] += 1
        return counts

    def save(self) -> None:
        self.header["updated"] = now_iso()
        current = set(self.order)
        items = [self.records.get(i) or {"id": i, "status": PENDING} for i in self.order]
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
