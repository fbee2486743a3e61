"""The batch tool over several ComfyUI servers (docs/batch.md, *Several servers*): pull scheduling, a
server killed mid-batch, Ctrl-C and a rerun with the servers swapped.

Real CPU servers on loopback with the generated test model, 64 px, 2 PNDM steps (1 step would be the
lone t=0 step, which never calls the UNet). Memory: the session server (A), one more for this module
(B) and, for the kill test only, a disposable third one (C): never more than three ComfyUI processes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from test_batch import (MODEL, SMALL, TOOL, batch_history, check_done, encoder_ran, manifest, noise_image,
                        wait_for)

HOST_ARGS = ["--fp32-text-enc", "--fp32-unet", "--fp32-vae"]  # as the session server (conftest)


def start_server(tmp_path_factory, test_model_dir, name: str):
    from blip_diffusion.api.server import ComfyServer, make_base_dir

    base = make_base_dir(tmp_path_factory.mktemp(name), {"blip_diffusion": {MODEL: test_model_dir}})
    return ComfyServer(base, HOST_ARGS).start()


def test_the_manifest_records_the_server_and_clears_it_on_the_way_back_to_pending(tmp_path):
    from blip_diffusion.batch.manifest import Manifest

    m = Manifest(tmp_path).load()
    about = {"source": "b.jsonl:1", "params": {"seed": 1}}
    first = m.queued("a", **about, server="http://x:1")
    assert m.get("a")["server"] == "http://x:1"
    m.done("a", ["a.png"], 1.0, True, [], server="http://x:1")
    assert m.get("a")["server"] == "http://x:1"
    for back in (m.pending, m.cancelled, m.released, m.outputs_lost):
        m.queued("a", **about, server="http://y:2")
        back("a")
        assert m.get("a")["status"] == "pending" and "server" not in m.get("a"), back.__name__
    m.queued("a", **about, server="http://y:2")
    m.released("a")  # its server died: another one posts it under a new prompt id
    assert m.queued("a", **about, server="http://z:3") not in (first, None) and m.get("a")["server"] == "http://z:3"
    m.failed("a", "image not found")  # found here, before any server: none named
    assert "server" not in m.get("a")
    m.failed("a", "rejected by the host", server="http://z:3")
    assert m.get("a")["server"] == "http://z:3"


def test_servers_come_from_url_and_urls_file_in_order_once_each(tmp_path, monkeypatch):
    from blip_diffusion.batch.cli import parse_args

    listing = tmp_path / "servers.txt"
    listing.write_text("# the GPU boxes\nhttp://gpu2:8188/\n\nhttp://gpu1:8188  # again\nhttp://gpu3:8188\n")
    a = parse_args(["b.jsonl", "--out", "o", "--url", "http://gpu1:8188", "--urls-file", str(listing)])
    assert a.urls == ["http://gpu1:8188", "http://gpu2:8188", "http://gpu3:8188"] and a.url == "http://gpu1:8188"
    monkeypatch.setenv("COMFYUI_URL", "http://box:9000")
    assert parse_args(["b.jsonl", "--out", "o"]).urls == ["http://box:9000"]


@pytest.fixture(scope="module")
def server_b(comfy_server, test_model_dir, tmp_path_factory):
    server = start_server(tmp_path_factory, test_model_dir, "comfy-b")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    noise_image(folder / "dog.png")
    noise_image(folder / "pot.png")
    return folder


def grid(folder: Path, name: str, prompts: list[str], seeds: list[int]) -> Path:
    path = folder / name
    path.write_text(json.dumps({
        "subjects": [{"image": "dog.png", "category": "dog"}, {"image": "pot.png", "category": "teapot"}],
        "prompts": prompts, "seeds": seeds, **SMALL}))
    return path


def args(batch: Path, out: Path, servers, *extra) -> list[str]:
    urls = [a for s in servers for a in ("--url", s.url)]
    return [sys.executable, str(TOOL), str(batch), *urls, "--out", str(out), "--model", MODEL, *extra]


def run(batch, out, servers, *extra, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(args(batch, out, servers, *extra), capture_output=True, text=True, timeout=timeout)


def start(batch, out, servers, log: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen(args(batch, out, servers, "--no-progress", *extra), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, text=True)


def ran_items(api_url: str, batch_id: str) -> list[str]:
    from blip_diffusion.api.client import ComfyClient

    return [e["prompt"][3]["blip_batch"]["item"] for e in batch_history(ComfyClient(api_url), batch_id).values()]


def pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def same_pixels(out: Path, reference: Path) -> None:
    import numpy as np

    ref = {r["id"]: r for r in manifest(reference)["items"]}
    recs = manifest(out)["items"]
    assert sorted(ref) == sorted(r["id"] for r in recs)
    for rec in recs:
        assert np.array_equal(pixels(out / rec["outputs"][0]), pixels(reference / ref[rec["id"]]["outputs"][0])), \
            f"{rec['id']} (rendered on {rec['server']}) differs from the one-server render"


@pytest.fixture(scope="module")
def six(photos) -> Path:
    """2 subjects x 3 seeds."""
    return grid(photos, "six.json", ["in the snow"], [1, 2, 3])


@pytest.fixture(scope="module")
def reference(six, server_b, tmp_path_factory) -> Path:
    """The six items rendered on one server: what any spread of them must reproduce pixel for pixel."""
    out = tmp_path_factory.mktemp("reference") / "out"
    proc = run(six, out, [server_b], "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {r["server"] for r in manifest(out)["items"]} == {server_b.url}
    return out


@pytest.mark.slow
def test_twenty_items_over_two_servers(comfy_server, server_b, photos, tmp_path):
    """Pull scheduling: both servers render, the manifest says which rendered each item, each host ran one
    prompt per item it was given, and a subject stays on a server while it has items (at most one encoder
    run per subject and server; without the rule, each server would encode a subject once per switch)."""
    batch = grid(photos, "twenty.json", ["on a beach", "in the snow", "on a table", "in a forest", "under water"],
                 [7, 8])
    out = tmp_path / "out"
    proc = run(batch, out, [comfy_server, server_b])
    print(proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = manifest(out)
    assert m["summary"] == {"total": 20, "done": 20, "failed": 0, "queued": 0, "pending": 0}
    assert m["servers"] == [comfy_server.url, server_b.url]
    for rec in m["items"]:
        check_done(out, rec)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["outputs"][0] for r in m["items"])
    share = {url: sorted(r["id"] for r in m["items"] if r["server"] == url) for url in m["servers"]}
    print("share:", {url: len(ids) for url, ids in share.items()})
    assert all(share.values()) and sum(map(len, share.values())) == 20
    encodes = 0
    for server in (comfy_server, server_b):
        from blip_diffusion.api.client import ComfyClient

        history = batch_history(ComfyClient(server.url), m["batch_id"])
        assert sorted(e["prompt"][3]["blip_batch"]["item"] for e in history.values()) == share[server.url]
        assert set(history) == {r["prompt_id"] for r in m["items"] if r["server"] == server.url}
        subjects = {e["prompt"][2]["reference"]["inputs"]["image"] for e in history.values()}
        ran = sum(encoder_ran(e) for e in history.values())
        assert ran <= len(subjects), (server.url, ran, subjects)
        encodes += ran
    assert 2 <= encodes <= 4 and sum(r["encoder_ran"] for r in m["items"]) == encodes
    assert "20/20" in proc.stderr  # one bar for the batch
    assert f"servers: {comfy_server.url.split('//')[1]} {len(share[comfy_server.url])} (" in proc.stderr


@pytest.mark.slow
def test_a_server_killed_mid_batch_loses_nothing(comfy_server, test_model_dir, six, reference, tmp_path_factory,
                                                 tmp_path):
    """SIGKILL one of two servers while it holds prompts: they go back to the pool after --retry-for and the
    other renders them; every item done exactly once, pixel for pixel the one-server render."""
    doomed = start_server(tmp_path_factory, test_model_dir, "comfy-c")
    try:
        out = tmp_path / "out"
        proc = start(six, out, [comfy_server, doomed], tmp_path / "run.log", "--ahead", "2", "--retry-for", "3")

        def doomed_mid_work(m):
            mine = [r for r in m["items"] if r.get("server") == doomed.url]
            return any(r["status"] == "done" for r in mine) and any(r["status"] == "queued" for r in mine)

        wait_for(out, proc, doomed_mid_work, "the second server done with one item and holding another")
        os.killpg(doomed.proc.pid, signal.SIGKILL)
        doomed.proc.wait(timeout=30)
        at_kill = manifest(out)
        assert proc.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-4000:]
    finally:
        doomed.stop()
    log = (tmp_path / "run.log").read_text()
    print(log[-3000:])
    assert "does not answer" in log and "go to the other server(s)" in log
    m = manifest(out)
    assert m["summary"] == {"total": 6, "done": 6, "failed": 0, "queued": 0, "pending": 0}
    for rec in m["items"]:
        check_done(out, rec)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["outputs"][0] for r in m["items"])
    by_doomed = {r["id"] for r in m["items"] if r["server"] == doomed.url}
    lost_with_it = {r["id"] for r in at_kill["items"] if r.get("server") == doomed.url and r["status"] == "queued"}
    assert by_doomed and lost_with_it and not by_doomed & lost_with_it
    # the survivor ran each of the other items once, the dead server's prompts included (under new ids)
    on_a = ran_items(comfy_server.url, m["batch_id"])
    assert sorted(on_a) == sorted(r["id"] for r in m["items"] if r["server"] == comfy_server.url)
    assert sorted(on_a + sorted(by_doomed)) == sorted(r["id"] for r in m["items"])
    for rec in at_kill["items"]:
        if rec["id"] in lost_with_it:
            final = next(r for r in m["items"] if r["id"] == rec["id"])
            assert final["prompt_id"] != rec["prompt_id"] and final["attempts"] == rec["attempts"] + 1
    same_pixels(out, reference)


@pytest.mark.slow
def test_ctrl_c_then_rerun_with_the_servers_swapped(comfy_server, server_b, six, reference, tmp_path):
    """SIGINT with prompts left queued on both servers (--keep-queued); the rerun names the servers the other
    way round, finds each prompt on the server the manifest names and renders nothing twice."""
    out = tmp_path / "out"
    proc = start(six, out, [comfy_server, server_b], tmp_path / "run1.log", "--keep-queued")
    wait_for(out, proc, lambda m: m["summary"]["done"] >= 1 and m["summary"]["queued"] >= 2, "one done, two queued")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130, (tmp_path / "run1.log").read_text()
    stopped = manifest(out)
    print("after SIGINT:", stopped["summary"], [(r["status"], r.get("server")) for r in stopped["items"]])
    assert stopped["summary"]["done"] < 6 and stopped["summary"]["queued"] >= 1

    again = run(six, out, [server_b, comfy_server], "--no-progress")
    print(again.stderr[-2000:])
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming:" in again.stderr
    m = manifest(out)
    assert m["summary"] == {"total": 6, "done": 6, "failed": 0, "queued": 0, "pending": 0}
    for rec in stopped["items"]:
        if rec["status"] == "queued":  # collected where it was posted, not posted again
            final = next(r for r in m["items"] if r["id"] == rec["id"])
            assert (final["prompt_id"], final["server"]) == (rec["prompt_id"], rec["server"])
    ran = ran_items(comfy_server.url, m["batch_id"]) + ran_items(server_b.url, m["batch_id"])
    assert sorted(ran) == sorted(r["id"] for r in m["items"])  # each item exactly once, over both hosts
    same_pixels(out, reference)


def test_an_item_queued_on_a_server_not_in_this_run_is_posted_here(comfy_server, photos, tmp_path):
    """The manifest says the item's prompt went to a server this run does not use: its prompt id means nothing
    to this one, so the item is rendered here under a new id and the manifest names this server."""
    batch = photos / "one.jsonl"
    batch.write_text(json.dumps({"image": "dog.png", "category": "dog", "prompt": "on a shelf", "seed": 9,
                                 **SMALL}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    item_id = run(batch, out, [comfy_server], "--dry-run").stdout.splitlines()[1].split("\t")[0]
    elsewhere, old_id = "http://127.0.0.1:9", str(uuid.uuid4())
    (out / "manifest.json").write_text(json.dumps({"version": 1, "batch_id": uuid.uuid4().hex, "items": [
        {"id": item_id, "status": "queued", "prompt_id": old_id, "attempts": 1, "server": elsewhere}]}))
    proc = run(batch, out, [comfy_server], "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 queued on a server not in this run" in proc.stderr
    rec = manifest(out)["items"][0]
    check_done(out, rec)
    assert rec["server"] == comfy_server.url and rec["prompt_id"] != old_id and rec["attempts"] == 2
