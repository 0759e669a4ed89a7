"""Runs that survive a crash, and evaluation that cannot leak.

A training process killed with SIGKILL in the middle of an epoch resumes (`cxrlt train --resume`) to
weights identical to an uninterrupted run's; checkpoints are written atomically; a run whose validation
mAP can only be NaN stops with a clear error; evaluation takes the image size from the artefact and
tunes thresholds on validation only; seeded variants expand into one named artefact per seed, stage 2
pairing each seed with the same-seed stage 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_demo_project

from cxrlt.cli.main import main
from cxrlt.config import EvalConfig, config_from_dict, load_config
from cxrlt.data.manifest_io import load_manifest
from cxrlt.engine import TRAIN_STATE, evaluate, make_dataset, per_image, predict, read_history, train
from cxrlt.engine.checkpointing import FORMAT, load_training_state, restore_rng, rng_state, save_training_state

SIZE = 32
# deterministic on CPU: one thread, deterministic kernels, no loader workers; 7 steps per epoch
PARAMS = {
    "data": {"image_size": SIZE, "val_fraction": 0.2, "seed": 0, "task": "task1"},
    "train": {"epochs": 2, "batch_size": 8, "lr": 0.003, "threads": 1, "device": "cpu", "num_workers": 0,
              "deterministic": True, "checkpoint_every_steps": 3},
    "eval": {"split": "val", "batch_size": 16},
    "variants": {"tiny": {"model": "single_test", "loss": "asl"}},
}
STOP = (1, 3)  # killed in the second epoch (epoch index 1) after its step-3 checkpoint

# The run to be killed: the real training, plus a hook that says when the mid-epoch checkpoint is on
# disk and then waits, so the kill lands mid-epoch for certain without guessing with sleeps.
KILLED = r"""
import sys
from cxrlt.config import load_config
from cxrlt.data.manifest_io import load_manifest
from cxrlt.engine import train

params, manifest, out, epoch, step = sys.argv[1:]
def wait_to_be_killed(path, state):
    if (state["epoch"], state["step"]) == (int(epoch), int(step)):
        print("checkpointed", flush=True)
        sys.stdin.read()
