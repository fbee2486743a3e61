"""Shipped API workflows, loaded and adjusted for tests (the tests run what users run)."""
import json
import shutil
from pathlib import Path

from paths import ROOT

WORKFLOWS = ROOT / "workflows"


def api_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def put_input_image(server, source: Path, name: str | None = None) -> str:
    """Copy an image into the host's input folder, as an upload would; return its name."""
    name = name or source.name
    shutil.copy(source, server.base_dir / "input" / name)
    return name


def shipped(name, model_name, image, category, prompt, seed, steps, size) -> dict:
    """A shipped API workflow with one run's inputs (node ids are shared across the workflows)."""
    from blip_diffusion.batch.graph import fill

    return fill(api_workflow(name), model=model_name, image=image, category=category, prompt=prompt,
                seed=seed, steps=steps, size=size)


def zero_shot(model_name, image, category, prompt, seed, steps, size, save_latent=True) -> dict:
    g = shipped("zero_shot", model_name, image, category, prompt, seed, steps, size)
    if save_latent:
        g["save_latent"] = {"class_type": "SaveLatent",
                            "inputs": {"samples": ["sample", 0], "filename_prefix": f"latents/zs_{seed}"}}
    return g
