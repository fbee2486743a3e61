"""Security: safe weight loading, file names confined to their folders, no network traffic."""
import ast
import textwrap
from pathlib import Path

import pytest
import torch

from blip_diffusion.blip_core.subject import Subject
from blip_diffusion.blip_core.subject_io import sanitise_name, save_subject
from paths import ROOT, TEST_MODEL

PACK_CODE = [p for d in ("blip_core", "nodes", "api", "batch") for p in (ROOT / d).rglob("*.py")]


def test_every_torch_load_in_the_pack_is_weights_only():
    calls = []
    for path in PACK_CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" \
                    and getattr(node.func.value, "id", None) == "torch":
                ok = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", ok))
    assert calls, "expected at least one torch.load (the released weights are pickles)"
    assert [c for c, ok in calls if not ok] == []


def test_pack_never_imports_pickle_or_network_clients():
    banned = {"pickle", "urllib.request", "http.client", "ftplib", "socket"}
    for path in [p for p in PACK_CODE if p.parts[-2] in ("blip_core", "nodes")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            assert not banned & set(names), f"{path.relative_to(ROOT)} imports {banned & set(names)}"


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/b", "..", ".hidden", "x\\y", "", "   ",
                                  "ok/../../escape"])
def test_subject_names_cannot_leave_their_folder(name):
    with pytest.raises(ValueError, match="not allowed"):
        sanitise_name(name)


def test_subject_save_refuses_overwrite_and_writes_atomically(tmp_path):
    s = Subject(torch.zeros(1, 16, 768), "dog")
    path = save_subject(s, str(tmp_path), "dog")
    with pytest.raises(FileExistsError):
        save_subject(s, str(tmp_path), "dog")
    save_subject(s, str(tmp_path), "dog", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dog.safetensors"]  # no temporary file left
    assert Path(path).name == "dog.safetensors"


def test_model_folder_names_cannot_climb_out(comfy_server, api):
    from blip_diffusion.api.client import ExecutionFailed, PromptRejected
    from graphs import put_input_image

    put_input_image(comfy_server, ROOT / "workflows" / "assets" / "sample_subject.png")

    graph = {"loader": {"class_type": "BlipDiffusionLoader", "inputs": {"model_name": "../../ComfyUI"}},
             "save": {"class_type": "SaveSubject", "inputs": {"subject": ["enc", 0], "name": "x", "overwrite": False}},
             "img": {"class_type": "LoadImage", "inputs": {"image": "sample_subject.png"}},
             "enc": {"class_type": "SubjectEncode", "inputs": {"subject_encoder": ["loader", 3],
                                                                "images": ["img", 0], "category": "dog"}}}
    # Refused by the host's validation or, failing that, by the loader itself.
    with pytest.raises((PromptRejected, ExecutionFailed), match="model_name|must be relative"):
        api.run(graph)


SOCKET_GUARD = textwrap.dedent('''
    # Loaded by the server process: records any connection to a non-loopback address and refuses it.
    import ipaddress, os, socket
    _log = os.environ["BLIP_NET_LOG"]
    open(_log + ".loaded", "w").close()
    _orig = socket.socket.connect
    def _connect(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None:
            try:
                ip = ipaddress.ip_address(socket.gethostbyname(host)) if host else None
            except OSError:
                ip = None
            if ip is None or not ip.is_loopback:
                with open(_log, "a") as f:
                    f.write(f"{host}\\n")
                raise OSError("network disabled by test")
        return _orig(self, address)
    socket.socket.connect = _connect
''')


def test_a_render_opens_no_network_connection(test_model_dir, tmp_path):
    """A host with non-loopback connections recorded and refused still renders the zero-shot graph."""
    import os
    import shutil

    from blip_diffusion.api.client import ComfyClient
    from blip_diffusion.api.server import ComfyServer, make_base_dir
    from graphs import zero_shot

    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(SOCKET_GUARD)
    log = tmp_path / "net.log"
    base = make_base_dir(tmp_path / "base", {"blip_diffusion": {TEST_MODEL: test_model_dir}})
    shutil.copy(ROOT / "workflows" / "assets" / "sample_subject.png", base / "input")
    env_before = dict(os.environ)
    os.environ.update(PYTHONPATH=str(guard), BLIP_NET_LOG=str(log))
    try:
        server = ComfyServer(base).start()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    try:
        result = ComfyClient(server.url).run(zero_shot(TEST_MODEL, "sample_subject.png", "teapot",
                                                       "on a beach", seed=1, steps=2, size=64, save_latent=False))
        assert len(result.images()) == 1
    finally:
        server.stop()
    assert Path(str(log) + ".loaded").exists(), "the socket guard was not active in the server"
    attempts = log.read_text().split() if log.exists() else []
    assert attempts == [], f"the host tried to reach {attempts}"