cfg = load_config(params)
train(cfg.variant("tiny"), cfg.data, load_manifest(manifest), out, progress=False, on_checkpoint=wait_to_be_killed)
print("finished", flush=True)
"""


def cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return tiny_demo_project(tmp_path_factory.mktemp("resume"), PARAMS)


@pytest.fixture(scope="module")
def runs(project):
    """A run killed mid-epoch (another process, SIGKILL) then resumed with `cxrlt train --resume`, and an
    uninterrupted run, trained here while the other process starts."""
    p = project
    killed = subprocess.Popen([sys.executable, "-c", KILLED, str(p / "params.yaml"), str(p / "manifest"),
                               str(p / "resumed"), *map(str, STOP)], cwd=p, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    common = ["--variant", "tiny", "--manifest", p / "manifest", "--params", p / "params.yaml", "--quiet"]
    try:
        assert cli("train", *common, "--out", p / "ref") == 0
        lines = []
        for line in killed.stdout:  # ends when the process exits, so a failure cannot hang the test
            lines.append(line)
            if line.strip() == "checkpointed":
                os.kill(killed.pid, signal.SIGKILL)
                break
        assert killed.wait(timeout=60) == -signal.SIGKILL, "".join(lines)
    finally:
        if killed.poll() is None:
            killed.kill()
    state = load_training_state(p / "resumed" / TRAIN_STATE)
    assert (state["epoch"], state["step"]) == STOP and len(state["history"]) == 1
    assert not (p / "resumed/weights.safetensors").exists()  # it really died before finishing
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert cli("train", *common, "--out", p / "resumed", "--resume") == 0
    return {"ref": p / "ref", "resumed": p / "resumed", "log": log.getvalue()}


def test_a_killed_run_resumes_to_identical_weights(runs):
    assert f"resumed from {runs['resumed'] / TRAIN_STATE}: epoch 2, step 3/7" in runs["log"]
    ref, res = (load_file(str(runs[k] / "weights.safetensors")) for k in ("ref", "resumed"))
    assert ref.keys() == res.keys()
    for k in ref:
        assert torch.equal(ref[k], res[k]), k
    # the whole trajectory, not only the selected epoch: every epoch's loss and validation scores
    cols = ["epoch", "train_loss", "val_mAP", "val_mAUC"]
    h_ref, h_res = read_history(runs["ref"]), read_history(runs["resumed"])
    assert h_ref[cols].equals(h_res[cols])
    m_ref, m_res = (json.loads((runs[k] / "artefact.json").read_text()) for k in ("ref", "resumed"))
    assert m_res["resumes"] == [{"epoch": 2, "step": 3}]
    # the selected (compared) weights are those of epoch 2, trained partly after the resume
    assert m_res["best_epoch"] == m_ref["best_epoch"] == 2
    assert not (runs["resumed"] / TRAIN_STATE).exists() and not (runs["ref"] / TRAIN_STATE).exists()


def test_resume_refuses_a_checkpoint_of_other_settings(project, tmp_path, capsys):
    from cxrlt.engine.checkpointing import fingerprint
    from cxrlt.provenance import data_version

    other = load_config(project / "params.yaml", {"train.lr": 0.5})
    md5 = data_version(project / "manifest")["manifest_md5"]
    state = {"format": FORMAT, "fingerprint": fingerprint(other.variant("tiny"), other.data, md5)}
    (tmp_path / "run").mkdir()
    save_training_state(tmp_path / "run" / TRAIN_STATE, state)
    assert cli("train", "--variant", "tiny", "--manifest", project / "manifest", "--params", project / "params.yaml",
               "--out", tmp_path / "run", "--resume", "--quiet") == 2
    err = capsys.readouterr().err
    assert "belongs to a different run" in err and "variant.train.lr: 0.5 -> 0.003" in err and "Traceback" not in err


class _FailsHalfway:
    """Pickling it fails, after the tensors before it in the state were already serialised."""

    def __reduce__(self):
        raise RuntimeError("disk full (simulated by an unpicklable object)")


def test_checkpoint_writes_are_atomic(tmp_path):
    path = tmp_path / TRAIN_STATE
    good = {"format": FORMAT, "w": torch.arange(1000.0)}
    save_training_state(path, good)
    with pytest.raises(RuntimeError, match="disk full"):
        save_training_state(path, {"format": FORMAT, "w": torch.zeros(1_000_000), "bad": _FailsHalfway()})
    assert torch.equal(load_training_state(path)["w"], good["w"])   # the good checkpoint is untouched
    assert sorted(os.listdir(tmp_path)) == [TRAIN_STATE]            # and the failed write left nothing
    # a temp file truncated by a kill in the middle of a write is never read, and the next write replaces it
    (tmp_path / (TRAIN_STATE + ".tmp")).write_bytes(b"PK\x03\x04 truncated")
    assert torch.equal(load_training_state(path)["w"], good["w"])
    save_training_state(path, {"format": FORMAT, "w": torch.ones(3)})
    assert torch.equal(load_training_state(path)["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == [TRAIN_STATE]


def test_rng_states_round_trip():
    import random

    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    restore_rng(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_validation_without_positives_stops_with_a_clear_error(project, tmp_path):
    m = load_manifest(project / "manifest")
    frame = m.frame.copy()
    names = list(m.label_space.names)
    frame.loc[frame["split"] == "val", names] = 0
    cfg = load_config(project / "params.yaml")
    with pytest.raises(ValueError, match="no positive for any of the 40 trained labels") as e:
        train(cfg.variant("tiny"), cfg.data, dataclasses.replace(m, frame=frame), tmp_path / "nan", progress=False)
    assert "mAP is NaN in every epoch" in str(e.value) and "raise data.val_fraction" in str(e.value)
    assert not (tmp_path / "nan").exists()  # refused before any training


def test_a_diverging_run_stops_with_a_clear_error(project, tmp_path):
    """A loss that turns NaN ends the run at that step with what to change, not a crash at the end."""
    cfg = config_from_dict({**PARAMS, "train": {**PARAMS["train"], "lr": 1e30, "deterministic": False,
                                                "checkpoint_every_steps": 0}})
    with pytest.raises(FloatingPointError, match=r"training diverged.*Lower train.lr \(now 1e\+30\)"):
        train(cfg.variant("tiny"), cfg.data, load_manifest(project / "manifest"), tmp_path / "nan", progress=False)
    assert not (tmp_path / "nan" / "weights.safetensors").exists()


def test_evaluate_uses_the_artefacts_image_size(runs, project, capsys):
    art = runs["ref"]
    manifest = load_manifest(project / "manifest")
    # the params file now says 48 px; evaluation must still feed the 32 px the model was trained at
    assert cli("evaluate", "--artefact", art, "--manifest", project / "manifest", "--params", project / "params.yaml",
               "--set", "data.image_size=48", "--quiet") == 0
    written = pd.read_csv(art / "eval/predictions_val.csv", dtype={"dicom_id": str, "study_id": str})
    from cxrlt.artefact.checkpoint import load_artefact
    model = load_artefact(art).model
    names = list(manifest.label_space.names)
    for size, same in ((SIZE, True), (48, False)):
        ds = make_dataset(manifest, "val", model, size, train=False)
        probs = per_image(ds, predict(model, ds, progress=False), manifest.split("val"))[names].to_numpy()
        assert np.allclose(written[names].to_numpy(), probs, atol=1e-6) == same, size
    # asking for another size explicitly is refused, saying why
    with pytest.raises(ValueError, match="trained on 32px images but evaluation was asked for 48px"):
        evaluate(art, manifest, EvalConfig(), 48, progress=False, device="cpu")
    # thresholds come from val and are applied unchanged to dev and test
    thr = json.loads((art / "eval/thresholds.json").read_text())
    assert thr["split"] == "val"
    for split in ("dev", "test"):
        table = pd.read_csv(art / f"eval/per_label_{split}.csv", float_precision="round_trip")
        assert np.array_equal(table["threshold"].to_numpy(), np.asarray(thr["thresholds"]))


@pytest.mark.parametrize("split", ["dev", "test"])
def test_threshold_tuning_on_dev_or_test_is_refused(project, runs, split, capsys):
    with pytest.raises(ValueError, match="thresholds are tuned on the validation split only"):
        EvalConfig(split=split)
    assert cli("evaluate", "--artefact", runs["ref"], "--manifest", project / "manifest", "--params",
               project / "params.yaml", "--set", f"eval.split={split}", "--quiet") == 2
    err = capsys.readouterr().err
    assert f"eval.split is '{split}'" in err and "Set eval.split: val" in err and "Traceback" not in err


def test_seeds_expand_into_named_variants():
    d = {"variants": {"s1": {"model": "single_test", "seeds": [0, 1, 2]}, "plain": {"model": "single_test"}},
         "stage2_variants": {"f": {"model": "chexfusion_test", "init_from": "s1"},
                             "f-one": {"model": "chexfusion_test", "init_from": "s1", "train": {"seeds": [2]}}}}
    cfg = config_from_dict(d)
    assert list(cfg.variants) == ["s1-seed0", "s1-seed1", "s1-seed2", "plain", "f-seed0", "f-seed1", "f-seed2", "f-one"]
    assert [cfg.variant(f"s1-seed{k}").train.seed for k in range(3)] == [0, 1, 2]
    assert {v.seed_group for n, v in cfg.variants.items() if n.startswith("s1")} == {"s1"}
    assert cfg.variant("plain").seed_group == "plain" and cfg.variant("plain").train.seed == 0
    # stage 2 takes its stage 1's seeds, each starting from the same seed's stage-1 artefact
    assert [cfg.variant(f"f-seed{k}").init_from for k in range(3)] == ["s1-seed0", "s1-seed1", "s1-seed2"]
    assert cfg.variant("f-one").init_from == "s1-seed2" and cfg.variant("f-one").train.seed == 2
    assert cfg.select(["s1", "plain"]) == ["s1-seed0", "s1-seed1", "s1-seed2", "plain"]
    with pytest.raises(KeyError, match="trained once per seed, as s1-seed0, s1-seed1, s1-seed2"):
        cfg.variant("s1")
    bad = {**d, "stage2_variants": {"f": {"model": "chexfusion_test", "init_from": "s1", "seeds": [0, 5]}}}
    with pytest.raises(ValueError, match="trained only with \\[0, 1, 2\\]"):
        config_from_dict(bad)
    # the top-level train section seeds every variant
    top = config_from_dict({"train": {"seeds": [3, 4]}, "variants": {"a": {"model": "single_test"}}})
    assert list(top.variants) == ["a-seed3", "a-seed4"]


def test_seeded_training_gives_one_artefact_per_seed_and_pairs_stage_2(project, tmp_path, capsys):
    params = {**PARAMS, "train": {**PARAMS["train"], "epochs": 1, "max_steps_per_epoch": 2, "deterministic": False},
              "variants": {"s1": {"model": "single_test", "loss": "asl", "seeds": [0, 1]}},
              "stage2_variants": {"f": {"model": "chexfusion_test", "loss": "asl", "init_from": "s1"}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    common = ["--manifest", project / "manifest", "--params", tmp_path / "params.yaml", "--quiet"]
    for v in ("s1-seed0", "s1-seed1", "f-seed0", "f-seed1"):
        assert cli("train", "--variant", v, "--out", tmp_path / "models" / v, *common) == 0
    assert cli("train", "--variant", "s1", "--out", tmp_path / "models/s1", *common) == 2
    assert "name one of those" in capsys.readouterr().err
    w = {v: load_file(str(tmp_path / "models" / v / "weights.safetensors"))
         for v in ("s1-seed0", "s1-seed1", "f-seed0", "f-seed1")}
    assert any(not torch.equal(w["s1-seed0"][k], w["s1-seed1"][k]) for k in w["s1-seed0"])
    for k in (0, 1):
        meta = json.loads((tmp_path / "models" / f"f-seed{k}" / "artefact.json").read_text())
        assert (meta["seed"], meta["seed_group"], meta["variant"]) == (k, "f", f"f-seed{k}")
        assert Path(meta["init_from"]).name == f"s1-seed{k}"
        # the frozen stage-2 backbone is the same seed's stage-1 backbone, not the other seed's
        for name, t in w[f"f-seed{k}"].items():
            if name.startswith("backbone."):
                assert torch.equal(t, w[f"s1-seed{k}"][name]), name
        assert any(not torch.equal(t, w[f"s1-seed{1 - k}"][n]) for n, t in w[f"f-seed{k}"].items()
                   if n.startswith("backbone.") and t.is_floating_point())
