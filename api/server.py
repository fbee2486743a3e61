"""Start and stop a real ComfyUI server for tests.

The host runs headless on a free loopback port with ``--base-directory`` pointing at a
temporary folder: a symlink to this pack in ``custom_nodes/`` and symlinked model files,
so the ComfyUI tree itself is never touched. The whole process group is killed on stop.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    def __init__(self, base_dir: Path, extra_args: list[str] | None = None, port: int | None = None,
                 log_name: str = "server.log"):
        self.base_dir = Path(base_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args or [])
        self.log_path = self.base_dir / log_name
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "ComfyServer":
        cmd = [comfyui_python(), "-u", str(comfyui_dir() / "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--disable-auto-launch", "--base-directory", str(self.base_dir),
               *self.extra_args]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "ab")
        # Own process group: stop() kills the server and anything it spawned.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(self.base_dir), start_new_session=True)
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
