"""Benchmark: one subject edit of a photo (inversion + edit) through the shipped workflow against the
reference edit (tests/reference/edit.py, LAVIS's algorithm on diffusers' components).

    .cache/host-venv/bin/python bench/bench_edit.py [--size 256] [--steps 5] [--runs 2]

Both sides: the generated ``test`` weights, CPU, fp32, the same photo, subject, prompts and
settings. A run is everything an edit computes: the subject's embedding, the three text encodings,
the photo's VAE encode, ``--steps`` inversion steps, ``--steps`` edit steps (CFG batch of 4) and
the two decodes. Ours goes through a real host's HTTP API with the server warm, each run with
freshly named images so that no node is served from the host's cache; the reference runs its
cases in one process after building its pipeline. One untimed warm-up run per side, then
``--runs`` timed runs (median). Memory: the server's RSS after its runs against the reference
process's peak RSS (models included in both).

Writes bench/results/edit.json and bench/results/edit.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
MODEL = "blip-diffusion-test"
MODEL_DIR = ROOT / ".cache" / "models" / MODEL
SUBJECT = ROOT / "workflows" / "assets" / "sample_subject.png"
SCENE = ROOT / "workflows" / "assets" / "sample_scene.png"
CASE = dict(src_subject="dog", prompt="standing on the grass", tgt_subject="teapot", neg_prompt="", guidance=7.5,
            cross_replace=0.8, self_replace=0.4, threshold=0.3, seed=42)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return f"{os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, CPU only, fp32"


def ours(size: int, steps: int, runs: int) -> tuple[list[float], float]:
    from _pack import import_pack

    import_pack()
    from blip_diffusion.api.client import ComfyClient
    from blip_diffusion.api.server import ComfyServer, make_base_dir
    from blip_diffusion.batch.graph import load_workflow

    with tempfile.TemporaryDirectory(prefix="bench-edit-") as tmp:
        base = make_base_dir(Path(tmp), {"blip_diffusion": {MODEL: MODEL_DIR}})
        with ComfyServer(base, ["--fp32-text-enc", "--fp32-unet", "--fp32-vae"]) as server:
            api = ComfyClient(server.url)
            seconds = []
            for k in range(runs + 1):
                # fresh names: every node runs again, as in a new edit
                shutil.copy(SUBJECT, base / "input" / f"subject_{k}.png")
                shutil.copy(SCENE, base / "input" / f"scene_{k}.png")
                g = load_workflow("edit_photo")
                g["loader"]["inputs"]["model_name"] = MODEL
                g["reference"]["inputs"]["image"] = f"subject_{k}.png"
                g["scene"]["inputs"]["image"] = f"scene_{k}.png"
                g["photo"]["inputs"]["size"] = size
                g["invert"]["inputs"]["steps"] = steps
                g["edit"]["inputs"].update(steps=steps, blend_threshold=CASE["threshold"])
                start = time.perf_counter()
                api.run(g, timeout=7200)
                seconds.append(time.perf_counter() - start)
            rss_mb = server.rss_bytes() / 2**20
    return seconds[1:], rss_mb


def reference(size: int, steps: int, runs: int) -> tuple[list[float], float]:
    from refenv import run_reference

    case = dict(mode="photo", photo=str(SCENE), subject_image=str(SUBJECT), cond_subject="teapot", size=size,
                inversion_steps=steps, steps=steps, **CASE)
    out = run_reference("edit.py", {"model_dir": str(MODEL_DIR), "cases": [case] * (runs + 1)}, timeout=7200)
    seconds = [float(out[f"seconds_{k}"].item()) for k in range(1, runs + 1)]
    return seconds, float(out[f"peak_rss_mb_{runs}"].item())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="inversion steps, and as many edit steps")
    ap.add_argument("--runs", type=int, default=2, help="timed runs per side, after one warm-up")
    a = ap.parse_args()

    ref_s, ref_mb = reference(a.size, a.steps, a.runs)   # one side at a time: never two models at once
    our_s, our_mb = ours(a.size, a.steps, a.runs)
    o, r = statistics.median(our_s), statistics.median(ref_s)
    settings = (f"test weights (SD 1.5 widths, one layer per block), {a.size} px, {a.steps} inversion + {a.steps} "
                f"edit steps, cfg {CASE['guidance']}, fp32 CPU, median of {a.runs} runs after 1 warm-up")
    result = {"name": "one edit of a photo (inversion + edit, through the HTTP API)", "ours_s": o,
              "reference_s": r, "ratio": o / r, "ours_runs_s": our_s, "reference_runs_s": ref_s,
              "ours_rss_mb": our_mb, "reference_peak_mb": ref_mb, "memory_ratio": our_mb / ref_mb,
              "settings": settings, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "edit.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [
        "### Subject edit of a photo (inversion + edit)", "",
        f"Machine: {result['machine']}; {result['date']}. Ratio = ours / reference, same run, same inputs.", "",
        "| measure | ours | reference | ratio |", "|---|---|---|---|",
        f"| seconds per edit | {o:.1f} s | {r:.1f} s | {o / r:.2f}x |",
        f"| memory (RSS) | {our_mb:.0f} MB | {ref_mb:.0f} MB | {our_mb / ref_mb:.2f}x |", "",
        f"Settings: {settings}. Ours: the shipped edit_photo workflow through a warm server's HTTP API, the "
        "host's attention on every layer except the rows and layers the edit acts on (explicit probabilities "
        "there); memory is the server's RSS after its runs. Reference: its pipeline built once; memory is its "
        "process's peak RSS.",
    ]
    (out_dir / "edit.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
