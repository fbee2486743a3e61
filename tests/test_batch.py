"""The batch tool (batch/) run as users run it: a subprocess talking to a live host over HTTP and /ws.

Every render is small (64 px, 2 steps). Subject photos are fresh random noise per test, so the
host's cache never holds them from an earlier test and encoder counts are exact.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from paths import ROOT, TEST_MODEL

TOOL = ROOT / "batch"
MODEL = TEST_MODEL
SMALL = {"steps": 2, "size": 64}


# -- helpers ---------------------------------------------------------------------------
def noise_image(path: Path, size: int = 64) -> Path:
    from PIL import Image

    Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)).save(path)
    return path


def tool_args(batch: Path, out: Path, server, *extra) -> list[str]:
    return [sys.executable, str(TOOL), str(batch), "--url", server.url, "--out", str(out), "--model", MODEL,
            *extra]


def run_tool(batch, out, server, *extra, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(tool_args(batch, out, server, *extra), capture_output=True, text=True, timeout=timeout)


def start_tool(batch, out, server, log: Path, *extra) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen(tool_args(batch, out, server, "--no-progress", *extra), stdout=f,
                            stderr=subprocess.STDOUT, text=True)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def wait_for(out: Path, proc: subprocess.Popen, ok, what: str, timeout: float = 600) -> dict:
    """Poll the manifest until ``ok(manifest)`` holds (the tool keeps running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            m = manifest(out)
            if ok(m):
                return m
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, f"the tool exited early with {proc.returncode} (waiting for {what})"
        time.sleep(0.05)
    raise TimeoutError(f"not seen within {timeout}s: {what}")


def wait_done(out: Path, proc: subprocess.Popen, at_least: int, timeout: float = 600) -> dict:
    """Poll the manifest until ``at_least`` items are done (the tool keeps running)."""
    return wait_for(out, proc, lambda m: m["summary"]["done"] >= at_least, f"{at_least} item(s) done", timeout)


def batch_history(api, batch_id: str) -> dict:
    """The host's own record: every prompt it ran for this batch (tagged in extra_data)."""
    return {pid: e for pid, e in api.history().items()
            if (e["prompt"][3].get("blip_batch") or {}).get("batch") == batch_id}


def encoder_ran(entry: dict) -> bool:
    cached = {n for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}
    return entry["status"]["status_str"] == "success" and "encode" not in cached


def check_done(out: Path, rec: dict, size: int = 64) -> None:
    from PIL import Image

    assert rec["status"] == "done", rec
    assert rec["outputs"] == [f"{rec['id']}.png"]
    with Image.open(out / rec["outputs"][0]) as im:
        assert im.size == (size, size)
    assert rec["prompt_id"] and rec["render_seconds"] > 0 and rec["finished_at"]


# -- without a host --------------------------------------------------------------------
def test_batch_file_formats_agree_and_ids_are_stable(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from _pack import import_pack

    import_pack()
    from blip_diffusion.batch.spec import BatchFileError, load_batch

    a, b = noise_image(tmp_path / "a.png"), noise_image(tmp_path / "b.png")
    defaults = {"seed": 0, "steps": 25, "width": 512, "height": 512, "negative": "", "cfg": 7.5,
                "target_category": ""}
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"subjects": [{"image": "a.png", "category": "dog"},
                                             {"image": "b.png", "category": "cat"}],
                                "prompts": ["on a beach", "in snow"], "seeds": [1, 2], **SMALL}))
    items, _ = load_batch(grid, defaults)
    jsonl = tmp_path / "items.jsonl"
    # the same renders as single items, interleaved: the tool groups them by subject again
    rows = [dict(image=i.image, category=i.category, prompt=i.prompt, seed=i.seed, **SMALL) for i in items]
    rows = [r for pair in zip(rows[:4], rows[4:]) for r in pair]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = tmp_path / "items.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "category", "prompt", "seed", "steps", "size"])
        w.writeheader()
        w.writerows(rows)
    from_jsonl, _ = load_batch(jsonl, defaults)
    from_csv, _ = load_batch(table, defaults)
    ids = [i.id for i in items]
    assert len(set(ids)) == 8
    assert [i.id for i in from_jsonl] == [i.id for i in from_csv] == ids == [i.id for i in load_batch(grid, defaults)[0]]
    assert [i.category for i in items] == ["dog"] * 4 + ["cat"] * 4  # subjects back to back
    assert items[0].image_path == a and items[-1].image_path == b and (items[0].width, items[0].steps) == (64, 2)

    for bad, msg in [({"image": "a.png", "category": "dog", "promt": "x"}, "unknown field"),
                     ({"image": "a.png", "prompt": "x"}, "'category' is required"),
                     ({"image": "a.png", "category": "dog", "prompt": "x", "size": 60}, "multiple of 8"),
                     ({"image": "a.png", "category": "dog", "prompt": "x", "id": "../x"}, "'id'")]:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(BatchFileError, match=msg):
            load_batch(path, defaults)


