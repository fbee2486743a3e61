"""Benchmark: the batch tool's throughput with one and with two ComfyUI servers on this machine, and with
one server at ``--batch-size 4`` (the seeds of a subject and prompt as one latent batch).

    .cache/host-venv/bin/python bench/bench_batch_servers.py [--items 8] [--steps 2] [--size 64]

Two headless servers with the generated ``test`` weights (CPU, fp32), each warmed with one render
first (model load). Then the same batch (2 subjects x items/2 seeds, fresh noise photos) runs through
``python batch`` once with ``--url A`` and once with ``--url A --url B``, each into a fresh folder;
items per minute = items / the tool's wall time. On a CPU-only box the two servers share the same
cores, so no gain is expected: what this measures is the tool's plumbing (pull scheduling, two /ws
streams, downloads) costing nothing, not the speed-up several GPUs give. Likewise a latent batch on a
CPU saves only the per-prompt overhead (one UNet call of batch 4 costs about four of batch 1 there);
its GPU figure is bench/gpu_bench.py's ``batches`` part.

Writes bench/results/batch_servers.json and bench/results/batch_servers.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "scripts"))
MODEL = "blip-diffusion-test"
MODEL_DIR = ROOT / ".cache" / "models" / MODEL
HOST_ARGS = ["--fp32-text-enc", "--fp32-unet", "--fp32-vae"]


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return f"{os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, CPU only, fp32"


def batch_file(folder: Path, items: int, steps: int, size: int, name: str) -> Path:
    from PIL import Image

    for photo in ("a.png", "b.png"):
        Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(folder / photo)
    path = folder / name
    path.write_text(json.dumps({"subjects": [{"image": "a.png", "category": "dog"},
                                             {"image": "b.png", "category": "teapot"}],
                                "prompts": ["on a beach"], "seeds": list(range(max(1, items // 2))),
                                "steps": steps, "size": size}))
    return path


def run_tool(batch: Path, out: Path, urls: list[str], *extra: str) -> tuple[float, dict]:
    cmd = [sys.executable, str(ROOT / "batch"), str(batch), "--out", str(out), "--model", MODEL, "--no-progress",
           *[a for u in urls for a in ("--url", u)], *extra]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return seconds, json.loads((out / "manifest.json").read_text())


def measure(a, threads: int, ComfyServer, make_base_dir) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-servers-") as tmp:
        tmp = Path(tmp)
        servers = [ComfyServer(make_base_dir(tmp / f"base{k}", {"blip_diffusion": {MODEL: MODEL_DIR}}), HOST_ARGS)
                   for k in range(2)]
        try:
            for server in servers:
                server.start()
            for k, server in enumerate(servers):  # model load, outside the timing
                run_tool(batch_file(tmp, 2, a.steps, a.size, f"warm{k}.json"), tmp / f"warm{k}", [server.url])
            for n, batch_size in ((1, 1), (2, 1), (1, 4)):
                batch = batch_file(tmp, a.items, a.steps, a.size, f"batch{n}-{batch_size}.json")
                seconds, m = run_tool(batch, tmp / f"out{n}-{batch_size}", [s.url for s in servers[:n]],
                                      "--batch-size", str(batch_size))
                share = {s.url: sum(r.get("server") == s.url for r in m["items"]) for s in servers[:n]}
                busiest = max(sum({r["prompt_id"]: r["render_seconds"] for r in m["items"]  # a prompt's items
                                   if r.get("server") == s.url}.values()) for s in servers[:n])  # share its time
                rows.append({"threads_per_server": threads or "default", "servers": n, "batch_size": batch_size,
                             "prompts": len({r["prompt_id"] for r in m["items"]}), "items": len(m["items"]),
                             "seconds": round(seconds, 1), "items_per_minute": round(60 * len(m["items"]) / seconds, 2),
                             "share": list(share.values()),
                             "render_seconds_median": sorted(r["render_seconds"] for r in m["items"])[len(m["items"]) // 2],
                             "beyond_busiest_server_s": round(seconds - busiest, 1)})
                print(rows[-1], flush=True)
        finally:
            for server in servers:
                server.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)  # never 1: PNDM's single step never calls the UNet
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="*", default=[0],
                    help="torch threads per server, one measurement each (0: torch's default, all cores)")
    a = ap.parse_args()
    from _pack import import_pack

    import_pack()
    from blip_diffusion.api.server import ComfyServer, make_base_dir

    rows = []
    for threads in a.threads:
        if threads:
            os.environ["OMP_NUM_THREADS"] = str(threads)  # read by torch when the server starts
        else:
            os.environ.pop("OMP_NUM_THREADS", None)
        rows += measure(a, threads, ComfyServer, make_base_dir)
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
              "settings": {"items": a.items, "steps": a.steps, "size": a.size, "weights": "generated test",
                           "ahead": 3, "threads_per_server": a.threads},
              "runs": rows, "ratio_two_over_one": [round(rows[k + 1]["items_per_minute"] / rows[k]["items_per_minute"], 2)
                                                   for k in range(0, len(rows), 3)],
              "ratio_batch4_over_one": [round(rows[k + 2]["items_per_minute"] / rows[k]["items_per_minute"], 2)
                                        for k in range(0, len(rows), 3)]}
    (HERE / "results" / "batch_servers.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Batch tool: one vs two servers, latent batches ({result['date']})", "", result["machine"], "",
             "| torch threads per server | servers | --batch-size | prompts | items | wall s | items/min | share per "
             "server | median render s (per prompt) | wall beyond the busiest server's renders, s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['threads_per_server']} | {r['servers']} | {r['batch_size']} | {r['prompts']} | {r['items']} | "
              f"{r['seconds']} | {r['items_per_minute']} | "
              f"{' + '.join(map(str, r['share']))} | {r['render_seconds_median']} | {r['beyond_busiest_server_s']} |"
              for r in rows]
    (HERE / "results" / "batch_servers.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
