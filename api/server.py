"""Start and stop a real headless ComfyUI server (tests, benchmarks, the batch tool's Ray actors).

For tests it runs on the CPU on a free loopback port with ``--base-directory`` pointing at a
temporary folder: a symlink to this pack in ``custom_nodes/`` and symlinked model files, so the
ComfyUI tree itself is never touched. A Ray actor runs an installed ComfyUI as it is, on the
node's address and its GPU. The whole process group is killed on stop.

Standard library and requests only: the batch tool sends this module to Ray workers by value.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent  # the pack folder
PACK_DIR_NAME = "blip_diffusion"


def comfyui_dir() -> Path:
    path = Path(os.environ.get("COMFYUI_DIR") or ROOT / ".cache" / "ComfyUI")
    if not (path / "main.py").exists():
        raise RuntimeError(f"no ComfyUI at {path}: run scripts/setup_host.sh or set COMFYUI_DIR")
    return path


def comfyui_python() -> str:
    return os.environ.get("COMFYUI_PYTHON") or sys.executable


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL when the process that started it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def make_base_dir(base: Path, models: dict[str, dict[str, Path]] | None = None) -> Path:
    """Lay out a --base-directory: the pack under custom_nodes/, models symlinked.

    ``models`` maps a models/ subfolder to {file or folder name: target}.
    """
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_DIR_NAME
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    for folder, entries in (models or {}).items():
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        for name, p in entries.items():
            dest = base / "models" / folder / name
            if not dest.exists():
                dest.symlink_to(p, target_is_directory=p.is_dir())
    for sub in ("input", "output", "temp", "user"):
        (base / sub).mkdir(exist_ok=True)
    return base


class ComfyServer:
    """``base_dir``: the --base-directory (None: the ComfyUI folder's own models, nodes and outputs; then
    ``log_dir`` holds the log). ``comfyui``/``python``: another ComfyUI and its interpreter than
    comfyui_dir()/comfyui_python(). ``die_with_parent``: the server goes when the thread that starts it
    does (Linux; start it from a thread that lives as long as the process). ``unset_env``: variables of
    this process the server does not inherit."""

    def __init__(self, base_dir: Path | None, extra_args: list[str] | None = None, port: int | None = None,
                 log_name: str = "server.log", listen: str = "127.0.0.1", cpu: bool = True,
                 comfyui: Path | None = None, python: str | None = None, log_dir: Path | None = None,
                 die_with_parent: bool = False, unset_env: tuple[str, ...] = ()):
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.listen, self.cpu = listen, cpu
        self.port = port or free_port(listen)
        self.url = f"http://{listen}:{self.port}"
        self.extra_args = list(extra_args or [])
        self.comfyui, self.python, self.die_with_parent = comfyui, python, die_with_parent
        self.unset_env = unset_env
        self.log_path = Path(log_dir or self.base_dir) / log_name
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "ComfyServer":
        comfyui = Path(self.comfyui) if self.comfyui else comfyui_dir()
        cmd = [self.python or comfyui_python(), "-u", str(comfyui / "main.py"), *(["--cpu"] if self.cpu else []),
               "--listen", self.listen, "--port", str(self.port), "--disable-auto-launch",
               *(["--base-directory", str(self.base_dir)] if self.base_dir else []), *self.extra_args]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        # Idle OpenMP threads sleep instead of spinning: a server then leaves the cores to whatever else runs
        # there (another server, the reference, the batch tool) without changing a single result.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        for name in self.unset_env:
            env.pop(name, None)
        self._log = open(self.log_path, "ab")
        # Own process group: stop() kills the server and anything it spawned.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(self.base_dir or comfyui), start_new_session=True,
                                     preexec_fn=_die_with_parent if self.die_with_parent else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/object_info", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer /object_info within {timeout}s:\n{self.log_tail()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log()[-chars:]

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=15)
        self._log.close()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