def test_fill_sets_every_slot_by_node_id_and_refuses_a_missing_one():
    from blip_diffusion.batch.graph import SLOTS, TemplateError, fill, load_workflow

    shipped = load_workflow("zero_shot")
    before = json.dumps(shipped, sort_keys=True)
    values = {slot: f"v-{slot}" for slot in SLOTS}
    g = fill(shipped, **values)
    for slot, (node, name) in SLOTS.items():
        assert g[node]["inputs"][name] == f"v-{slot}", slot
    assert json.dumps(shipped, sort_keys=True) == before, "fill changed the workflow it was given"
    g = fill(shipped, size=320, seed=None)
    assert (g["latent"]["inputs"]["width"], g["latent"]["inputs"]["height"]) == (320, 320)
    assert g["sample"]["inputs"]["noise_seed"] == shipped["sample"]["inputs"]["noise_seed"]
    renamed = dict(shipped)
    renamed["prompt_node"] = renamed.pop("positive")
    with pytest.raises(TemplateError, match="positive.prompt"):
        fill(renamed, prompt="a teapot on the moon")


USER_GRAPH = ROOT / "tests" / "data" / "user_zero_shot_api.json"  # scripts/export_user_graph.py


def only(graph: dict, class_type: str) -> str:
    ids = [k for k, n in graph.items() if n["class_type"] == class_type]
    assert len(ids) == 1, (class_type, ids)
    return ids[0]


