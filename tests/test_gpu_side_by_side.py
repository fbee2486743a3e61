"""bench/gpu.sh --reference, scaled down to run here: diffusers' pipeline (bench/gpu_reference.py, in the
reference environment) and ours (bench/gpu_bench.py --model-dir, the pack's loader) render from the same
generated folder, and the report pairs their rows. The GPU figures wait for a lent GPU; this keeps the
script from rotting in between."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from paths import ROOT
from refenv import offline_env, reference_python
from test_bench import bench_run_module

pytestmark = [pytest.mark.reference, pytest.mark.slow]


def test_side_by_side_smoke_pairs_the_reference_and_ours_on_the_same_files(test_model_dir, tmp_path):
    from blip_diffusion.api.server import comfyui_dir

    ref_out, ours_out = tmp_path / "gpu_reference.json", tmp_path / "gpu_side_by_side.json"
    ref = subprocess.run([str(reference_python()), str(ROOT / "bench" / "gpu_reference.py"), "--model-dir",
                          str(test_model_dir), "--device", "cpu", "--dtypes", "float32", "--smoke", "--out",
                          str(ref_out)], capture_output=True, text=True, timeout=900, env=offline_env())
    assert ref.returncode == 0, ref.stderr[-3000:]
    ours = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--device", "cpu", "--smoke",
                           "--model-dir", str(test_model_dir), "--only", "renders", "--out", str(ours_out)],
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, COMFYUI_DIR=str(comfyui_dir())))
    assert ours.returncode == 0, ours.stderr[-3000:]
    ref_rows = {r["name"]: r for r in json.loads(ref_out.read_text())}
    assert set(ref_rows) == {f"reference pipeline 64px 2 PNDM steps batch {b}" for b in (1, 4)}
    assert all(r["s_per_image"] > 0 for r in ref_rows.values())
    assert ref_rows["reference pipeline 64px 2 PNDM steps batch 1"]["first_image_s"] > 0
    ours_rows = {r["name"]: r for r in json.loads(ours_out.read_text())}
    assert ours_rows["zero-shot workflow 64px 2 PNDM steps, latent batch 4"]["image_shape"] == [4, 64, 64, 3]
    assert "zero-shot workflow 64px 2 PNDM steps (first image)" in ours_rows
    table = "\n".join(bench_run_module().side_by_side_section(ours_out, ref_out))
    assert "| float32 | 2 | 1 |" in table and "| float32 | 2 | 4 |" in table, table
