"""The main job: one subject-driven render through a real ComfyUI, with the shipped workflow.

Uses the released weights when a folder with model_index.json is in models/blip_diffusion/
of the host (COMFYUI_DIR, or the provisioned .cache/ComfyUI); otherwise generated random
weights, announced as such: their image is noise, the point is the whole pipeline.

    python scripts/render.py [--image PHOTO] [--category teapot] [--prompt "..."] [--out output]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pack import ROOT, import_pack  # noqa: E402

import_pack()
from blip_diffusion.api.client import ComfyClient  # noqa: E402
from blip_diffusion.api.server import ComfyServer, comfyui_dir, make_base_dir  # noqa: E402
from blip_diffusion.batch.graph import fill, load_workflow  # noqa: E402

SAMPLE = ROOT / "workflows" / "assets" / "sample_subject.png"


def find_released(models_root: Path) -> Path | None:
    if not models_root.is_dir():
        return None
    for dirpath, dirnames, filenames in os.walk(models_root, followlinks=True):
        if "model_index.json" in filenames:
            return Path(dirpath)
    return None


def generated_weights() -> Path:
    ref_python = ROOT / ".cache" / "ref-venv" / "bin" / "python"
    if not ref_python.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "setup_reference.sh")], check=True)
    out = subprocess.run([str(ref_python), str(ROOT / "scripts" / "make_weights.py"), "--size", "test"],
                         check=True, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return Path(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path, default=SAMPLE, help="photo of the subject (default: bundled sample)")
    ap.add_argument("--category", default="teapot", help="what the subject is (default: teapot)")
    ap.add_argument("--prompt", default="on a wooden table in a sunny kitchen", help="where/how to render it")
    ap.add_argument("--steps", type=int, default=25, help="PNDM steps (paper: 100, diffusers example: 25)")
    ap.add_argument("--size", type=int, default=None, help="image size (default 512; 256 on generated weights)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "output", help="folder for the PNG")
    a = ap.parse_args()
    if not a.image.is_file():
        print(f"error: no image at {a.image}", file=sys.stderr)
        return 2

    released = find_released(comfyui_dir() / "models" / "blip_diffusion")
    if released:
        model, size = released, a.size or 512
        print(f"weights: released model at {model}")
    else:
        model, size = generated_weights(), a.size or 256
        print(f"weights: NO released weights in {comfyui_dir() / 'models' / 'blip_diffusion'}; using generated "
              f"random weights at {model} (an embedded default: the image will be noise, the point is the pipeline)")

    base = make_base_dir(ROOT / ".cache" / "render-base", {"blip_diffusion": {model.name: model}})
    shutil.copy(a.image, base / "input" / a.image.name)
    graph = fill(load_workflow("zero_shot"), model=model.name, image=a.image.name, category=a.category,
                 prompt=a.prompt, steps=a.steps, seed=a.seed, size=size)

    started = time.monotonic()
    print(f"starting ComfyUI ({comfyui_dir()}) ...", flush=True)
    with ComfyServer(base) as server:
        print(f"ComfyUI at {server.url}; rendering {size}x{size}, {a.steps} steps ...", flush=True)
        client = ComfyClient(server.url)
        try:
            result = client.run(graph, timeout=3600)
        except Exception as e:
            print(f"error: the render failed: {e}\n--- server log ---\n{server.log_tail()}", file=sys.stderr)
            return 1
        image = result.images()[0]
        a.out.mkdir(parents=True, exist_ok=True)
        dest = a.out / f"blip_{a.category.replace(' ', '_')}_{a.seed}.png"
        dest.write_bytes(client.view(image))
    print(f"wrote {dest} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