def test_a_user_exported_graph_is_read_by_structure_and_ambiguity_is_named(tmp_path):
    """A frontend export (numeric ids, an upscaler, two saves, a preview): every field lands on the node the
    graph's links say; two candidates are refused with the mark that resolves them."""
    from blip_diffusion.batch.graph import TemplateError
    from blip_diffusion.batch.template import Template

    user = json.loads(USER_GRAPH.read_text())
    assert all(k.isdigit() for k in user), "the fixture is a frontend export with numeric ids"
    t = Template(USER_GRAPH)
    sampler = only(user, "SamplerCustom")
    expected = {"image": (only(user, "LoadImage"), "image"), "category": (only(user, "SubjectEncode"), "category"),
                "prompt": (only(user, "SubjectConditioning"), "prompt"), "seed": (sampler, "noise_seed"),
                "cfg": (sampler, "cfg"), "steps": (only(user, "BlipPNDMScheduler"), "steps"),
                "width": (only(user, "EmptyLatentImage"), "width"), "negative": (only(user, "CLIPTextEncode"), "text"),
                "model": (only(user, "BlipDiffusionLoader"), "model_name")}
    for name, where in expected.items():
        assert t.slots.inputs[name] == where, name
    saves = sorted((k for k, n in user.items() if n["class_type"] == "SaveImage"), key=int)
    assert t.slots.saves == saves and len(saves) == 2
    item = SimpleNamespace(category="dog", prompt="on the moon", seed=41, steps=3, width=96, height=64,
                           negative="blurry", cfg=5.0, target_category="")  # what fill reads of an item
    g = t.fill(item, "up/x.png", "my-model", "blip_batch/b/item")
    for name, value in {"image": "up/x.png", "category": "dog", "prompt": "on the moon", "seed": 41, "cfg": 5.0,
                        "steps": 3, "width": 96, "negative": "blurry", "model": "my-model"}.items():
        node, key = expected[name]
        assert g[node]["inputs"][key] == value, name
    assert g[expected["width"][0]]["inputs"]["height"] == 64
    assert [g[k]["inputs"]["filename_prefix"] for k in saves] == ["blip_batch/b/item", "blip_batch/b/item_1"]
    upscale = only(user, "ImageScaleBy")
    assert g[upscale]["inputs"] == user[upscale]["inputs"], "nodes the batch does not fill are kept as they are"

    def write(graph) -> Path:
        path = tmp_path / f"g{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(graph))
        return path

    # a hires pass: a second sampler starting from the first one's latent; the first one takes the seed
    hires = json.loads(json.dumps(user))
    hires["99"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": 7, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "denoise": 0.5, "positive": [expected["prompt"][0], 0], "negative": ["5", 0], "latent_image": [sampler, 0]}}
    assert Template(write(hires)).slots.inputs["seed"] == (sampler, "noise_seed")
    # two subject conditionings into one positive: refused, named, and resolved by a title mark
    two = json.loads(json.dumps(user))
    first_cond = expected["prompt"][0]
    two["50"] = json.loads(json.dumps(two[first_cond]))
    two["51"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": [first_cond, 0],
                                                                 "conditioning_2": ["50", 0]}}
    two[sampler]["inputs"]["positive"] = ["51", 0]
    with pytest.raises(TemplateError, match=r"found 2 \(#4 SubjectConditioning, #50 SubjectConditioning\).*batch:prompt"):
        Template(write(two))
    two["50"]["_meta"] = {"title": "Second subject batch:prompt"}
    assert Template(write(two)).slots.inputs["prompt"] == ("50", "prompt")
    # a seed fed by a link cannot be set per item
    linked = json.loads(json.dumps(user))
    linked["60"] = {"class_type": "PrimitiveInt", "inputs": {"value": 3}}
    linked[sampler]["inputs"]["noise_seed"] = ["60", 0]
    with pytest.raises(TemplateError, match="noise_seed is fed by a link"):
        Template(write(linked))
    # an item field the workflow has nowhere to put is reported (the tool warns), one it has is not
    zero_negative = json.loads(json.dumps(user))
    zero_negative["5"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}}
    assert Template(write(zero_negative)).unused([item]) == ["negative"] and t.unused([item]) == []
    # the UI format is named as such
    ui = write(json.loads((ROOT / "example_workflows" / "zero_shot.json").read_text()))
    with pytest.raises(TemplateError, match=r"UI workflow.*Export \(API\)"):
        Template(ui)
    # no subject encoder: say what is missing
    with pytest.raises(TemplateError, match="one Subject Encode node"):
        Template(ROOT / "workflows" / "api" / "saved_subject_reuse.json")


