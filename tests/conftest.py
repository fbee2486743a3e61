"""Shared fixtures: the pack imported under a fixed name, generated weights, a live host."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from paths import ROOT, TEST_MODEL, model_dir  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Hosts, the reference process and the batch tool share 2 cores here: OpenMP threads that busy-wait
# between ops steal them from one another (two servers rendered 3x slower). Waiting passively keeps the
# thread count, so every result is bit for bit the same.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(ROOT / "scripts"))
from _pack import import_pack  # noqa: E402

import_pack()


def generated_model_dir(size: str = "test", components: str = "all") -> Path:
    """The generated released-layout model of this size, written on first use (at least ``components``)."""
    from refenv import reference_python, offline_env

    out = model_dir(size)
    proc = subprocess.run([str(reference_python()), str(ROOT / "scripts" / "make_weights.py"), "--size", size,
                           "--components", components],
                          capture_output=True, text=True, env=offline_env(), timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"weights generator failed:\n{proc.stderr[-4000:]}")
    return out


@pytest.fixture(scope="session")
def test_model_dir() -> Path:
    return generated_model_dir("test")


def comfy_on_path():
    """Make the host's modules importable in this process (CPU only, tests/comfy_inprocess.py), with the
    text encoder in fp32 as the session host runs it."""
    import comfy_inprocess  # noqa: F401  (puts comfy on sys.path, CPU mode)
    import comfy.cli_args

    comfy.cli_args.args.fp32_text_enc = True  # fp16 would move numbers by ~3e-3 from the reference


@pytest.fixture(scope="session")
def host_unet_file(test_model_dir, tmp_path_factory) -> Path:
    """The generated UNet converted to the SD layout the host's UNETLoader accepts."""
    comfy_on_path()
    import json
    from safetensors.torch import save_file
    from blip_diffusion.nodes import host_models

    unet = test_model_dir / "unet"
    sd = host_models.read_state_dict(host_models.component_weights(str(unet)))
    converted = host_models.diffusers_unet_to_host(sd, json.loads((unet / "config.json").read_text()))
    out = tmp_path_factory.mktemp("unet") / "blipdiff-test-unet.safetensors"
    save_file({k: v.contiguous() for k, v in converted.items()}, str(out))
    return out


def safetensors_copy(source: Path, out: Path) -> Path:
    """A component's .bin saved as the single safetensors file the host's loaders are given."""
    import torch
    from safetensors.torch import save_file

    if not out.exists():
        save_file({k: v.contiguous() for k, v in torch.load(source, weights_only=True).items()}, str(out))
    return out


def released_names(test_model_dir: Path, host_unet_file: Path, models: dict, tmp_path_factory) -> dict:
    """``models`` plus the generated weights under the names the shipped workflows use (README, *Where the
    weights go*), so shipped workflows run with their file names unchanged."""
    files = tmp_path_factory.mktemp("released-names")
    extra = {
        "blip_diffusion": {"blipdiffusion": test_model_dir, "blipdiffusion-controlnet": test_model_dir},
        "diffusion_models": {"blipdiffusion_unet.safetensors": host_unet_file},
        "text_encoders": {"blipdiffusion_text_encoder.safetensors": safetensors_copy(
            test_model_dir / "text_encoder" / "pytorch_model.bin", files / "text_encoder.safetensors")},
        "vae": {"blipdiffusion_vae.safetensors": safetensors_copy(
            test_model_dir / "vae" / "diffusion_pytorch_model.bin", files / "vae.safetensors")},
    }
    merged = {folder: dict(entries) for folder, entries in models.items()}
    for folder, entries in extra.items():
        merged.setdefault(folder, {}).update(entries)
    return merged


@pytest.fixture(scope="session")
def controlnet_files(test_model_dir) -> dict[str, Path]:
    """models/controlnet/: the generated depth ControlNet in the single-file layout (tests/controlnets.py),
    under its own name and under every name a shipped workflow's ControlNetLoader uses."""
    comfy_on_path()
    import json
    from controlnets import DEPTH_FILE, depth_controlnet_file

    path = depth_controlnet_file(test_model_dir / "controlnet", test_model_dir.parent / "controlnet-test")
    shipped = {n["inputs"]["control_net_name"] for wf in (ROOT / "workflows" / "api").glob("*.json")
               for n in json.loads(wf.read_text()).values() if n["class_type"] == "ControlNetLoader"}
    return {name: path for name in sorted({DEPTH_FILE, *shipped})}


@pytest.fixture(scope="session")
def comfy_server(test_model_dir, host_unet_file, controlnet_files, tmp_path_factory, request):
    """One warm host for the session, fp32 everywhere so numbers compare to the reference."""
    from blip_diffusion.api.server import ComfyServer, make_base_dir

    base = make_base_dir(tmp_path_factory.mktemp("comfy-base"), released_names(test_model_dir, host_unet_file, {
        "blip_diffusion": {TEST_MODEL: test_model_dir},
        "diffusion_models": {"blipdiff-test-unet.safetensors": host_unet_file},
        "text_encoders": {"blipdiff-test-clip.bin": test_model_dir / "text_encoder" / "pytorch_model.bin"},
        "vae": {"blipdiff-test-vae.bin": test_model_dir / "vae" / "diffusion_pytorch_model.bin"},
        "controlnet": controlnet_files,
    }, tmp_path_factory))
    server = ComfyServer(base, ["--fp32-text-enc", "--fp32-unet", "--fp32-vae"])
    server.start()
    _live_servers.append(server)
    yield server
    _live_servers.remove(server)
    server.stop()


_live_servers: list = []


def shipped_finetune_files() -> set[str]:
    """The fine-tune files the shipped workflows save (and their reuse workflows load)."""
    return {f"{node['inputs']['name']}.safetensors" for path in (ROOT / "workflows" / "api").glob("*.json")
            for node in json.loads(path.read_text()).values() if node.get("class_type") == "SaveBlipFinetune"}


@pytest.fixture(scope="module", autouse=True)
def drop_saved_finetunes():
    """Full-UNet fine-tune files are UNet-sized (2.2 GB at test size): each module's go when it ends,
    so a run's disk use stays flat. The shipped workflows' own file stays (one file, the same for every
    module that needs it), so that each module does not train it again."""
    yield
    keep = shipped_finetune_files()
    for server in _live_servers:
        for f in (server.base_dir / "models" / "blip_finetunes").glob("*.safetensors"):
            if f.name not in keep:
                f.unlink()


def free_gb(path) -> float:
    return shutil.disk_usage(path).free / 2**30


def pytest_report_header(config):
    import tempfile
    return (f"disk free: {free_gb(tempfile.gettempdir()):.1f} GiB in {tempfile.gettempdir()}, "
            f"{free_gb(ROOT):.1f} GiB beside the pack (a full run needs about 10 GiB of scratch)")


@pytest.fixture
def api(comfy_server, request):
    """A client for the session host; the server log is printed if the test fails."""
    from blip_diffusion.api.client import ComfyClient

    start = len(comfy_server.log())
    yield ComfyClient(comfy_server.url)
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print("---- ComfyUI server log (this test) ----\n" + comfy_server.log()[start:][-8000:])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
