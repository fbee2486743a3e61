"""The batch loop: queue items a few ahead, follow them over /ws, collect outputs, keep the manifest.

Resume rules (see docs/batch.md): a ``done`` item whose files exist is skipped; a ``queued``
item's prompt id is looked up on the host (still queued or running: wait for it; finished:
collect it; unknown to the host: post it again under the same id, it never ran); ``failed``
items are tried again unless --no-retry-failed; everything else is queued.
"""
from __future__ import annotations

import signal
import time
from collections import OrderedDict, deque
from pathlib import Path

import requests

from ..api.client import PromptRejected
from ..api.history import PromptHistory
from .host import BatchClient, Events, HostUnreachable, rejection_message
from .manifest import DONE, FAILED, PENDING, QUEUED, Manifest, atomic_write
from .progress import Progress
from .spec import Item
from .template import Template

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_HOST, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class Runner:
    def __init__(self, client: BatchClient, manifest: Manifest, items: list[Item], template: Template,
                 model: str | None, out_dir: Path, ahead: int = 3, retry_failed: bool = True,
                 cancel_on_stop: bool = True, progress: bool = True, log=None):
        self.client, self.manifest, self.template, self.model = client, manifest, template, model
        self.items = {item.id: item for item in items}
        self.order = [item.id for item in items]
        self.out_dir = Path(out_dir)
        self.ahead = max(1, ahead)
        self.retry_failed, self.cancel_on_stop = retry_failed, cancel_on_stop
        self.progress_enabled = progress
        self.log_fn = log
        self.events = Events(client.url, client.client_id)
        self.inflight: OrderedDict[str, str] = OrderedDict()  # prompt id -> item id, in queue order
        self.finishing: set[str] = set()  # prompt ids the host said ended; their history may lag
        self.todo: deque[str] = deque()
        self.stop_requested = False
        self.bar: Progress | None = None
        self.stats = {"rendered": 0, "recovered": 0, "failed_now": 0, "encoder_runs": 0}
        self._last_poll = 0.0
        manifest.order = list(self.order)

    # -- output --------------------------------------------------------------------------
    def log(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        elif self.log_fn:
            self.log_fn(line)

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> int:
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._on_signal)
        started = time.monotonic()
        try:
            self._reconcile()
            self.bar = Progress(len(self.order), len(self.order) - len(self.todo) - len(self.inflight),
                                enabled=self.progress_enabled)
            self._loop()
            if self.stop_requested:
                self._wind_down()
        except (HostUnreachable, requests.RequestException) as e:
            self.manifest.save()
            self.log(f"error: lost the host: {e}")
            self.log("the manifest is saved; run the same command again to resume")
            self._close()
            return EXIT_HOST
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.events.close()
        self.manifest.save()
        self._close()
        return self._report(time.monotonic() - started)

    def _close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _on_signal(self, signum, frame):
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        self.log("stopping (again to quit at once): no new prompts; the manifest keeps what is queued")

    def _reconcile(self) -> None:
        """Sort the batch's items into skip / adopt from the host / queue, from the manifest."""
        recover = []
        for item_id in self.order:
            rec = self.manifest.get(item_id) or {}
            status = rec.get("status")
            if status == DONE:
                if self._outputs_exist(rec):
                    continue
                if rec.get("prompt_id"):
                    recover.append(item_id)  # files gone: fetch them again from the host if it still has them
                    continue
            elif status == FAILED and not self.retry_failed:
                continue
            elif status == QUEUED and rec.get("prompt_id"):
                recover.append(item_id)
                continue
            self.manifest.pending(item_id)
        adopted = collected = 0
        if recover:
            running, pending = self.client.queue_state()
            for item_id in recover:
                pid = self.manifest.get(item_id)["prompt_id"]
                if pid in running or pid in pending:
                    self.inflight[pid] = item_id
                    adopted += 1
                    continue
                was_done = self.manifest.status(item_id) == DONE
                entry = self.client.finished(pid)
                if entry is not None and self._finalize(pid, entry, item_id, quiet=True):
                    collected += 1
                elif was_done:  # its files are gone here and on the host: render it again
                    self.manifest.outputs_lost(item_id)
                # else: queued, but the host never got it (killed before the post) or lost it
                # (restarted): it never ran; it is posted again under the same prompt id.
        self.todo = deque(i for i in self.order if self.manifest.status(i) in (PENDING, QUEUED)
                          and self.manifest.get(i).get("prompt_id") not in self.inflight)
        self.stats["recovered"] = collected
        self.manifest.save()
        s = self.manifest.summary()
        if recover or s["done"]:
            self.log(f"resuming: {s['done']} done, {collected} collected from the host, {adopted} still queued "
                     f"there, {len(self.todo)} to queue")

    def _loop(self) -> None:
        while (self.todo or self.inflight) and not self.stop_requested:
            while self.todo and len(self.inflight) < self.ahead and not self.stop_requested:
                self._submit(self.todo.popleft())
            if self.inflight and not self.stop_requested:
                self._wait_step()

    # -- one item ---------------------------------------------------------------------------
    def _submit(self, item_id: str) -> None:
        item = self.items[item_id]
        if not item.image_path.is_file():
            self._fail(item_id, f"image not found: {item.image_path} (from {item.source})")
            return
        if item.image_sha256 is None:
            self._fail(item_id, f"cannot read image {item.image_path} (from {item.source})")
            return
        try:
            image_ref = self.client.upload_image(item.image_path, item.image_sha256)
        except HostUnreachable:
            raise
        except Exception as e:  # noqa: BLE001 - recorded per item
            self._fail(item_id, f"upload failed: {e}")
            return
        prompt = self.template.fill(item, image_ref, self.model,
                                    f"blip_batch/{self.manifest.batch_id[:8]}/{item.id}")
        prompt_id = self.manifest.queued(item_id, item.source, item.params())
        self.manifest.save()  # the prompt id is on disk before the host can run it
        try:
            host_id = self.client.post_prompt(prompt, prompt_id, {"blip_batch": {"batch": self.manifest.batch_id,
                                                                                 "item": item_id}})
        except PromptRejected as e:
            self._fail(item_id, f"rejected by the host: {rejection_message(e.payload)}")
            return
        if host_id != prompt_id:  # an old host that picks its own ids: a crash right here could repeat it
            self.manifest.posted_as(item_id, host_id)
            self.manifest.save()
            prompt_id = host_id
        self.inflight[prompt_id] = item_id

    def _fail(self, item_id: str, message: str) -> None:
        item = self.items.get(item_id)
        extra = {"source": item.source, "params": item.params()} if item else {}
        self.manifest.failed(item_id, message, **extra)
        self.manifest.save()
        self.stats["failed_now"] += 1
        self.log(f"FAILED {item_id}: {message}")
        if self.bar is not None:
            self.bar.advance()

    def _outputs_exist(self, rec: dict) -> bool:
        outs = rec.get("outputs") or []
        return bool(outs) and all((self.out_dir / name).is_file() for name in outs)

    def _finalize(self, prompt_id: str, entry: PromptHistory, item_id: str | None = None,
                  quiet: bool = False) -> bool:
        """Record a finished prompt: download its images (done) or keep its error (failed)."""
        item_id = item_id or self.inflight.pop(prompt_id)
        self.inflight.pop(prompt_id, None)
        self.finishing.discard(prompt_id)
        if not entry.succeeded:
            self._fail(item_id, entry.error_message())
            return False
        outputs = entry.outputs
        saves = self.template.slots.saves  # the template's order: the first save's images come first
        images = [img for node in sorted(outputs, key=lambda n: (saves.index(n) if n in saves else len(saves), n))
                  for img in outputs[node].get("images", []) if img.get("type", "output") == "output"]
        if not images:
            self._fail(item_id, "the prompt finished without saving an image")
            return False
        names = []
        try:
            for k, image in enumerate(images):
                suffix = Path(image["filename"]).suffix or ".png"
                name = f"{item_id}{suffix}" if len(images) == 1 else f"{item_id}_{k}{suffix}"
                atomic_write(self.out_dir / name, self.client.view(image))
                names.append(name)
        except HostUnreachable:
            raise
        except Exception as e:  # noqa: BLE001
            self._fail(item_id, f"could not download the output from the host: {e}")
            return False
        encoder = self.template.encoder_node
        encoder_ran = encoder is not None and encoder not in entry.cached_nodes()
        seconds = entry.execution_seconds()
        self.manifest.done(item_id, names, seconds, encoder_ran, images)
        self.manifest.save()
        self.stats["rendered"] += 1
        self.stats["encoder_runs"] += int(encoder_ran)
        if self.bar is not None:
            self.bar.advance()
        if not quiet:
            self.log(f"done {item_id} -> {', '.join(names)}"
                     + (f" ({seconds:.1f}s{', subject encoded' if encoder_ran else ''})" if seconds else ""))
        return True

    # -- waiting ---------------------------------------------------------------------------
    def _wait_step(self) -> None:
        for kind, data in self.events.receive(0.5):
            prompt_id = data.get("prompt_id")
            if prompt_id not in self.inflight:
                continue
            item_id = self.inflight[prompt_id]
            if kind == "executing":
                if data.get("node") is None:
                    self.finishing.add(prompt_id)
                else:
                    self.bar.set_status(f"{item_id} {data['node']}")
            elif kind == "progress":
                self.bar.set_status(f"{item_id} {data.get('node')} {data.get('value')}/{data.get('max')}")
            elif kind in ("execution_success", "execution_error", "execution_interrupted"):
                self.finishing.add(prompt_id)
        for prompt_id in list(self.finishing):
            entry = self.client.finished(prompt_id)
            if entry is not None:
                self._finalize(prompt_id, entry)
        # Safety net (and the only source without websocket-client): ask the queue.
        if time.monotonic() - self._last_poll > (5.0 if self.events.connected else 1.0):
            self._last_poll = time.monotonic()
            self._poll()

    def _poll(self) -> None:
        running, pending = self.client.queue_state()
        lost = []
        for prompt_id, item_id in list(self.inflight.items()):
            if prompt_id in running or prompt_id in pending:
                continue
            entry = self.client.finished(prompt_id)
            if entry is not None:
                self._finalize(prompt_id, entry)
            else:
                lost.append((prompt_id, item_id))
        for prompt_id, item_id in reversed(lost):  # the host forgot them (restarted): post again, first
            self.inflight.pop(prompt_id)
            self.todo.appendleft(item_id)
            self.log(f"the host lost {item_id} (restarted?); queueing it again")

    def _wind_down(self) -> None:
        """After Ctrl-C: take our not-started prompts off the host queue; running ones are left to finish."""
        if not self.inflight:
            return
        if not self.cancel_on_stop:
            self.log(f"{len(self.inflight)} prompt(s) stay queued on the host; the next run collects them")
            return
        running, pending = self.client.queue_state()
        ours = [pid for pid in self.inflight if pid in pending]
        if ours:
            self.client.delete_pending(ours)
            running, pending = self.client.queue_state()
        cancelled = 0
        for pid in ours:
            if pid in running or pid in pending or self.client.finished(pid) is not None:
                continue  # it started before the delete: the next run collects it
            self.manifest.cancelled(self.inflight.pop(pid))
            cancelled += 1
        self.manifest.save()
        left = len(self.inflight)
        self.log(f"took {cancelled} prompt(s) off the host queue"
                 + (f"; {left} already running there, the next run collects it" if left else ""))

    # -- the end -----------------------------------------------------------------------------
    def _report(self, seconds: float) -> int:
        s = self.manifest.summary()
        failed = [self.manifest.get(i) for i in self.order if self.manifest.status(i) == FAILED]
        subjects = len({self.items[i].subject_key for i in self.order})
        lines = [f"{s['done']}/{s['total']} done, {s['failed']} failed, {s['queued'] + s['pending']} left "
                 f"({self.stats['rendered']} rendered or collected this run in {seconds:.0f}s; subject encoder ran "
                 f"{self.stats['encoder_runs']} time(s) this run, {subjects} distinct subject(s) in the batch)"]
        for rec in failed:
            lines.append(f"  failed {rec['id']}: {rec.get('error')}")
        lines.append(f"manifest: {self.manifest.path}")
        if self.log_fn:
            for line in lines:
                self.log_fn(line)
        if self.stop_requested:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if failed or s["queued"] + s["pending"] else EXIT_OK