def test_tool_runs_from_any_folder_without_torch(tmp_path):
    """The client side needs no torch: the whole tool imports with the stdlib, requests (and websocket)."""
    noise_image(tmp_path / "a.png")
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"image": "a.png", "category": "dog", "prompt": "x", "seed": 3}) + "\n")
    code = (f"import runpy, sys\nsys.argv = ['batch', {str(batch)!r}, '--out', {str(tmp_path / 'o')!r}, '--dry-run']\n"
            f"try:\n    runpy.run_path({str(TOOL)!r}, run_name='__main__')\nexcept SystemExit as e:\n    rc = e.code\n"
            "import blip_diffusion.batch.runner\n"
            "print('RC', rc, 'TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "RC 0 NO-TORCH" in proc.stdout
    assert "dog" in proc.stdout and "seed 3" in proc.stdout


def test_manifest_transitions_set_and_drop_their_fields(tmp_path):
    """Each state change writes the record keys docs/batch.md lists for it and drops the stale ones."""
    from blip_diffusion.batch.manifest import Manifest

    m = Manifest(tmp_path).load()
    m.order = ["a"]
    about = {"source": "b.jsonl:1", "params": {"seed": 1}}
    first = m.queued("a", **about)
    assert m.get("a")["attempts"] == 1 and m.queued("a", **about) == first  # still queued: same id, same try
    m.failed("a", "boom", **about)
    assert m.get("a")["error"] == "boom" and m.get("a")["finished_at"] and m.get("a")["prompt_id"] == first
    m.pending("a")
    assert "error" not in m.get("a") and m.get("a")["status"] == "pending"
    second = m.queued("a", **about)
    assert second != first and m.get("a")["attempts"] == 2 and "finished_at" not in m.get("a")
    m.posted_as("a", "host-id")
    m.done("a", ["a.png"], 1.5, True, [{"filename": "x.png"}])
    assert m.get("a") == {"id": "a", "status": "done", "prompt_id": "host-id", "queued_at": m.get("a")["queued_at"],
                          "attempts": 2, **about, "outputs": ["a.png"], "finished_at": m.get("a")["finished_at"],
                          "render_seconds": 1.5, "encoder_ran": True, "host_outputs": [{"filename": "x.png"}]}
    m.outputs_lost("a")
    assert m.get("a")["status"] == "pending" and not {"prompt_id", "outputs"} & m.get("a").keys()
    m.queued("a", **about)
    assert not {"finished_at", "render_seconds", "encoder_ran"} & m.get("a").keys()
    m.cancelled("a")
    assert m.get("a")["status"] == "pending" and not {"prompt_id", "queued_at"} & m.get("a").keys()
    m.save()
    assert json.loads((tmp_path / "manifest.json").read_text())["summary"] == {
        "total": 1, "done": 0, "failed": 0, "queued": 0, "pending": 1}

    # a latent batch: its items take the prompt id they are given and keep where their image sits
    shared = m.queued("a", **about, batch={"seed": 1, "size": 2, "index": 0})
    assert m.queued("b", **about, prompt_id=shared, batch={"seed": 1, "size": 2, "index": 1}) == shared
    assert m.get("b")["batch"] == {"seed": 1, "size": 2, "index": 1} and m.get("b")["attempts"] == 1
    m.done("b", ["b.png"], 1.0, False, [])
    assert m.get("b")["batch"]["index"] == 1  # done: says how to render the image again
    tries = m.get("a")["attempts"]
    assert m.queued("a", **about, prompt_id="new") == "new" and m.get("a")["attempts"] == tries + 1  # a new prompt
    assert "batch" not in m.get("a")  # alone this time: its own seed
    for back in (m.pending, m.cancelled, m.released, m.outputs_lost):
        m.queued("b", **about, batch={"seed": 1, "size": 2, "index": 1})
        back("b")
        assert "batch" not in m.get("b"), back.__name__


def test_history_entry_is_read_in_one_place():
    from blip_diffusion.api.history import PromptHistory

    messages = [["execution_start", {"timestamp": 1000}], ["execution_cached", {"nodes": ["load", "encode"]}],
                ["execution_success", {"timestamp": 3500}]]
    ok = PromptHistory.finished({"p": {"outputs": {"save": {"images": []}},
                                       "status": {"status_str": "success", "completed": True, "messages": messages}}}, "p")
    assert ok.succeeded and ok.cached_nodes() == {"load", "encode"} and ok.execution_seconds() == 2.5
    assert ok.execution_error() is None and ok.outputs == {"save": {"images": []}}
    assert PromptHistory.finished({"p": {"outputs": {}}}, "p") is None and PromptHistory.finished({}, "p") is None
    error = {"node_id": "7", "node_type": "KSampler", "exception_type": "ValueError", "exception_message": "bad\n"}
    failed = PromptHistory.finished({"p": {"status": {"status_str": "error", "completed": False,
                                                      "messages": [["execution_error", error]]}}}, "p")
    assert not failed.succeeded and failed.execution_error() == error and failed.execution_seconds() is None
    assert failed.error_message() == "node 7 (KSampler): ValueError: bad"
    stopped = PromptHistory({"status": {"status_str": "error", "messages": [
        ["execution_interrupted", {"node_id": "7", "node_type": "KSampler"}]]}})
    assert stopped.error_message() == "interrupted on the host at node 7 (KSampler)"


# -- against a live host ---------------------------------------------------------------
@pytest.mark.slow
def test_queued_renders_complete_and_each_subject_is_encoded_once(comfy_server, api, tmp_path):
    noise_image(tmp_path / "dog.png")
    noise_image(tmp_path / "pot.png")
    batch = tmp_path / "grid.json"
    batch.write_text(json.dumps({
        "subjects": [{"image": "dog.png", "category": "dog"}, {"image": "pot.png", "category": "teapot"}],
        "prompts": ["on a beach", "in the snow"], "seeds": [7, 8], **SMALL}))  # 8 items, 4 per subject
    out = tmp_path / "out"
    proc = run_tool(batch, out, comfy_server)
    print(proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-4000:]

    m = manifest(out)
    assert m["summary"] == {"total": 8, "done": 8, "failed": 0, "queued": 0, "pending": 0}
    assert len({r["id"] for r in m["items"]}) == 8
    for rec in m["items"]:
        check_done(out, rec)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["outputs"][0] for r in m["items"])
    # fed by /ws: the bar (tqdm in the host venv) counted to the end
    assert "8/8" in proc.stderr

    history = batch_history(api, m["batch_id"])
    assert set(history) == {r["prompt_id"] for r in m["items"]}  # one prompt per item, no more
    encoder_runs = sum(encoder_ran(e) for e in history.values())
    print(f"encoder executions (host history): {encoder_runs} for 2 subjects, 8 renders")
    assert encoder_runs == 2
    assert sum(r["encoder_ran"] for r in m["items"]) == 2
    # one upload per photo, named by content
    uploads = [r["prompt"][2]["reference"]["inputs"]["image"] for r in history.values()]
    assert len(set(uploads)) == 2 and all(u.startswith("blip_batch/") for u in uploads)


