"""bench/gpu.sh, the script a GPU session runs, works here with tiny settings and writes every section."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_script_runs_tiny_on_the_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "bench/gpu.sh", str(tmp_path), "--tiny", "--skip-compile", "--steps", "2",
                        "--workers", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads((tmp_path / "gpu.json").read_text())
    assert out["tiny"] and out["image_size"] == 32
    for name in ("stage1", "stage2", "loader", "serving"):
        assert "error" not in out[name], (name, out[name])
    assert out["stage1"]["images_per_s"] > 0 and out["stage1"]["batch"] >= 2
    assert set(out["loader"]["loader_images_per_s"]) == {"cpu-augment", "device-augment"}
    assert out["serving"]["studies_per_s_unbatched"] > 0 and out["serving"]["studies_per_s_batch32"] > 0
    assert out["stage1_compiled"] == {"skipped": "--skip-compile"}
