"""The batch loop: queue items a few ahead on each server, follow them over /ws, collect outputs, keep the manifest.

Several servers are fed by pull: each keeps ``ahead`` prompts queued and takes the next item from the
pool when one finishes; a server keeps the subject it has (its cache holds the encoded subject) while
that subject has items left. A server that stops answering is down: its prompts stay its own for
``retry_for`` seconds (it may come back), then go back to the pool for the others; a server that
answers again is used again. Only when every server has been down for ``retry_for`` does the run stop.

Resume rules (see docs/batch.md): a ``done`` item whose files exist is skipped; a ``queued``
item's prompt id is looked up on the server the manifest names (still queued or running: wait for
it; finished: collect it; unknown to it: post it again under the same id, it never ran); a queued
item whose server is not in this run goes back to the pool under a new id; ``failed`` items are
tried again unless --no-retry-failed; everything else is queued.

With ``batch_size`` above 1, items that differ only in their seed are rendered together, as one prompt
whose latent batch holds them (one UNet call per step for all of them): the prompt takes the first
item's seed, image k of its batch is item k's, and each record keeps ``batch`` (seed, size, index) to
render that image again. Such a prompt's items share its prompt id, and move between states together.
"""
from __future__ import annotations

import json
import signal
import time
import uuid
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
PROBE_EVERY = 2.0  # seconds between two knocks on a server that is down
MAX_RESTARTS = 3  # a Ray actor's server started again more often than this in one run is not used again
MAX_POST_ERRORS = 3  # a server that answers this many posts in a row with HTTP 5xx is not used again

LaneTrouble = (HostUnreachable, requests.RequestException)