@pytest.mark.slow
def test_killed_and_restarted_batch_loses_nothing_and_renders_nothing_twice(comfy_server, api, tmp_path):
    noise_image(tmp_path / "cat.png")
    batch = tmp_path / "items.jsonl"
    batch.write_text("".join(json.dumps({"image": "cat.png", "category": "cat", "prompt": p, "seed": s, **SMALL})
                             + "\n" for p in ("on a sofa", "in a garden", "on the moon") for s in (1, 2)))
    out = tmp_path / "out"

    # 1. Ctrl-C after the first image: not-started prompts are taken off the host queue
    proc = start_tool(batch, out, comfy_server, tmp_path / "run1.log")
    wait_done(out, proc, 1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, (tmp_path / "run1.log").read_text()
    after_int = manifest(out)
    assert after_int["summary"]["done"] < 6 and after_int["summary"]["queued"] <= 2
    pending_on_host = {e[1] for e in api.get("/queue").json()["queue_pending"]}
    assert not pending_on_host & {r.get("prompt_id") for r in after_int["items"]}

    # 2. SIGKILL (a crash) with prompts still queued on the host
    proc = start_tool(batch, out, comfy_server, tmp_path / "run2.log")
    m = wait_done(out, proc, after_int["summary"]["done"] + 1)
    proc.kill()
    proc.wait(timeout=60)
    killed = manifest(out)
    print("after SIGINT:", after_int["summary"], "after SIGKILL:", killed["summary"])
    assert killed["summary"]["done"] < 6 and killed["summary"]["queued"] >= 1  # really mid-batch

    # 3. restart: collects what the host rendered meanwhile, queues only the rest
    proc3 = run_tool(batch, out, comfy_server, "--no-progress")
    assert proc3.returncode == 0, proc3.stderr[-4000:]
    print(proc3.stderr[-2000:])
    assert "resuming:" in proc3.stderr
    final = manifest(out)
    assert final["summary"] == {"total": 6, "done": 6, "failed": 0, "queued": 0, "pending": 0}
    for rec in final["items"]:
        check_done(out, rec)
    # the prompt ids recorded as queued before the kill were collected, not queued again
    for rec in killed["items"]:
        if rec.get("status") == "queued":
            assert next(r for r in final["items"] if r["id"] == rec["id"])["prompt_id"] == rec["prompt_id"]

    history = batch_history(api, final["batch_id"])
    items_run = sorted(e["prompt"][3]["blip_batch"]["item"] for e in history.values())
    print(f"host ran {len(history)} prompts for 6 items over 3 runs of the tool")
    assert items_run == sorted(r["id"] for r in final["items"])  # each item exactly once
    assert all(e["status"]["status_str"] == "success" for e in history.values())

    # 4. a lost output file comes back from the host without a new render
    lost = out / final["items"][0]["outputs"][0]
    lost.unlink()
    proc4 = run_tool(batch, out, comfy_server, "--no-progress")
    assert proc4.returncode == 0, proc4.stderr[-4000:]
    assert lost.is_file() and len(batch_history(api, final["batch_id"])) == 6


def test_a_user_exported_graph_with_extra_nodes_is_batched(comfy_server, api, tmp_path):
    """The frontend export with an upscaler, a second save and a preview: every item's two saved images
    are collected (the preview, a temp file, is not), the main one has the same pixels as the shipped
    template's render of the same item, the upscaled one is it at 2x, and the subject is encoded once."""
    import numpy as np
    from PIL import Image

    noise_image(tmp_path / "dog.png")
    batch = tmp_path / "b.json"
    batch.write_text(json.dumps({"subjects": [{"image": "dog.png", "category": "dog"}], "prompts": ["in snow"],
                                 "seeds": [3, 4], **SMALL}))
    mine, shipped = tmp_path / "mine", tmp_path / "shipped"
    proc = run_tool(batch, mine, comfy_server, "--workflow", str(USER_GRAPH), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert run_tool(batch, shipped, comfy_server, "--no-progress").returncode == 0
    records = manifest(mine)["items"]
    assert [r["encoder_ran"] for r in records] == [True, False]

    def pixels(path):
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    for rec, ref in zip(records, manifest(shipped)["items"]):
        assert rec["id"] == ref["id"] and rec["status"] == "done"
        assert rec["outputs"] == [f"{rec['id']}_0.png", f"{rec['id']}_1.png"]
        main, upscaled = pixels(mine / rec["outputs"][0]), pixels(mine / rec["outputs"][1])
        assert main.shape == (64, 64, 3)
        assert np.array_equal(main, pixels(shipped / ref["outputs"][0]))
        assert np.array_equal(upscaled, main.repeat(2, axis=0).repeat(2, axis=1))
    assert not np.array_equal(pixels(mine / records[0]["outputs"][0]), pixels(mine / records[1]["outputs"][0]))


def test_one_bad_item_is_reported_and_the_others_finish(comfy_server, api, tmp_path):
    noise_image(tmp_path / "shoe.png")
    batch = tmp_path / "items.csv"
    batch.write_text("image,category,prompt,seed,steps,size\n"
                     "shoe.png,sneaker,on a rock,1,2,64\n"
                     "photos/missing.png,sneaker,on a rock,2,2,64\n"
                     "shoe.png,sneaker,in the rain,3,2,64\n")
    out = tmp_path / "out"
    proc = run_tool(batch, out, comfy_server, "--no-progress")
    print(proc.stderr[-2000:])
    assert proc.returncode == 1
    m = manifest(out)
    assert m["summary"] == {"total": 3, "done": 2, "failed": 1, "queued": 0, "pending": 0}
    bad = [r for r in m["items"] if r["status"] == "failed"]
    assert len(bad) == 1 and bad[0]["params"]["image"] == "photos/missing.png"
    assert "image not found" in bad[0]["error"] and "missing.png" in bad[0]["error"] and "items.csv:3" in bad[0]["error"]
    assert f"failed {bad[0]['id']}: image not found" in proc.stderr
    for rec in m["items"]:
        if rec["status"] == "done":
            check_done(out, rec)
    assert len(batch_history(api, m["batch_id"])) == 2  # the bad item never reached the host


def test_host_side_failures_are_recorded_with_the_hosts_message(comfy_server, api, tmp_path):
    """A prompt the host rejects (node_errors) and one that fails while running (execution_error)."""
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    noise_image(tmp_path / "ok.png")
    batch = tmp_path / "items.jsonl"
    batch.write_text(json.dumps({"id": "too-much-cfg", "image": "ok.png", "category": "dog", "prompt": "x",
                                 "seed": 1, "cfg": 1000, **SMALL}) + "\n"
                     + json.dumps({"id": "broken-photo", "image": "broken.png", "category": "dog", "prompt": "x",
                                   "seed": 1, **SMALL}) + "\n")
    out = tmp_path / "out"
    proc = run_tool(batch, out, comfy_server, "--no-progress")
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = {r["id"]: r.get("error", "") for r in manifest(out)["items"]}
    assert manifest(out)["summary"]["failed"] == 2
    assert "rejected by the host" in errors["too-much-cfg"] and "cfg" in errors["too-much-cfg"]
    assert "LoadImage" in errors["broken-photo"], errors["broken-photo"]


def test_crash_between_recording_and_posting_a_prompt(comfy_server, api, tmp_path):
    """A prompt id on disk that the host never received is posted under that id: one render, no gap."""
    noise_image(tmp_path / "vase.png")
    batch = tmp_path / "one.jsonl"
    batch.write_text(json.dumps({"image": "vase.png", "category": "vase", "prompt": "on a shelf", "seed": 5,
                                 **SMALL}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    listing = run_tool(batch, out, comfy_server, "--dry-run").stdout
    item_id = listing.splitlines()[1].split("\t")[0]
    batch_id, prompt_id = uuid.uuid4().hex, str(uuid.uuid4())
    (out / "manifest.json").write_text(json.dumps({"version": 1, "batch_id": batch_id, "items": [
        {"id": item_id, "status": "queued", "prompt_id": prompt_id, "attempts": 1}]}))
    proc = run_tool(batch, out, comfy_server, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = manifest(out)["items"][0]
    check_done(out, rec)
    assert rec["prompt_id"] == prompt_id
    assert list(batch_history(api, batch_id)) == [prompt_id]


def test_seeds_of_one_subject_and_prompt_share_a_latent_batch(comfy_server, api, tmp_path):
    """--batch-size 3 over seeds 5-9 of one prompt and one other prompt: three prompts (5,6,7 | 8,9 | the
    other), each image saved under its own item, and each recorded (seed, size, index) renders that image
    again on its own: the shipped graph with its latent batch cut to that index by the host's
    LatentFromBatch (whose batch_index makes the host draw that image's noise, and only it)."""
    import io

    import numpy as np
    from PIL import Image

    from blip_diffusion.batch.template import Template

    noise_image(tmp_path / "dog.png")
    batch = tmp_path / "b.jsonl"
    lines = [{"image": "dog.png", "category": "dog", "prompt": "in the snow", "seed": s, **SMALL} for s in range(5, 10)]
    lines.append({"image": "dog.png", "category": "dog", "prompt": "on a beach", "seed": 5, **SMALL})
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    proc = run_tool(batch, out, comfy_server, "--batch-size", "3", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = manifest(out)
    assert m["summary"]["done"] == 6
    by_seed = {(r["params"]["prompt"], r["params"]["seed"]): r for r in m["items"]}
    snow = [by_seed[("in the snow", s)] for s in range(5, 10)]
    assert [r.get("batch") for r in snow] == [{"seed": 5, "size": 3, "index": k} for k in range(3)] + \
        [{"seed": 8, "size": 2, "index": k} for k in range(2)]
    beach = by_seed[("on a beach", 5)]
    assert "batch" not in beach  # alone in its prompt: its own seed, as without --batch-size
    assert len({r["prompt_id"] for r in snow[:3]}) == 1 and len({r["prompt_id"] for r in snow[3:]}) == 1
    history = batch_history(api, m["batch_id"])
    assert len(history) == 3 and set(history) == {r["prompt_id"] for r in m["items"]}
    latents = {e["prompt"][2]["latent"]["inputs"]["batch_size"] for e in history.values()}
    assert latents == {3, 2, 1}
    for rec in m["items"]:
        check_done(out, rec)

    def pixels(data: bytes):
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB")).astype(np.int16)

    saved = {r["id"]: pixels((out / r["outputs"][0]).read_bytes()) for r in m["items"]}
    assert len({saved[r["id"]].tobytes() for r in snow}) == 5  # five different noises

    template = Template()
    upload = history[snow[0]["prompt_id"]]["prompt"][2]["reference"]["inputs"]["image"]
    for rec in (snow[1], snow[4]):
        item = SimpleNamespace(**{**rec["params"], "seed": rec["batch"]["seed"]})
        graph = template.fill(item, upload, MODEL, f"again/{rec['id']}", batch_size=rec["batch"]["size"])
        graph["pick"] = {"class_type": "LatentFromBatch",
                         "inputs": {"samples": ["latent", 0], "batch_index": rec["batch"]["index"], "length": 1}}
        graph["sample"]["inputs"]["latent_image"] = ["pick", 0]
        again = pixels(api.view(api.run(graph).images()[0]))
        diff = np.abs(again - saved[rec["id"]])
        others = min(np.abs(again - saved[o["id"]]).mean() for o in snow if o is not rec)
        print(f"{rec['id']} rendered again alone: max |diff| {diff.max()}, mean {diff.mean():.4f} "
              f"(nearest other image: mean {others:.1f})")
        # one image alone vs inside a batch of 3: the same noise, the UNet's batched sums may round apart
        assert diff.max() <= 2 and others > 10


def test_a_killed_latent_batch_run_resumes_without_repeats(comfy_server, api, tmp_path):
    """--batch-size 2 over six seeds (three prompts of two), SIGKILLed after the first prompt is done: the
    rerun collects or posts the rest by prompt, each item is done once, and the host ran three prompts."""
    noise_image(tmp_path / "cat.png")
    batch = tmp_path / "b.jsonl"
    batch.write_text("".join(json.dumps({"image": "cat.png", "category": "cat", "prompt": "on a sofa", "seed": s,
                                         **SMALL}) + "\n" for s in range(1, 7)))
    out = tmp_path / "out"
    proc = start_tool(batch, out, comfy_server, tmp_path / "run1.log", "--batch-size", "2")
    wait_done(out, proc, 2)
    proc.kill()
    proc.wait(timeout=60)
    killed = manifest(out)
    assert killed["summary"]["done"] in (2, 4) and killed["summary"]["queued"] >= 2, killed["summary"]
    again = run_tool(batch, out, comfy_server, "--batch-size", "2", "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    final = manifest(out)
    assert final["summary"]["done"] == 6
    for rec in final["items"]:
        check_done(out, rec)
    prompts = {}
    for rec in final["items"]:
        prompts.setdefault(rec["prompt_id"], []).append((rec["params"]["seed"], rec["batch"]["index"]))
    assert sorted(sorted(v) for v in prompts.values()) == [[(1, 0), (2, 1)], [(3, 0), (4, 1)], [(5, 0), (6, 1)]]
    for rec in killed["items"]:  # what was queued at the kill was collected under its prompt id, not posted again
        if rec.get("status") == "queued":
            assert next(r for r in final["items"] if r["id"] == rec["id"])["prompt_id"] == rec["prompt_id"]
    history = batch_history(api, final["batch_id"])
    assert set(history) == set(prompts) and all(e["status"]["status_str"] == "success" for e in history.values())
