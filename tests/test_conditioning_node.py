"""SubjectConditioning inside a real host: wrong CLIPs get a clear error, the server keeps serving."""
import pytest

from blip_diffusion.api.client import ExecutionFailed
from graphs import put_input_image, zero_shot
from paths import ROOT, TEST_MODEL
from test_conditioning import LONG

SAMPLE = ROOT / "workflows" / "assets" / "sample_subject.png"


def test_non_sd1_clip_is_refused_and_server_keeps_serving(comfy_server, api):
    image = put_input_image(comfy_server, SAMPLE)
    graph = zero_shot(TEST_MODEL, image, "teapot", "on a beach", seed=5, steps=2, size=64,
                      save_latent=False)
    # Our CLIP-L file loaded as an SD3 text encoder: a real host CLIP of another family.
    graph["sd3_clip"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": "blipdiff-test-clip.bin", "type": "sd3"}}
    graph["positive"]["inputs"]["clip"] = ["sd3_clip", 0]
    with pytest.raises(ExecutionFailed, match="needs an SD 1.x CLIP") as err:
        api.run(graph)
    assert err.value.node_type == "SubjectConditioning"
    good = zero_shot(TEST_MODEL, image, "teapot", "on a beach", seed=6, steps=2, size=64,
                     save_latent=False)
    assert len(api.run(good).images()) == 1


def test_truncated_prompt_is_reported_in_the_server_log(comfy_server, api):
    image = put_input_image(comfy_server, SAMPLE)
    start = len(comfy_server.log())
    api.run(zero_shot(TEST_MODEL, image, "teapot", LONG, seed=7, steps=2, size=64, save_latent=False))
    log = comfy_server.log()[start:]
    assert "words were dropped" in log and "far away in the valley" in log
