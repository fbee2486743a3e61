"""A prompt's entry in the host's ``/history``, read in one place.

An entry is ``{"outputs": {node id: {"images": [...], ...}}, "status": {"status_str": "success" |
"error", "completed": bool, "messages": [[kind, data], ...]}, ...}``; the messages are the ones the
host also sent over ``/ws`` (``execution_start``, ``execution_cached``, ``execution_success``,
``execution_error``, ``execution_interrupted``), each with a ``timestamp`` in milliseconds.

Used by the API client, the batch tool and the benchmarks: standard library only (the batch tool
runs on machines without torch).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptHistory:
    entry: dict

    @classmethod
    def finished(cls, history: dict, prompt_id: str) -> PromptHistory | None:
        """``prompt_id``'s entry in a ``/history`` answer once the prompt has ended; else None."""
        entry = history.get(prompt_id)
        if entry:
            status = entry.get("status") or {}
            if status.get("completed") or status.get("status_str") in ("success", "error"):
                return cls(entry)
        return None

    @property
    def status(self) -> dict:
        return self.entry.get("status") or {}

    @property
    def succeeded(self) -> bool:
        return self.status.get("status_str") == "success"

    @property
    def outputs(self) -> dict:
        return self.entry.get("outputs") or {}

    @property
    def messages(self) -> list:
        return self.status.get("messages") or []

    def execution_error(self) -> dict | None:
        """The ``execution_error`` message's data (node, exception type and message), if a node raised."""
        return next((data for kind, data in self.messages if kind == "execution_error"), None)

    def error_message(self) -> str:
        """Why the prompt failed, as one line."""
        for kind, data in self.messages:
            if kind == "execution_error":
                return (f"node {data.get('node_id')} ({data.get('node_type')}): "
                        f"{data.get('exception_type')}: {data.get('exception_message', '').strip()}")
            if kind == "execution_interrupted":
                return f"interrupted on the host at node {data.get('node_id')} ({data.get('node_type')})"
        return f"the host reported status {self.status.get('status_str')!r}"

    def cached_nodes(self) -> set[str]:
        """Node ids the host served from its cache instead of running them."""
        return {n for kind, data in self.messages if kind == "execution_cached" for n in data.get("nodes", [])}

    def execution_seconds(self) -> float | None:
        """From ``execution_start`` to ``execution_success`` on the host's clock; None if either is missing."""
        times = {kind: data.get("timestamp") for kind, data in self.messages}
        if times.get("execution_start") and times.get("execution_success"):
            return round((times["execution_success"] - times["execution_start"]) / 1000.0, 3)
        return None
