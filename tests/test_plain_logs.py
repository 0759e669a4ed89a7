"""Piped output (Prefect's and DVC's logs, CI) carries no progress bars: training writes one plain line per
epoch, and the data steps write their result, even without --quiet."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, tiny_demo_project

PARAMS = {
    "data": {"image_size": 32, "val_fraction": 0.2, "seed": 0, "task": "task1"},
    "train": {"epochs": 2, "batch_size": 8, "lr": 0.003, "threads": 1, "device": "cpu", "num_workers": 0},
    "eval": {"split": "val", "batch_size": 16},
    "variants": {"tiny": {"model": "single_test", "loss": "asl"}},
}


def cxrlt(*args) -> str:
    """`cxrlt ARGS` in a child process whose output is a pipe, as under Prefect; its stdout and stderr."""
    r = subprocess.run([sys.executable, "-m", "cxrlt", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


def bars(text: str) -> list[str]:
    return [ln for ln in text.replace("\r", "\n").splitlines() if "it/s]" in ln or "%|" in ln or "s/it]" in ln]


@pytest.mark.slow
def test_training_and_data_steps_log_plain_lines_when_piped(tmp_path):
    p = tiny_demo_project(tmp_path, PARAMS)
    out = cxrlt("train", "--variant", "tiny", "--manifest", p / "manifest", "--params", p / "params.yaml",
                "--out", p / "model")
    assert not bars(out) and "\r" not in out, out[-2000:]
    epochs = [ln for ln in out.splitlines() if ln.startswith("[tiny] epoch ")]
    assert [ln.split(":")[0] for ln in epochs] == ["[tiny] epoch 1", "[tiny] epoch 2"], out[-2000:]
    assert all("loss" in ln and "val mAP" in ln for ln in epochs)
    out = cxrlt("demo-data", "--out", tmp_path / "more", "--studies", 30)
    assert not bars(out) and "\r" not in out, out[-2000:]
