"""A small client for a ComfyUI server's HTTP API, as users' scripts talk to it.

POST /prompt, wait over /ws (falling back to polling /history), fetch outputs with /view,
and turn node_errors / execution_error into exceptions with the host's own message.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import requests

from .history import PromptHistory


class PromptRejected(Exception):
    """The server refused the prompt at validation (``node_errors``)."""

    def __init__(self, payload: dict):
        self.payload = payload
        super().__init__(json.dumps(payload, indent=1)[:4000])


class ExecutionFailed(Exception):
    """A node raised while the prompt ran (``execution_error``)."""

    def __init__(self, details: dict):
        self.details = details
        self.node_type = details.get("node_type")
        self.message = details.get("exception_message", "")
        super().__init__(f"{self.node_type}: {details.get('exception_type')}: {self.message}")


@dataclass
class PromptResult:
    prompt_id: str
    outputs: dict
    messages: list = field(default_factory=list)

    def images(self) -> list[dict]:
        return [img for out in self.outputs.values() for img in out.get("images", [])]


class ComfyClient:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex

    def get(self, path: str, **kw):
        r = requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)
        r.raise_for_status()
        return r

    def object_info(self) -> dict:
        return self.get("/object_info").json()

    def queue(self, prompt: dict) -> str:
        r = requests.post(self.url + "/prompt", json={"prompt": prompt, "client_id": self.client_id}, timeout=60)
        if r.status_code != 200:
            try:
                raise PromptRejected(r.json())
            except ValueError:
                r.raise_for_status()
        body = r.json()
        if body.get("node_errors"):
            raise PromptRejected(body)
        return body["prompt_id"]

    def run(self, prompt: dict, timeout: float = 600) -> PromptResult:
        """Queue ``prompt`` and wait for it; raise ExecutionFailed on a node error."""
        ws = self._connect_ws()
        try:
            prompt_id = self.queue(prompt)
            messages = self._wait_ws(ws, prompt_id, timeout) if ws else []
        finally:
            if ws:
                ws.close()
        entry = self.wait_finished(prompt_id, timeout)
        error = entry.execution_error()
        if error is not None:
            raise ExecutionFailed(error)
        return PromptResult(prompt_id, entry.outputs, messages or entry.messages)

    def view(self, image: dict) -> bytes:
        params = {"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                  "type": image.get("type", "output")}
        return self.get("/view", params=params).content

    def history(self, prompt_id: str | None = None) -> dict:
        return self.get(f"/history/{prompt_id}" if prompt_id else "/history").json()

    def interrupt(self) -> None:
        requests.post(self.url + "/interrupt", timeout=10)

    # -- waiting ---------------------------------------------------------------------
    def _connect_ws(self):
        try:
            import websocket  # websocket-client
        except ImportError:
            return None
        try:
            ws = websocket.create_connection(self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}",
                                             timeout=10)
            ws.settimeout(5)
            return ws
        except OSError:
            return None

    def _wait_ws(self, ws, prompt_id: str, timeout: float) -> list:
        import websocket

        messages, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                if self.finished(prompt_id):
                    break
                continue
            except websocket.WebSocketConnectionClosedException:
                break
            if not isinstance(raw, str):
                continue  # binary previews
            msg = json.loads(raw)
            data = msg.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            messages.append((msg["type"], data))
            if msg["type"] in ("execution_error", "execution_interrupted", "execution_success"):
                break
            if msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                break
        return messages

    def finished(self, prompt_id: str) -> PromptHistory | None:
        """The history entry of a finished prompt; None while it is queued or running, or unknown."""
        return PromptHistory.finished(self.history(prompt_id), prompt_id)

    def wait_finished(self, prompt_id: str, timeout: float) -> PromptHistory:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.finished(prompt_id)
            if entry is not None:
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")
