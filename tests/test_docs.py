"""Every node of the pack is documented where users look: description, tooltips, help page."""
import pytest
import requests


@pytest.fixture(scope="module")
def pack_nodes(comfy_server):
    from blip_diffusion.api.client import ComfyClient

    info = ComfyClient(comfy_server.url).object_info()
    nodes = {k: v for k, v in info.items() if "blip_diffusion" in v.get("python_module", "")}
    assert len(nodes) >= 11, sorted(nodes)
    return nodes


def test_every_node_has_description_and_tooltips(pack_nodes):
    problems = []
    for name, node in pack_nodes.items():
        if len(node.get("description", "")) < 40:
            problems.append(f"{name}: no description")
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not opts.get("tooltip"):
                    problems.append(f"{name}.{inp}: no tooltip")
        tips = node.get("output_tooltips") or []
        if len(tips) != len(node["output"]) or not all(tips):
            problems.append(f"{name}: outputs without tooltips ({tips})")
    assert problems == []


def test_every_node_has_a_help_page_served_by_the_host(comfy_server, pack_nodes):
    missing = []
    for name in pack_nodes:
        r = requests.get(f"{comfy_server.url}/extensions/blip_diffusion/docs/{name}.md", timeout=10)
        if r.status_code != 200 or not r.text.startswith("# "):
            missing.append(name)
    assert missing == []
