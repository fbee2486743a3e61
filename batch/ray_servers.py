"""``--ray``: the batch's servers started on a Ray cluster, one actor per GPU, each owning a headless ComfyUI.

Ray places the actors (one GPU each; one CPU each on a cluster without GPUs), and restarts an actor
whose process or node died. The actor starts the ComfyUI installed on its node on the node's own
address, and starts it again if it dies; the driver (the batch tool) asks each actor for its
server's URL and then talks to that server over HTTP like to any ``--url``: the scheduling, the
manifest and its rules stay the tool's (batch/runner.py). A server that an actor started anew has
a new URL and an empty queue: its lane is pointed there and its prompts go back to the pool.

``ray`` is an optional extra of the batch tool (pyproject: ``ray``); nothing else imports it. The
actor code travels to the workers by value, so the nodes need ray and requests, not this pack's
import name (ComfyUI finds the pack in its own custom_nodes/).
"""
from __future__ import annotations

import os
import queue
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..api import server as comfy_server
from ..api.server import ComfyServer

START_TIMEOUT = 600.0  # seconds for a first server to answer /object_info (a GPU node may import a lot)


class ServerActor:
    """One ComfyUI on this actor's node (made a Ray actor class by ``RayServers``)."""

    def __init__(self, index: int, comfyui: str | None, python: str | None, args: list[str]):
        self.index, self.comfyui, self.python = index, comfyui, python
        self.args = [a.replace("{actor}", str(index)) for a in args]
        self.server = None
        # The server is killed when the thread that started it ends (so it never outlives a killed actor);
        # Ray runs actor calls on threads of its own, so one thread of ours lives as long as the actor and
        # starts every server.
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._starter, daemon=True, name="comfyui-starter").start()
        self._start()

    def _starter(self) -> None:
        while True:
            job, result = self._jobs.get()
            try:
                job()
                result.put(None)
            except BaseException as e:  # noqa: BLE001 - handed to the calling thread
                result.put(e)

    def _start(self) -> None:
        result: queue.Queue = queue.Queue()
        self._jobs.put((self._start_here, result))
        error = result.get()
        if error is not None:
            raise error

    def _start_here(self) -> None:
        import ray

        comfyui = self.comfyui or os.environ.get("COMFYUI_DIR")
        if not comfyui or not (Path(comfyui) / "main.py").is_file():
            raise RuntimeError(f"no ComfyUI at {comfyui!r} on node {ray.util.get_node_ip_address()}: give "
                               "--comfyui DIR (the same path on every node) or set COMFYUI_DIR there")
        gpu = bool(ray.get_gpu_ids())  # Ray set CUDA_VISIBLE_DEVICES to this actor's GPU: the server sees it alone
        log_dir = Path(tempfile.mkdtemp(prefix=f"blip-batch-actor{self.index}-"))
        self.server = ComfyServer(
            None, self.args, listen=ray.util.get_node_ip_address(), cpu=not gpu, comfyui=Path(comfyui),
            python=self.python or sys.executable, log_dir=log_dir, die_with_parent=True,
            unset_env=("OMP_NUM_THREADS",))  # Ray's 1 for its workers: the server uses the node as run by hand
        self.server.start(timeout=START_TIMEOUT)

    def url(self) -> str:
        """Its server's URL; a server that died is started again first (on a new port)."""
        if not self.server.alive:
            self.server.stop()
            self._start()
        return self.server.url

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


class ActorSource:
    """What a lane asks of its actor: the current URL, without waiting (a restart takes a while)."""

    def __init__(self, ray, actor, index: int):
        self.ray, self.actor, self.index = ray, actor, index
        self.pending = None

    def poll(self) -> str | None:
        """The actor's server URL if it answered since the last call; None while it starts or restarts."""
        if self.pending is None:
            self.pending = self.actor.url.remote()
        ready, _ = self.ray.wait([self.pending], timeout=0)
        if not ready:
            return None
        ref, self.pending = self.pending, None
        try:
            return self.ray.get(ref)
        except Exception:  # noqa: BLE001 - the actor died (Ray restarts it) or its server cannot start
            return None


class RayServers:
    """Connect to (or start) Ray, start ``count`` server actors, hand out their first URLs; stop them."""

    def __init__(self, address: str | None, count: int | None, comfyui: str | None, args: str = "",
                 python: str | None = None, log=print):
        try:
            import ray
        except ImportError:
            raise RuntimeError("--ray needs the ray package on this machine and every node: pip install ray "
                               "(the batch tool's 'ray' extra)") from None
        self.ray, self.log = ray, log
        self.address, self.count, self.comfyui, self.python = address, count, comfyui, python
        self.args = shlex.split(args or "")
        self.actors: list = []
        self.started_ray = False

    def start(self) -> list[tuple[ActorSource, str | None]]:
        """Each actor's source and its first URL (None: not up within START_TIMEOUT; it may come later)."""
        ray = self.ray
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False, logging_level="WARNING")
            else:
                try:  # a cluster this machine belongs to (ray start), else a local one just for this run
                    ray.init(address="auto", log_to_driver=False, logging_level="WARNING")
                except ConnectionError:
                    ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                             object_store_memory=200 * 1024 ** 2)
                    self.log(f"started a local Ray instance ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)")
            self.started_ray = True
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = self.count or gpus
        if not count:
            raise RuntimeError("the Ray cluster has no GPU: give --ray-servers N for N CPU servers")
        per = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        send_by_value()
        remote = ray.remote(max_restarts=-1, max_task_retries=0, **per)(ServerActor)
        self.actors = [remote.remote(k, self.comfyui, self.python, self.args) for k in range(count)]
        sources = [ActorSource(ray, actor, k) for k, actor in enumerate(self.actors)]
        self.log(f"starting {count} ComfyUI server(s) on the Ray cluster ({'one GPU' if gpus else 'one CPU'} each)")
        firsts: dict[int, str | None] = {}
        deadline = time.monotonic() + START_TIMEOUT
        while len(firsts) < count and time.monotonic() < deadline:
            for source in sources:
                if source.index in firsts:
                    continue
                if source.pending is not None:
                    ready, _ = ray.wait([source.pending], timeout=0)
                    if ready:
                        try:
                            firsts[source.index] = ray.get(source.pending)
                        except Exception as e:  # noqa: BLE001 - e.g. no ComfyUI at --comfyui: say why
                            raise RuntimeError(f"Ray actor {source.index} could not start its server: "
                                               f"{_cause(e)}") from None
                        source.pending = None
                else:
                    source.pending = source.actor.url.remote()
            time.sleep(0.2)
        return [(source, firsts.get(source.index)) for source in sources]

    def stop(self) -> None:
        ray = self.ray
        if self.actors:
            try:
                ray.get([actor.stop.remote() for actor in self.actors], timeout=60)
            except Exception:  # noqa: BLE001 - a dead actor's server died with it (die_with_parent)
                pass
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            self.actors = []
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


def _cause(error: Exception) -> str:
    """The actor's own error message, not Ray's wrapping of it."""
    cause = getattr(error, "cause", None) or error
    return str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__


def send_by_value() -> None:
    """The workers cannot import this pack under the driver's name: pickle its code with the actor."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cloudpickle.register_pickle_by_value(comfy_server)
