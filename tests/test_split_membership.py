"""A model is never scored on a split it trained on: trained on a manifest made with data.seed 0, a manifest
of the same data made with seed 7 (its validation patients partly training patients) is refused by
`evaluate`, gate calibration and the comparison report, with what moved, and nothing in the artefact
changes. `--other-data` scores it there deliberately, apart and marked."""

import hashlib
import json
from pathlib import Path

import pytest

from cxrlt.config import DataConfig, EvalConfig, TrainConfig, VariantConfig
from cxrlt.data.demo.generate import generate_demo
from cxrlt.data.manifest import build_manifest
from cxrlt.data.membership import SPLITS_FILE, SplitMismatch, moves, split_record

SIZE = 32


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from cxrlt.engine import evaluate, train

    root = tmp_path_factory.mktemp("membership")
    generate_demo(root / "demo", n_studies=80, seed=5, progress=False)
    labels, images = root / "demo/cxr-lt-2024", root / "demo/mimic-cxr-jpg"
    seed0 = build_manifest(labels, images, root / "seed0", val_fraction=0.25, seed=0)
    seed7 = build_manifest(labels, images, root / "seed7", val_fraction=0.25, seed=7)
    variant = VariantConfig(name="m", model="single_test", loss="bce",
                            train=TrainConfig(epochs=1, batch_size=16, threads=1, augment=False, device="cpu"))
    art = train(variant, DataConfig(image_size=SIZE), seed0, root / "model", progress=False, log=lambda s: None)
    evaluate(art, seed0, EvalConfig(bootstrap=0), progress=False, device="cpu")
    return {"root": root, "seed0": seed0, "seed7": seed7, "art": art}


def digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_training_records_its_split_membership(project):
    meta = json.loads((project["art"] / "artefact.json").read_text())
    frame = project["seed0"].frame
    assert meta["splits"] == split_record(frame)
    assert meta["splits"]["patients"]["train"] == frame.loc[frame["split"] == "train", "subject_id"].nunique()
    stored = json.loads((project["art"] / SPLITS_FILE).read_text())["patients"]
    assert sorted(stored["val"]) == sorted(frame.loc[frame["split"] == "val", "subject_id"].astype(str).unique())
    # a resized cache's manifest points at other files but has the same membership
    moved = frame.assign(path="elsewhere/" + frame["path"].astype(str))
    assert split_record(moved)["digest"] == meta["splits"]["digest"]


def test_another_seeds_manifest_is_refused_and_nothing_changes(project):
    from cxrlt.engine import evaluate
    from cxrlt.evaluation.report import write_report
    from cxrlt.gate import calibrate_artefact

    art, seed7 = project["art"], project["seed7"]
    moved, new = moves(json.loads((art / SPLITS_FILE).read_text())["patients"], seed7.frame)
    assert moved[("train", "val")] > 0 and moved[("val", "train")] > 0 and new == 0
    before = digests(art)
    with pytest.raises(SplitMismatch) as e:
        evaluate(art, seed7, EvalConfig(bootstrap=0), progress=False, device="cpu")
    msg = str(e.value)
    assert f"{moved[('train', 'val')]} patients train -> val" in msg and "--other-data" in msg
    assert f"{moved[('train', 'val')]} of its training patients would be scored" in msg
    with pytest.raises(SplitMismatch):
        calibrate_artefact(art, seed7, device="cpu")
    with pytest.raises(SplitMismatch):
        write_report([art], project["root"] / "report7", manifest=seed7, split="val", n_boot=0)
    assert digests(art) == before
    assert not (project["root"] / "report7").exists()


def test_the_cli_says_what_moved_without_a_traceback(project, capsys):
    from cxrlt.cli.main import main

    before = digests(project["art"])
    assert main(["evaluate", "--artefact", str(project["art"]), "--manifest", str(project["seed7"].dir),
                 "--quiet", "--set", "eval.bootstrap=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cxrlt evaluate: error: this manifest's splits are not the ones") and "Traceback" not in err
    assert digests(project["art"]) == before


def test_other_data_scores_it_apart_and_marked(project):
    from cxrlt.engine import evaluate
    from cxrlt.evaluation.report import write_report

    art = project["art"]
    own = (art / "metrics.json").read_text(), (art / "eval" / "thresholds.json").read_text()
    res = evaluate(art, project["seed7"], EvalConfig(bootstrap=0), progress=False, device="cpu", other_data=True)
    assert res and all(m["cross_dataset"] == 1 for m in res.values())
    other = json.loads((art / "eval" / "other-data" / "metrics.json").read_text())
    assert other["evaluated_on"] == split_record(project["seed7"].frame)["digest"]
    assert ((art / "metrics.json").read_text(), (art / "eval" / "thresholds.json").read_text()) == own
    report = write_report([art], project["root"] / "report-other", manifest=project["seed7"], split="val",
                          n_boot=0, other_data=True).read_text()
    assert "Scored on another data set than they were trained with" in report and "m (other data)" in report


def test_a_positive_control_never_learns_its_masked_groups(project):
    """`masked_groups`: those labels never reach the loss, so their own output weights stay as initialised
    (weight decay off), while the other labels' move; the artefact records it for the report. (This small
    demo has no tail by share, every label having a few training studies: its medium group stands in.)"""
    import torch

    from cxrlt.engine import build_model, train

    manifest = project["seed0"]
    ls = manifest.label_space
    groups = ls.groups()
    group = "tail" if "tail" in groups.values() else "medium"
    tail = [i for i, n in enumerate(ls.names) if groups.get(n) == group]
    assert tail and len(tail) < len(ls)
    tc = TrainConfig(epochs=1, batch_size=16, threads=1, augment=False, device="cpu", weight_decay=0.0, seed=3)
    variant = VariantConfig(name="control", model="single_test", loss="bce", train=tc, masked_groups=(group,))
    torch.manual_seed(tc.seed)                              # training starts from exactly this model
    init, _, _ = build_model(variant, ls, torch.device("cpu"), project["root"])
    art = train(variant, DataConfig(image_size=SIZE), manifest, project["root"] / "control", progress=False,
                log=lambda s: None)
    from cxrlt.artefact.checkpoint import load_artefact

    trained = load_artefact(art).model
    w0, w1 = init.head.out_weight.detach(), trained.head.out_weight.detach()
    kept = [i for i in range(len(ls)) if i not in tail]
    assert torch.equal(w1[tail], w0[tail]) and not torch.equal(w1[kept], w0[kept])
    assert json.loads((art / "artefact.json").read_text())["masked_groups"] == [group]
    with pytest.raises(ValueError, match="not label groups"):
        VariantConfig(name="x", model="single_test", masked_groups=("rare",))
