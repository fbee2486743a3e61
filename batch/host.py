"""The host side of a batch: HTTP calls with retries, image uploads, and the /ws event stream.

Builds on api/client.py (ComfyClient); adds what a batch needs: prompts posted under a prompt
id chosen beforehand, tagged with ``extra_data``, uploads named by content hash, the queue's
state, and a websocket that reconnects under the batch's stable client id.
"""
from __future__ import annotations

import json
import mimetypes
import time
from pathlib import Path

import requests

from ..api.client import ComfyClient, PromptRejected

UPLOAD_SUBFOLDER = "blip_batch"
PROBE_TIMEOUT = 10.0  # seconds one look at a server's queue may take (a hung server must not stall the run)
POST_TIMEOUT = 20.0  # seconds a /prompt post may take (the host only validates the graph before answering)


class HostUnreachable(Exception):
    """The host did not answer for longer than the retry window."""


class BatchClient(ComfyClient):
    def __init__(self, url: str, client_id: str, retry_for: float = 120.0):
        super().__init__(url)
        self.client_id = client_id  # stable per output folder: a restarted run hears its old prompts
        self.retry_for = retry_for
        self._uploaded: dict[str, str] = {}

    # -- plumbing --------------------------------------------------------------------
    def request(self, method: str, path: str, probe: bool = False, **kw) -> requests.Response:
        """One HTTP call; connection failures are retried for ``retry_for`` seconds. ``probe``: one try
        with a short timeout (knocking on a server that is down must not hold up the others)."""
        deadline, delay = time.monotonic() + (0 if probe else self.retry_for), 0.5
        kw.setdefault("timeout", PROBE_TIMEOUT if probe else 60)
        while True:
            try:
                return requests.request(method, self.url + path, **kw)
            except (requests.ConnectionError, requests.Timeout) as e:
                if time.monotonic() >= deadline:
                    raise HostUnreachable(f"{self.url} did not answer"
                                          + ("" if probe else f" for {self.retry_for:.0f}s") + f": {e}") from e
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def get(self, path: str, probe: bool = False, **kw) -> requests.Response:
        r = self.request("GET", path, probe=probe, **kw)
        r.raise_for_status()
        return r

    # -- what a batch asks ------------------------------------------------------------
    def loader_models(self, node_class: str = "BlipDiffusionLoader") -> list[str] | None:
        """The model names the host offers to the loader node; None if the node is not installed."""
        info = self.get(f"/object_info/{node_class}").json().get(node_class)
        if not info:
            return None
        spec = info["input"]["required"]["model_name"]
        options = spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])
        return list(options)

    def upload_image(self, path: Path, sha256: str) -> str:
        """Upload once per content; return the name LoadImage takes ("blip_batch/<hash>.png").

        The name is the content hash, so the same photo always gets the same name (and the same
        prompt, which lets the host's cache skip encoding it again). No ``overwrite``: when the
        file is there with the same content the host keeps it and answers its name.
        """
        if sha256 in self._uploaded:
            return self._uploaded[sha256]
        suffix = path.suffix.lower() or ".png"
        name = f"{sha256[:32]}{suffix}"
        mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        data = path.read_bytes()
        r = self.request("POST", "/upload/image", files={"image": (name, data, mime)},
                         data={"type": "input", "subfolder": UPLOAD_SUBFOLDER})
        if r.status_code != 200:
            raise RuntimeError(f"upload of {path} refused: HTTP {r.status_code} {r.text[:300]}")
        body = r.json()
        ref = f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else body["name"]
        self._uploaded[sha256] = ref
        return ref

    def forget_uploads(self) -> None:
        self._uploaded.clear()

    def post_prompt(self, prompt: dict, prompt_id: str, extra_data: dict) -> str:
        """Queue ``prompt`` under ``prompt_id``; PromptRejected with the host's node_errors.

        Returns the id the host uses: ours, except on hosts too old to take a client's id.
        """
        # One try with a bounded wait: a post that timed out may have been queued (a second one could queue
        # it twice), and a server that holds the connection open must not stall the run for --retry-for.
        r = self.request("POST", "/prompt", probe=True, timeout=POST_TIMEOUT,
                         json={"prompt": prompt, "prompt_id": prompt_id, "client_id": self.client_id,
                               "extra_data": extra_data})
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code >= 500:
            # the server (or a proxy before it) is in trouble, not the prompt: its items wait or go elsewhere
            raise requests.HTTPError(f"{self.url}/prompt answered HTTP {r.status_code}: {r.text[:300]}", response=r)
        if not isinstance(body, dict):
            raise PromptRejected({"error": f"HTTP {r.status_code}: {r.text[:500]}"})
        if r.status_code != 200:   # a 200 may list node_errors of outputs it left out: it queued the rest
            raise PromptRejected(body)
        return str(body.get("prompt_id") or prompt_id)

    def queue_state(self, probe: bool = False) -> tuple[set[str], set[str]]:
        """(running, pending) prompt ids; ``probe``: one short try (see ``request``)."""
        q = self.get("/queue", probe=probe).json()
        return ({e[1] for e in q.get("queue_running", [])}, {e[1] for e in q.get("queue_pending", [])})

    def delete_pending(self, prompt_ids) -> None:
        self.request("POST", "/queue", json={"delete": list(prompt_ids)}, timeout=30)


def rejection_message(payload: dict) -> str:
    """The host's validation errors (a /prompt 400 body) as one readable line."""
    parts = []
    error = payload.get("error")
    if isinstance(error, dict):
        parts.append(error.get("message", ""))
        if error.get("details"):
            parts[-1] += f": {error['details']}"
    elif error:
        parts.append(str(error))
    for node_id, info in (payload.get("node_errors") or {}).items():
        for err in info.get("errors", []):
            parts.append(f"node {node_id} ({info.get('class_type')}): {err.get('message')}: {err.get('details')}")
    return "; ".join(p for p in parts if p) or json.dumps(payload)[:500]


class Events:
    """The /ws stream for one client id; reconnects on demand; silent if websocket-client is missing."""

    def __init__(self, url: str, client_id: str):
        self.address = url.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
        self.ws = None
        self._next_try = 0.0
        try:
            import websocket  # noqa: F401
            self.available = True
        except ImportError:
            self.available = False

    @property
    def connected(self) -> bool:
        return self.ws is not None

    def _connect(self) -> None:
        if not self.available or time.monotonic() < self._next_try:
            return
        import websocket

        try:
            self.ws = websocket.create_connection(self.address, timeout=10)
        except (OSError, websocket.WebSocketException):
            self.ws = None
            self._next_try = time.monotonic() + 3.0

    def receive(self, timeout: float) -> list[tuple[str, dict]]:
        """Messages that arrive within ``timeout`` seconds (returns at the first one); sleeps without ws."""
        if self.ws is None:
            self._connect()
        if self.ws is None:
            time.sleep(timeout)
            return []
        import websocket

        out = []
        self.ws.settimeout(timeout)
        try:
            while True:
                raw = self.ws.recv()
                if isinstance(raw, str):
                    msg = json.loads(raw)
                    out.append((msg.get("type"), msg.get("data") or {}))
                self.ws.settimeout(0.001)  # drain what is already there, then return
        except websocket.WebSocketTimeoutException:
            pass
        except (OSError, websocket.WebSocketException, ValueError):
            self.close()
        return out

    def close(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:
                pass
            self.ws = None