def server_label(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


class Lane:
    """One ComfyUI server of the run: its client, its /ws stream, the prompts it holds, whether it answers."""

    def __init__(self, url: str | None, client_id: str, check=None, down: bool = False, source=None,
                 name: str | None = None):
        self.client_id, self.name = client_id, name
        self.source = source  # a Ray actor's: poll() -> its server's URL, which changes when it restarts it
        self.started = url is not None  # False: its actor has not given a URL yet
        self.point(url or f"http://{name}.not-started")
        self.inflight: OrderedDict[str, list[str]] = OrderedDict()  # prompt id -> its item ids, in queue order
        self.finishing: set[str] = set()  # prompt ids the host said ended; their history may lag
        self.subject = None  # the subject of the items it was last given
        self.check = check  # run when it first answers: None if it can render the batch, else why not
        self.retired = False
        self.down_since = time.monotonic() if down else None
        self.next_probe = 0.0
        self.last_poll = 0.0
        self.released: list[str] = []  # prompt ids given to other servers while it was down
        self.restarts = 0  # how often its Ray actor started its server again in this run
        self.rendered = 0
        self.busy_since: float | None = None
        self.post_errors = 0  # /prompt posts in a row the server answered with an error of its own (5xx)

    def point(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.label = f"{self.name}@{server_label(self.url)}" if self.name else server_label(self.url)
        self.client = BatchClient(self.url, self.client_id, retry_for=0)  # one try: the run decides what fails
        self.events = Events(self.url, self.client_id)

    @property
    def up(self) -> bool:
        return self.down_since is None and not self.retired

    def rate(self) -> float:
        """Items per minute since it got its first item in this run."""
        if not self.rendered or self.busy_since is None:
            return 0.0
        return 60.0 * self.rendered / max(time.monotonic() - self.busy_since, 1e-6)


class Pool:
    """Items waiting for a server, grouped by subject, subjects in queue order."""

    def __init__(self, subject_of):
        self.subject_of = subject_of
        self.groups: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def add_all(self, item_ids, front: bool = False) -> None:
        for item_id in (reversed(item_ids) if front else item_ids):
            self.add(item_id, front)

    def __bool__(self) -> bool:
        return bool(self.groups)

    def add(self, item_id: str, front: bool = False) -> None:
        key = self.subject_of(item_id)
        group = self.groups.setdefault(key, deque())
        if front:
            group.appendleft(item_id)
            self.groups.move_to_end(key, last=False)
        else:
            group.append(item_id)

    def take(self, lane: Lane, held: set, size: int = 1, render_key=None) -> list[str]:
        """The next items for ``lane``: its own subject's; else a subject no other busy server holds; else a
        share of the subject with the most items left (an idle server helps rather than waits). The first
        item, and up to ``size - 1`` more of its subject with the same ``render_key`` (all but the seed)."""
        key = lane.subject if lane.subject in self.groups else None
        if key is None:
            key = next((k for k in self.groups if k not in held), None)
        if key is None:
            key = max(self.groups, key=lambda k: len(self.groups[k]))
        group = self.groups[key]
        taken = [group.popleft()]
        if size > 1:
            same = render_key(taken[0])
            for item_id in [i for i in group if render_key(i) == same][:size - 1]:
                group.remove(item_id)
                taken.append(item_id)
        if not group:
            del self.groups[key]
        lane.subject = key
        return taken


class Runner:
    def __init__(self, lanes: list[Lane], manifest: Manifest, items: list[Item], template: Template,
                 model: str | None, out_dir: Path, ahead: int = 3, retry_failed: bool = True,
                 cancel_on_stop: bool = True, progress: bool = True, log=None, retry_for: float = 120.0,
                 batch_size: int = 1):
        self.lanes, self.manifest, self.template, self.model = lanes, manifest, template, model
        self.by_url = {lane.url: lane for lane in lanes}
        self.items = {item.id: item for item in items}
        self.order = [item.id for item in items]
        self.out_dir = Path(out_dir)
        self.ahead = max(1, ahead)
        self.retry_failed, self.cancel_on_stop = retry_failed, cancel_on_stop
        self.retry_for = retry_for
        self.batch_size = max(1, batch_size)
        self.posted: set[str] = set()  # prompt ids this run has posted (one id never carries two prompts)
        self.progress_enabled = progress
        self.log_fn = log
        self.pool = Pool(lambda item_id: self.items[item_id].subject_key)
        self.stop_requested = False
        self.bar: Progress | None = None
        self.stats = {"rendered": 0, "recovered": 0, "failed_now": 0, "encoder_runs": 0}
        self.several = len(lanes) > 1
        manifest.order = list(self.order)

    # -- output --------------------------------------------------------------------------
    def log(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        elif self.log_fn:
            self.log_fn(line)

    def _inflight(self) -> int:
        return sum(len(items) for lane in self.lanes for items in lane.inflight.values())

    def _render_key(self, item_id: str) -> tuple:
        params = self.items[item_id].params()
        params.pop("seed")
        return tuple(sorted(params.items()))

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> int:
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._on_signal)
        started = time.monotonic()
        try:
            self._reconcile()
            self.bar = Progress(len(self.order), len(self.order) - len(self.pool) - self._inflight(),
                                enabled=self.progress_enabled)
            self._loop()
            if self.stop_requested:
                self._wind_down()
        except LaneTrouble as e:
            self.manifest.save()
            self.log(f"error: lost the host: {e}")
            self.log("the manifest is saved; run the same command again to resume")
            self._close()
            return EXIT_HOST
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for lane in self.lanes:
                lane.events.close()
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

    def _guard(self, lane: Lane, fn, *args) -> bool:
        """Run ``fn``; a server that does not answer is marked down instead of ending the run."""
        try:
            fn(*args)
            return True
        except LaneTrouble as e:
            self._lane_down(lane, e)
            return False

    def _lane_down(self, lane: Lane, error) -> None:
        if lane.down_since is None:
            lane.down_since = time.monotonic()
            lane.next_probe = lane.down_since + PROBE_EVERY
            lane.events.close()
            self.log(f"server {lane.label} does not answer ({str(error)[:160]}); "
                     f"{len(lane.inflight)} prompt(s) wait for it up to {self.retry_for:.0f}s")

    # -- resume ----------------------------------------------------------------------------
    def _reconcile(self) -> None:
        """Sort the batch's items into skip / adopt from a server / queue, from the manifest."""
        recover: OrderedDict[str, list[str]] = OrderedDict()  # prompt id -> its items
        changed = []
        for item_id in self.order:
            rec = self.manifest.get(item_id) or {}
            status = rec.get("status")
            if "params" in rec and rec["params"] != json.loads(json.dumps(self.items[item_id].params())):
                # an item with its own id edited in the batch file: what was recorded is another render
                changed.append(item_id)
                self.manifest.released(item_id)
                continue
            if status == DONE:
                if self._outputs_exist(rec):
                    continue
                if rec.get("prompt_id"):  # files gone: fetch them again from the host if it still has them
                    recover.setdefault(rec["prompt_id"], []).append(item_id)
                    continue
            elif status == FAILED and not self.retry_failed:
                continue
            elif status == QUEUED and rec.get("prompt_id"):
                recover.setdefault(rec["prompt_id"], []).append(item_id)
                continue
            self.manifest.pending(item_id)
        if changed:
            self.log(f"{len(changed)} item(s) changed since the manifest recorded them, rendered again: "
                     + ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))
        counts = {"adopted": 0, "collected": 0, "elsewhere": 0}
        queues: dict[str, tuple[set, set]] = {}
        for pid, item_ids in recover.items():
            item_ids.sort(key=lambda i: (self.manifest.get(i).get("batch") or {}).get("index", 0))
            self._recover(pid, item_ids, queues, counts)
        held = {pid for lane in self.lanes for pid in lane.inflight}
        for item_id in self.order:
            rec = self.manifest.get(item_id)
            if rec["status"] in (PENDING, QUEUED) and rec.get("prompt_id") not in held:
                self.pool.add(item_id)
        self.stats["recovered"] = counts["collected"]
        self.manifest.save()
        s = self.manifest.summary()
        if recover or s["done"]:
            moved = f", {counts['elsewhere']} queued on a server not in this run (queued again)" \
                if counts["elsewhere"] else ""
            self.log(f"resuming: {s['done']} done, {counts['collected']} collected from the host, "
                     f"{counts['adopted']} still queued there{moved}, {len(self.pool)} to queue")

    def _recover(self, pid: str, item_ids: list[str], queues: dict, counts: dict) -> None:
        """A queued prompt's items (or done ones whose files are gone): look its id up where it was posted."""
        rec = self.manifest.get(item_ids[0])
        server = rec.get("server")
        was_done = [i for i in item_ids if self.manifest.status(i) == DONE]
        if server and server.rstrip("/") not in self.by_url:
            # its prompt id means nothing to the servers of this run: render it here under a new id
            for item_id in item_ids:
                self.manifest.released(item_id)
            counts["elsewhere"] += len(item_ids) - len(was_done)
            return
        # where it was posted; an older manifest names no server: ask each
        lanes = [self.by_url[server.rstrip("/")]] if server else self.lanes
        for lane in lanes:
            if not lane.up:
                if server:  # it may come back within --retry-for; else the items go back to the pool
                    lane.inflight[pid] = item_ids
                    return
                continue
            try:
                if lane.url not in queues:
                    queues[lane.url] = lane.client.queue_state()
                running, pending = queues[lane.url]
                if pid in running or pid in pending:
                    lane.inflight[pid] = item_ids
                    counts["adopted"] += len(item_ids)
                    return
                entry = lane.client.finished(pid)
                if entry is not None:
                    if self._finalize(lane, pid, entry, item_ids, quiet=True):
                        counts["collected"] += len(item_ids)
                    return
            except LaneTrouble as e:
                self._lane_down(lane, e)
                if server:
                    lane.inflight[pid] = item_ids
                    return
        for item_id in was_done:  # its files are gone here and on the host: render it again
            self.manifest.outputs_lost(item_id)
        # else: queued, but the host never got it (killed before the post) or lost it (restarted):
        # it never ran, so it is posted again under the same prompt id (unless this run posted that id).

    # -- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while (self.pool or self._inflight()) and not self.stop_requested:
            self._check_lanes()
            for lane in self.lanes:
                while self.pool and lane.up and len(lane.inflight) < self.ahead and not self.stop_requested:
                    held = {other.subject for other in self.lanes if other is not lane and other.up and other.inflight}
                    item_ids = self.pool.take(lane, held, self.batch_size, self._render_key)
                    self._guard(lane, self._submit, lane, item_ids)
            if not self.stop_requested:
                self._wait_step()

    def _check_lanes(self) -> None:
        """Knock on servers that are down; give their prompts to the others after --retry-for; stop when all
        of them have been down that long."""
        now = time.monotonic()
        for lane in self.lanes:
            if lane.down_since is None or lane.retired or now < lane.next_probe:
                continue
            lane.next_probe = now + PROBE_EVERY
            if lane.source is not None:
                url = lane.source.poll()
                if url is None:
                    continue  # its actor is (re)starting the server
                if url.rstrip("/") != lane.url:
                    self._moved(lane, url)
                    if lane.retired:
                        continue
            knocked = time.monotonic()
            try:
                lane.client.queue_state(probe=True)
            except LaneTrouble:
                # a server that holds the connection open costs a whole timeout per knock: knock less often
                lane.next_probe = time.monotonic() + PROBE_EVERY + 2 * (time.monotonic() - knocked)
                continue
            self._lane_up(lane)
        live = [lane for lane in self.lanes if not lane.retired]
        if not live:
            raise HostUnreachable("no server of this run can render the batch")
        if all(lane.down_since is not None and now - lane.down_since >= self.retry_for for lane in live):
            raise HostUnreachable(f"{', '.join(lane.url for lane in live)} did not answer for {self.retry_for:.0f}s")
        if not any(lane.up for lane in live):
            return  # nobody to give the prompts to: they stay where they are, the run may still end with 3
        for lane in live:
            if lane.inflight and lane.down_since is not None and now - lane.down_since >= self.retry_for:
                self._release(lane, f"down for {now - lane.down_since:.0f}s")

    def _release(self, lane: Lane, why: str) -> None:
        """Its prompts go back to the pool (front), each under a new prompt id on whichever server takes it."""
        moved = list(lane.inflight.items())
        for pid, item_ids in reversed(moved):
            for item_id in item_ids:
                if self.manifest.status(item_id) in (QUEUED, DONE):
                    self.manifest.released(item_id)
            self.pool.add_all(item_ids, front=True)
        lane.released += [pid for pid, _ in moved]
        lane.inflight.clear()
        lane.finishing.clear()
        self.manifest.save()
        self.log(f"server {lane.label} {why}: its {len(moved)} prompt(s) go to the other server(s)")

    def _moved(self, lane: Lane, url: str) -> None:
        """Its actor started a new server: a new URL and an empty queue; the old server's prompts are gone."""
        old = lane.label
        self.by_url.pop(lane.url, None)
        lane.events.close()
        lane.point(url)
        self.by_url[lane.url] = lane
        if not lane.started:  # its first server, later than the others
            lane.started = True
            return
        lane.released = []  # the old server took them with it
        lane.restarts += 1
        if lane.inflight:
            self._release(lane, f"(was {old}) was started again by its Ray actor")
        else:
            self.log(f"server {lane.label} was started again by its Ray actor (was {old})")
        if lane.restarts > MAX_RESTARTS:
            lane.retired = True
            self.log(f"server {lane.label} is not used again: it died {lane.restarts} times in this run (out of "
                     "memory? its log is in blip-batch-actor*/server.log in the temporary folder of its machine)")

    def _lane_up(self, lane: Lane) -> None:
        if lane.check is not None:  # first answer of a server that was down at the start
            try:
                problem = lane.check(lane.client)
            except LaneTrouble:
                return
            lane.check = None
            if problem:
                lane.retired = True
                self.log(f"server {lane.label} is not used: {problem}")
                if lane.inflight:
                    self._release(lane, "is not used")
                return
        lane.down_since = None
        self.log(f"server {lane.label} answers again" if lane.rendered or lane.released
                 else f"server {lane.label} answers")
        if lane.released:  # whatever of ours it still holds was given to others: take it off its queue
            try:
                lane.client.delete_pending(lane.released)
            except LaneTrouble:
                pass
            lane.released = []

    # -- one item ---------------------------------------------------------------------------
    def _submit(self, lane: Lane, item_ids: list[str]) -> None:
        """Post one prompt that renders ``item_ids`` (items alike but for the seed) as one latent batch."""
        item = self.items[item_ids[0]]
        if not item.image_path.is_file():
            self._fail(item_ids, f"image not found: {item.image_path} (from {item.source})")
            return
        if item.image_sha256 is None:
            self._fail(item_ids, f"cannot read image {item.image_path} (from {item.source})")
            return
        try:
            image_ref = lane.client.upload_image(item.image_path, item.image_sha256)
        except LaneTrouble:
            self.pool.add_all(item_ids, front=True)
            raise
        except Exception as e:  # noqa: BLE001 - recorded per item
            self._fail(item_ids, f"upload failed: {e}", lane)
            return
        prompt = self.template.fill(item, image_ref, self.model,
                                    f"blip_batch/{self.manifest.batch_id[:8]}/{item.id}", batch_size=len(item_ids))
        first = self.manifest.get(item.id) or {}
        # the id recorded for a prompt the host never got is posted again, unless this run already used it
        prompt_id = first.get("prompt_id") if first.get("status") == QUEUED else None
        if prompt_id is None or prompt_id in self.posted:
            prompt_id = str(uuid.uuid4())
        batch = len(item_ids) > 1
        for k, item_id in enumerate(item_ids):
            prompt_id = self.manifest.queued(
                item_id, self.items[item_id].source, self.items[item_id].params(), server=lane.url,
                prompt_id=prompt_id, batch={"seed": item.seed, "size": len(item_ids), "index": k} if batch else None)
        self.posted.add(prompt_id)
        self.manifest.save()  # the prompt id is on disk before the host can run it
        lane.inflight[prompt_id] = list(item_ids)  # a post that fails half-way is sorted out by the next poll
        if lane.busy_since is None:
            lane.busy_since = time.monotonic()
        tag = {"batch": self.manifest.batch_id, "item": item_ids[0]}
        if batch:
            tag["items"] = list(item_ids)
        try:
            host_id = lane.client.post_prompt(prompt, prompt_id, {"blip_batch": tag})
        except PromptRejected as e:
            lane.post_errors = 0
            lane.inflight.pop(prompt_id, None)
            self._fail(item_ids, f"rejected by the host: {rejection_message(e.payload)}", lane)
            return
        except requests.HTTPError as e:   # the server's own error (5xx): not queued there, not the item's fault
            lane.inflight.pop(prompt_id, None)
            for item_id in item_ids:
                self.manifest.released(item_id)
            self.pool.add_all(item_ids, front=True)
            self.manifest.save()
            lane.post_errors += 1
            if lane.post_errors >= MAX_POST_ERRORS:   # the last server retired ends the run (exit 3)
                lane.retired = True
                self.log(f"server {lane.label} is not used again: it answered {lane.post_errors} prompts in a row "
                         f"with an error of its own ({str(e)[:160]})")
                if lane.inflight:
                    self._release(lane, "is not used")
                return
            raise
        lane.post_errors = 0
        if host_id != prompt_id:  # an old host that picks its own ids: a crash right here could repeat it
            for item_id in item_ids:
                self.manifest.posted_as(item_id, host_id)
            self.manifest.save()
            lane.inflight.pop(prompt_id, None)
            lane.inflight[host_id] = list(item_ids)

    def _fail(self, item_ids: list[str], message: str, lane: Lane | None = None) -> None:
        for item_id in item_ids:
            item = self.items.get(item_id)
            extra = {"source": item.source, "params": item.params()} if item else {}
            self.manifest.failed(item_id, message, server=lane.url if lane else None, **extra)
            self.stats["failed_now"] += 1
            self.log(f"FAILED {item_id}: {message}" + (f" (on {lane.label})" if lane and self.several else ""))
            if self.bar is not None:
                self.bar.advance()
        self.manifest.save()

    def _outputs_exist(self, rec: dict) -> bool:
        outs = rec.get("outputs") or []
        return bool(outs) and all((self.out_dir / name).is_file() for name in outs)

    def _images_of(self, item_ids: list[str], outputs: dict) -> dict[str, list[dict]] | str:
        """Each item's output images (first save's first), or why they cannot be told apart.

        One item: all images of the prompt. A latent batch of n: every save holds n images in batch
        order, and item k takes image k of each (its record's batch index)."""
        saves = self.template.slots.saves  # the template's order: the first save's images come first
        per_save = [[img for img in outputs[node].get("images", []) if img.get("type", "output") == "output"]
                    for node in sorted(outputs, key=lambda n: (saves.index(n) if n in saves else len(saves), n))]
        per_save = [images for images in per_save if images]
        if not per_save:
            return "the prompt finished without saving an image"
        batch = (self.manifest.get(item_ids[0]) or {}).get("batch")
        if not batch:
            return {item_ids[0]: [img for images in per_save for img in images]}
        if any(len(images) != batch["size"] for images in per_save):
            return (f"a save gave {[len(images) for images in per_save]} image(s) for a latent batch of "
                    f"{batch['size']}: render this workflow with --batch-size 1")
        return {i: [images[self.manifest.get(i)["batch"]["index"]] for images in per_save] for i in item_ids}

    def _finalize(self, lane: Lane, prompt_id: str, entry: PromptHistory, item_ids: list[str] | None = None,
                  quiet: bool = False) -> bool:
        """Record a finished prompt: download its images (done) or keep its error (failed).

        A server that stops answering half-way leaves the prompt in its ``inflight``: collected later."""
        item_ids = item_ids or lane.inflight[prompt_id]
        found = self._images_of(item_ids, entry.outputs) if entry.succeeded else entry.error_message()
        if isinstance(found, str):
            self._forget(lane, prompt_id)
            self._fail(item_ids, found, lane)
            return False
        names: dict[str, list[str]] = {}
        try:
            for item_id, images in found.items():
                names[item_id] = []
                for k, image in enumerate(images):
                    suffix = Path(image["filename"]).suffix or ".png"
                    name = f"{item_id}{suffix}" if len(images) == 1 else f"{item_id}_{k}{suffix}"
                    atomic_write(self.out_dir / name, lane.client.view(image))
                    names[item_id].append(name)
        except requests.HTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status is None:
                raise
            # it answers /queue but not this file (404: its output folder was cleaned; a 5xx that stays): the
            # item's trouble, not the server's health, or the run would knock on it for ever
            self._forget(lane, prompt_id)
            self._fail(item_ids, f"the host no longer has the output (HTTP {status} for {image['filename']}); the "
                       "next run renders it again" if status == 404 else
                       f"could not download {image['filename']} from the host (HTTP {status}); the next run tries "
                       "again", lane)
            return False
        except LaneTrouble:
            raise
        except Exception as e:  # noqa: BLE001
            self._forget(lane, prompt_id)
            self._fail(item_ids, f"could not download the output from the host: {e}", lane)
            return False
        self._forget(lane, prompt_id)
        encoder = self.template.encoder_node
        encoder_ran = encoder is not None and encoder not in entry.cached_nodes()
        seconds = entry.execution_seconds()
        for item_id, images in found.items():
            self.manifest.done(item_id, names[item_id], seconds, encoder_ran, images, server=lane.url)
        self.manifest.save()
        self.stats["rendered"] += len(found)
        self.stats["encoder_runs"] += int(encoder_ran)
        lane.rendered += len(found)
        if self.bar is not None:
            self.bar.advance(len(found))
            if self.several:
                self.bar.set_servers(self._rates())
        if not quiet:
            shown = ", ".join(n for item_names in names.values() for n in item_names)
            self.log(f"done {', '.join(found)} -> {shown}"
                     + (f" ({seconds:.1f}s{', subject encoded' if encoder_ran else ''}"
                        f"{f' on {lane.label}' if self.several else ''})" if seconds else ""))
        return True

    def _forget(self, lane: Lane, prompt_id: str) -> None:
        lane.inflight.pop(prompt_id, None)
        lane.finishing.discard(prompt_id)

    def _rates(self) -> str:
        return ", ".join(f"{lane.label} " + ("down" if lane.down_since is not None else
                                             "unused" if lane.retired else f"{lane.rendered} ({lane.rate():.1f}/min)")
                         for lane in self.lanes)

    # -- waiting ---------------------------------------------------------------------------
    def _wait_step(self) -> None:
        busy = [lane for lane in self.lanes if lane.up and lane.inflight]
        if not busy:
            time.sleep(0.5)  # only servers that are down hold prompts: wait for them to answer or time out
            return
        for lane in busy:
            self._guard(lane, self._listen, lane, 0.5 / len(busy))

    def _listen(self, lane: Lane, timeout: float) -> None:
        for kind, data in lane.events.receive(timeout):
            prompt_id = data.get("prompt_id")
            if prompt_id not in lane.inflight:
                continue
            item_id = "+".join(lane.inflight[prompt_id])
            prefix = f"{lane.label} " if self.several else ""
            if kind == "executing":
                if data.get("node") is None:
                    lane.finishing.add(prompt_id)
                else:
                    self.bar.set_status(f"{prefix}{item_id} {data['node']}")
            elif kind == "progress":
                self.bar.set_status(f"{prefix}{item_id} {data.get('node')} {data.get('value')}/{data.get('max')}")
            elif kind in ("execution_success", "execution_error", "execution_interrupted"):
                lane.finishing.add(prompt_id)
        for prompt_id in list(lane.finishing):
            entry = lane.client.finished(prompt_id)
            if entry is not None:
                self._finalize(lane, prompt_id, entry)
        # Safety net (and the only source without websocket-client): ask the queue.
        if time.monotonic() - lane.last_poll > (5.0 if lane.events.connected else 1.0):
            lane.last_poll = time.monotonic()
            self._poll(lane)

    def _poll(self, lane: Lane) -> None:
        running, pending = lane.client.queue_state(probe=True)   # one short try: --retry-for counts from here
        lost = []
        for prompt_id, item_ids in list(lane.inflight.items()):
            if prompt_id in running or prompt_id in pending:
                continue
            entry = lane.client.finished(prompt_id)
            if entry is not None:
                self._finalize(lane, prompt_id, entry)
            else:
                lost.append((prompt_id, item_ids))
        if lost:   # a restarted host may have lost its input folder too (a container): upload photos again
            lane.client.forget_uploads()
        for prompt_id, item_ids in reversed(lost):  # the host forgot them (restarted): post again, first
            self._forget(lane, prompt_id)
            for item_id in item_ids:
                if self.manifest.status(item_id) == DONE:  # files gone here, prompt gone there: render again
                    self.manifest.outputs_lost(item_id)
            self.pool.add_all(item_ids, front=True)
            self.log(f"the host {lane.label} lost {', '.join(item_ids)} (restarted?); queueing again")

    def _wind_down(self) -> None:
        """After Ctrl-C: take our not-started prompts off the host queues; running ones are left to finish."""
        for lane in self.lanes:
            if lane.inflight and lane.up:
                self._guard(lane, self._wind_down_lane, lane)

    def _wind_down_lane(self, lane: Lane) -> None:
        where = f"the host {lane.label}" if self.several else "the host"
        queue = f"{lane.label}'s queue" if self.several else "the host queue"
        if not self.cancel_on_stop:
            self.log(f"{len(lane.inflight)} prompt(s) stay queued on {where}; the next run collects them")
            return
        running, pending = lane.client.queue_state()
        ours = [pid for pid in lane.inflight if pid in pending]
        if ours:
            lane.client.delete_pending(ours)
            running, pending = lane.client.queue_state()
        cancelled = 0
        for pid in ours:
            if pid in running or pid in pending or lane.client.finished(pid) is not None:
                continue  # it started before the delete: the next run collects it
            for item_id in lane.inflight.pop(pid):
                self.manifest.cancelled(item_id)
            cancelled += 1
        self.manifest.save()
        left = len(lane.inflight)
        self.log(f"took {cancelled} prompt(s) off {queue}"
                 + (f"; {left} already running there, the next run collects it" if left else ""))

    # -- the end -----------------------------------------------------------------------------
    def _report(self, seconds: float) -> int:
        s = self.manifest.summary()
        failed = [self.manifest.get(i) for i in self.order if self.manifest.status(i) == FAILED]
        subjects = len({self.items[i].subject_key for i in self.order})
        lines = [f"{s['done']}/{s['total']} done, {s['failed']} failed, {s['queued'] + s['pending']} left "
                 f"({self.stats['rendered']} rendered or collected this run in {seconds:.0f}s; subject encoder ran "
                 f"{self.stats['encoder_runs']} time(s) this run, {subjects} distinct subject(s) in the batch)"]
        if self.several:
            lines.append(f"servers: {self._rates()}")
        for rec in failed:
            lines.append(f"  failed {rec['id']}: {rec.get('error')}")
        lines.append(f"manifest: {self.manifest.path}")
        if self.log_fn:
            for line in lines:
                self.log_fn(line)
        if self.stop_requested:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if failed or s["queued"] + s["pending"] else EXIT_OK
