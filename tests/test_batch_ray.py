"""The batch tool on a Ray cluster (docs/batch.md, *Many machines on Ray*): ``--ray`` starts a local Ray
instance with two actors, each owning a headless CPU ComfyUI, and spreads the batch over them; one
actor's server is SIGKILLed mid-batch and its actor starts it again.

Memory: the session server renders the one-server reference first; the two actor servers live only
during the Ray run (three ComfyUI processes at most, as in test_batch_servers).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_batch import MODEL, SMALL, TOOL, manifest, noise_image, wait_for
from test_batch_servers import HOST_ARGS, grid, photos, same_pixels  # noqa: F401 - photos: a fixture


def server_processes(marker: str) -> dict[int, str]:
    """pid -> command line of the ComfyUI processes whose command line holds ``marker``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "main.py" in cmd and marker in cmd:
            found[int(entry.name)] = cmd
    return found


@pytest.mark.slow
def test_a_batch_on_two_ray_actors_survives_one_server_killed(comfy_server, test_model_dir, photos,
                                                              tmp_path_factory):
    from blip_diffusion.api.server import comfyui_dir, make_base_dir

    batch = grid(photos, "eight.json", ["in the snow"], [1, 2, 3, 4])  # 2 subjects x 4 seeds
    reference = tmp_path_factory.mktemp("ray-reference") / "out"
    proc = subprocess.run([sys.executable, str(TOOL), str(batch), "--url", comfy_server.url, "--out", str(reference),
                           "--model", MODEL, "--no-progress"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    work = tmp_path_factory.mktemp("ray-run")
    for k in range(2):  # each actor's server gets its own base directory ({actor} in --comfyui-args)
        make_base_dir(work / f"base{k}", {"blip_diffusion": {MODEL: test_model_dir}})
    out, log = work / "out", work / "tool.log"
    marker = str(work / "base")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray instance of its own
    tool = subprocess.Popen(
        [sys.executable, str(TOOL), str(batch), "--ray", "--ray-servers", "2", "--comfyui",
         str(comfyui_dir()),
         "--comfyui-args", f"--base-directory {marker}{{actor}} {' '.join(HOST_ARGS)}", "--model", MODEL,
         "--out", str(out), "--ahead", "2", "--retry-for", "60", "--no-progress"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True, env=env)
    try:
        # both actors serve: wait until the second one holds a queued prompt after rendering one, then kill it
        def victim_busy(m):
            servers = sorted({r.get("server") for r in m["items"] if r.get("server")})
            if len(servers) < 2:
                return False
            victim = servers[-1]
            return any(r["status"] == "done" and r["server"] == victim for r in m["items"]) and \
                any(r["status"] == "queued" and r["server"] == victim for r in m["items"])

        m = wait_for(out, tool, victim_busy, "both Ray servers rendering", timeout=600)
        victim = sorted({r["server"] for r in m["items"] if r.get("server")})[-1]
        port = victim.rsplit(":", 1)[1]
        pids = [pid for pid, cmd in server_processes(marker).items() if f"--port {port} " in cmd + " "]
        assert len(pids) == 1, server_processes(marker)
        os.killpg(pids[0], signal.SIGKILL)
        assert tool.wait(timeout=900) == 0, log.read_text()[-4000:]
    finally:
        if tool.poll() is None:
            tool.kill()
    text = log.read_text()
    print(text[-3000:])

    final = manifest(out)
    assert final["summary"] == {"total": 8, "done": 8, "failed": 0, "queued": 0, "pending": 0}
    assert final["ray"] == {"address": "auto", "servers": 2}
    recs = final["items"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["outputs"][0] for r in recs)  # one file each
    same_pixels(out, reference)
    # the killed server's queued prompts went back to the pool and were rendered elsewhere
    assert any(r["attempts"] > 1 and r["server"] != victim for r in recs), recs
    assert "was started again by its Ray actor" in text and "answers again" in text
    assert len({r["server"] for r in recs}) >= 2
    # the actors stopped their servers with the run (and the local Ray instance with them)
    assert server_processes(marker) == {}


def test_ray_and_batch_size_arguments_are_checked_before_anything_runs(tmp_path):
    """Bad combinations name the fix: Ray options without --ray, a batch size below 1, and --batch-size on a
    workflow whose sampler starts from no Empty Latent Image (an img2img graph)."""
    from blip_diffusion.batch.graph import load_workflow

    noise_image(tmp_path / "dog.png")
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"image": "dog.png", "category": "dog", "prompt": "x", "seed": 1, **SMALL}) + "\n")

    def tool(*extra):
        return subprocess.run([sys.executable, str(TOOL), str(batch), "--out", str(tmp_path / "out"), *extra],
                              capture_output=True, text=True, timeout=120)

    bad = tool("--ray-servers", "2")
    assert bad.returncode == 2 and "go with --ray" in bad.stderr
    bad = tool("--batch-size", "0")
    assert bad.returncode == 2 and "--batch-size must be at least 1" in bad.stderr
    img2img = load_workflow("zero_shot")
    img2img["latent"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["reference", 0], "vae": ["loader", 2]}}
    path = tmp_path / "img2img.json"
    path.write_text(json.dumps(img2img))
    bad = tool("--workflow", str(path), "--batch-size", "2", "--dry-run")
    assert bad.returncode == 2 and "no empty latent with a batch_size" in bad.stderr, bad.stderr
    ok = tool("--workflow", str(path), "--dry-run")
    assert ok.returncode == 0, ok.stderr


@pytest.mark.slow
def test_a_ray_server_that_cannot_start_is_named_with_its_reason(tmp_path):
    """--comfyui pointing nowhere: the actor's own error reaches the user, exit 2, and nothing is left
    running (the local Ray instance the tool started is shut down)."""
    noise_image(tmp_path / "dog.png")
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"image": "dog.png", "category": "dog", "prompt": "x", "seed": 1, **SMALL}) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(TOOL), str(batch), "--out", str(tmp_path / "out"), "--ray",
                           "--ray-servers", "1", "--comfyui", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"no ComfyUI at '{tmp_path / 'nowhere'}'" in proc.stderr and "--comfyui DIR" in proc.stderr
    assert "Traceback" not in proc.stderr
