"""Load and interruption through a real host's HTTP API.

- 50 prompts queued at once (two subjects, varying seeds, 5 invalid): every one ends, the valid
  ones with an image, the invalid ones with their own error; /history keeps every queued id;
  the server's memory after all 50 is within 10% of its memory after the first 10.
- An interrupt during a render: the history entry says interrupted, no file is written, the
  server keeps serving.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from blip_diffusion.api.client import PromptRejected
from graphs import put_input_image, zero_shot
from paths import ROOT, TEST_MODEL

SAMPLE = ROOT / "workflows" / "assets" / "sample_subject.png"
N_PROMPTS = 50


@pytest.fixture(scope="module")
def subjects(comfy_server):
    """Two subjects: the sample photo (a teapot) and its mirror image, called a vase."""
    flipped = comfy_server.base_dir / "input" / "load_flipped.png"
    Image.open(SAMPLE).transpose(Image.FLIP_LEFT_RIGHT).save(flipped)
    return [(put_input_image(comfy_server, SAMPLE), "teapot"), (flipped.name, "vase")]


def tiny_render(subject, seed: int, prompt: str = "on a beach", prefix: str = "load/render") -> dict:
    image, category = subject
    g = zero_shot(TEST_MODEL, image, category, prompt, seed=seed, steps=2, size=64, save_latent=False)
    g["save"]["inputs"]["filename_prefix"] = prefix
    return g


def finished(entry: dict | None) -> bool:
    status = (entry or {}).get("status") or {}
    return status.get("status_str") in ("success", "error") or bool(status.get("completed"))


def output_files(server) -> set[str]:
    out = server.base_dir / "output"
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


# Invalid prompts at these queue positions: (how it is broken, where it ends, words of its error)
INVALID = {
    7: ("blank category", "rejected", "category is empty"),
    15: ("steps 0", "rejected", "Value 0 smaller than min of 2"),
    23: ("category too long", "SubjectEncode", "category is too long"),
    31: ("prompt repeated less than once", "SubjectConditioning", "prompt_strength x prompt_reps must be at least 1"),
    42: ("weights for two images, one image", "SubjectEncode", "image_weights has 2 numbers but 1 images"),
}


def load_prompt(i: int, subjects) -> dict:
    g = tiny_render(subjects[i % 2], seed=1000 + i, prompt=["on a beach", "in the snow", "on a table"][i % 3],
                    prefix=f"load/p{i:02d}")
    if i == 7:
        g["encode"]["inputs"]["category"] = "  "
    elif i == 15:
        g["sigmas"]["inputs"]["steps"] = 0
    elif i == 23:
        g["encode"]["inputs"]["category"] = "dog " * 600
    elif i == 31:
        g["positive"]["inputs"].update(prompt_strength=0.05, prompt_reps=10)
    elif i == 42:
        g["encode"]["inputs"]["image_weights"] = "1, 2"
    return g


@pytest.mark.slow
def test_fifty_queued_prompts_all_end_and_memory_stays_flat(comfy_server, api, subjects):
    t0 = time.monotonic()
    queued: dict[int, str] = {}
    rejected: dict[int, PromptRejected] = {}
    for i in range(N_PROMPTS):
        try:
            queued[i] = api.queue(load_prompt(i, subjects))
        except PromptRejected as e:  # validation errors end at once, with their error
            rejected[i] = e
    assert sorted(rejected) == [i for i, (_, where, _) in INVALID.items() if where == "rejected"]
    for i, err in rejected.items():
        assert INVALID[i][2] in json.dumps(err.payload), err.payload

    order = sorted(queued)
    first10 = [queued[i] for i in order[:10]]
    rss_10 = None
    entries: dict[str, dict] = {}
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        history = api.history()
        entries = {pid: history.get(pid) for pid in queued.values()}
        if rss_10 is None and all(finished(entries[pid]) for pid in first10):
            rss_10 = comfy_server.rss_bytes()
        if all(finished(e) for e in entries.values()):
            break
        time.sleep(1.0)
    else:
        pytest.fail(f"{sum(not finished(e) for e in entries.values())} prompts did not finish")
    rss_50 = comfy_server.rss_bytes()
    elapsed = time.monotonic() - t0

    # nothing lost from /history: every queued id is there, finished
    history = api.history()
    assert set(queued.values()) <= set(history)
    on_disk = output_files(comfy_server)
    for i, pid in queued.items():
        status = history[pid]["status"]
        errors = [data for kind, data in status["messages"] if kind == "execution_error"]
        if i in INVALID:
            _, node, words = INVALID[i]
            assert status["status_str"] == "error" and len(errors) == 1, (i, status)
            assert errors[0]["node_type"] == node and words in errors[0]["exception_message"], (i, errors[0])
            assert not history[pid]["outputs"].get("save")
        else:
            assert status["status_str"] == "success" and not errors, (i, status)
            images = history[pid]["outputs"]["save"]["images"]
            assert len(images) == 1 and images[0]["filename"].startswith(f"p{i:02d}")
            assert f"{images[0]['subfolder']}/{images[0]['filename']}" in on_disk
    valid = N_PROMPTS - len(INVALID)
    print(f"{N_PROMPTS} prompts ({valid} valid) in {elapsed:.0f}s; server RSS after the first 10: "
          f"{rss_10 / 2**30:.2f} GiB, after all: {rss_50 / 2**30:.2f} GiB ({rss_50 / rss_10 - 1:+.1%})")
    assert rss_50 <= 1.10 * rss_10


def test_interrupt_during_a_render_leaves_the_server_healthy(comfy_server, api, subjects):
    import websocket

    # warm up (model loaded, subject encoded) so that the long render reaches the sampler quickly
    api.run(tiny_render(subjects[0], seed=1, prefix="interrupt/warm"))
    before = output_files(comfy_server)
    graph = zero_shot(TEST_MODEL, subjects[0][0], "teapot", "on a beach", seed=2, steps=30, size=128, save_latent=True)
    graph["save"]["inputs"]["filename_prefix"] = "interrupt/long"
    graph["save_latent"]["inputs"]["filename_prefix"] = "interrupt/long_latent"

    ws = websocket.create_connection(api.url.replace("http", "ws", 1) + f"/ws?clientId={api.client_id}", timeout=10)
    try:
        pid = api.queue(graph)
        deadline, step = time.monotonic() + 600, None
        while time.monotonic() < deadline and step is None:
            try:
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if not isinstance(raw, str):
                continue
            msg = json.loads(raw)
            data = msg.get("data", {})
            if msg["type"] == "progress" and data.get("prompt_id") == pid and data.get("node") == "sample":
                step = (data["value"], data["max"])
            assert msg["type"] not in ("execution_error", "execution_success"), msg
        assert step is not None, "the render never reached the sampler"
        api.interrupt()
    finally:
        ws.close()

    deadline = time.monotonic() + 300
    while not finished(api.history(pid).get(pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    status = api.history(pid)[pid]["status"]
    kinds = [kind for kind, _ in status["messages"]]
    assert status["status_str"] == "error" and "execution_interrupted" in kinds and "execution_error" not in kinds
    interrupted = next(data for kind, data in status["messages"] if kind == "execution_interrupted")
    assert interrupted["node_type"] == "SamplerCustom"
    assert step[0] < step[1], "interrupted after the last step: not during the render"
    assert output_files(comfy_server) == before, "the interrupted render left files behind"
    queue = api.get("/queue").json()
    assert queue["queue_running"] == [] and queue["queue_pending"] == []

    result = api.run(tiny_render(subjects[1], seed=3, prefix="interrupt/after"))
    assert len(result.images()) == 1
    assert {p for p in output_files(comfy_server) - before} == {
        f"interrupt/{img['filename']}" for img in result.images()}

