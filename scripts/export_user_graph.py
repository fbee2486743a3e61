"""Regenerate tests/data/user_zero_shot_api.json: a user's graph exported by the real frontend.

The shipped zero_shot UI workflow is loaded into the host's own frontend, an upscaler with a
second Save Image and a Preview Image are added, and the page's Export (API) serialisation is
written out (numeric ids, titles, everything as a user's file has it). tests/test_batch.py batches
it. Needs the browser set-up (scripts/setup_browser.sh); the host renders nothing.
"""
import subprocess, sys
sys.path.insert(0, "scripts")
from _pack import ROOT, import_pack
import_pack()
from blip_diffusion.api.server import ComfyServer, make_base_dir
base = make_base_dir(ROOT / ".cache" / "user-graph-base", {})
with ComfyServer(base) as server:
    subprocess.run(["node", str(ROOT / "tests/browser/export_user_graph.mjs"), server.url, "/usr/bin/chromium",
                    str(ROOT / "example_workflows/zero_shot.json"), str(ROOT / "tests/data/user_zero_shot_api.json")],
                   check=True, cwd=ROOT / "tests/browser")
