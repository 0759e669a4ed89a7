"""The pipeline's steps on a tiny demo through the CLI (manifest, prepare, train, evaluate, submit,
registry). The Prefect flow and `dvc repro` in a fresh DVC repository: tests/test_flow_dvc.py."""

import json
from pathlib import Path

import pytest
import yaml

from cxrlt.cli.main import main
from cxrlt.data.demo.generate import generate_demo

TINY_PARAMS = {
    "paths": {"labels": "data/demo/cxr-lt-2024", "images": "data/demo/mimic-cxr-jpg",
              "fingerprint": "prepared/images.json",
              "manifest": "prepared/manifest", "cache": "prepared/cache"},
    "data": {"image_size": 32, "val_fraction": 0.2, "seed": 0, "task": "task1"},
    "train": {"epochs": 1, "batch_size": 8, "lr": 0.001, "threads": 1},
    "eval": {"split": "val", "batch_size": 16},
    "variants": {"tiny-single": {"model": "single_test", "loss": "wbce"}},
    "stage2_variants": {"tiny-fusion": {"model": "chexfusion_test", "loss": "asl", "init_from": "tiny-single"}},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder with a tiny demo in data/ and tiny params.yaml."""
    root = tmp_path_factory.mktemp("project")
    generate_demo(root / "data" / "demo", n_studies=60, seed=3)
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    return root


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


def assert_metrics_match_predictions(art: Path, manifest_dir: Path, splits=("val", "dev", "test")) -> None:
    """metrics.json holds the metrics of the predictions written beside it (scored against the manifest's
    labels, thresholds from eval/thresholds.json), not just numbers that look like metrics."""
    import numpy as np
    import pandas as pd

    from cxrlt.data.manifest_io import load_manifest
    from cxrlt.evaluation.metrics import compute_metrics

    man = load_manifest(manifest_dir)
    names = list(man.label_space.names)
    metrics = json.loads((art / "metrics.json").read_text())
    thr = json.loads((art / "eval/thresholds.json").read_text())["thresholds"]
    for split in splits:
        pred = pd.read_csv(art / f"eval/predictions_{split}.csv", dtype={"dicom_id": str})
        frame = man.split(split)
        assert sorted(pred["dicom_id"]) == sorted(frame["dicom_id"]), split   # every image, once
        y = frame.set_index("dicom_id").loc[pred["dicom_id"], names].to_numpy()
        ref = compute_metrics(pred[names].to_numpy(), y, man.label_space, thresholds=thr)
        # The CSV holds 6 decimals: a tiny model's nearly equal scores can tie after rounding, hence the
        # tolerance (a wrong split, label order or unit moves these by far more). val's mF1_tuned is left
        # out: a threshold can sit exactly on a val score, which the rounding moves
        # (test_properties::test_tuned_threshold_is_not_glued_to_a_tuning_score).
        for k in ("mAP", "mAUC", "mF1") + (("mF1_tuned",) if split != "val" else ()):
            assert metrics[split][k] == pytest.approx(ref[k], abs=2e-3), (split, k)
        assert np.isfinite(ref["mAP"]) and ref["n_images"] == len(frame)


def test_cli_manifest_prepare_train_evaluate_register(project, capsys):
    p, params = project, project / "params.yaml"
    assert run_cli("manifest", "--labels", p / TINY_PARAMS["paths"]["labels"], "--images",
                   p / TINY_PARAMS["paths"]["images"], "--out", p / "cli/manifest", "--params", params) == 0
    assert run_cli("prepare", "--manifest", p / "cli/manifest", "--out", p / "cli/cache", "--params", params) == 0
    for v in ("tiny-single", "tiny-fusion"):  # stage 1, then stage 2 from it
        art = p / "cli/models" / v
        assert run_cli("train", "--variant", v, "--manifest", p / "cli/cache", "--out", art,
                       "--params", params, "--quiet") == 0
    # stage 2 started from stage 1's backbone and kept it frozen (weights and batch-norm statistics)
    from cxrlt.artefact.checkpoint import load_artefact
    s1, s2 = load_artefact(p / "cli/models/tiny-single"), load_artefact(art)
    for k, v in s1.model.backbone.state_dict().items():
        assert (s2.model.backbone.state_dict()[k] == v).all(), k
    assert s2.meta["freeze_backbone"] and s2.meta["init_from"].endswith("tiny-single")
    assert run_cli("evaluate", "--artefact", art, "--manifest", p / "cli/cache", "--params", params, "--quiet") == 0
    metrics = json.loads((art / "metrics.json").read_text())
    assert {"val", "dev", "test"} <= set(metrics)
    assert_metrics_match_predictions(art, p / "cli/cache")
    meta = json.loads((art / "artefact.json").read_text())
    assert meta["synthetic"] is True and meta["data_version"]["manifest_md5"]
    assert len(json.loads((art / "eval/thresholds.json").read_text())["thresholds"]) == 40
    # challenge submission: one row per test image, Task 2 columns by name (Normal before Nodule)
    assert run_cli("submit", "--artefact", art, "--task", "task2", "--out", p / "sub.csv") == 0
    import pandas as pd
    sub = pd.read_csv(p / "sub.csv")
    from cxrlt.labels import TASK2_LABELS
    assert list(sub.columns) == ["dicom_id", *TASK2_LABELS] and sub["dicom_id"].is_unique
    assert len(sub) == len(pd.read_csv(art / "eval/predictions_test.csv"))
    assert run_cli("registry", "register", art) == 0
    tag = capsys.readouterr().out.strip().splitlines()[-1]
    assert run_cli("registry", "promote", tag) == 0
    assert run_cli("registry", "serving") == 0
    assert capsys.readouterr().out.strip().endswith(tag)


def test_cli_errors_are_one_clear_line(project, capsys):
    assert run_cli("train", "--variant", "nope", "--manifest", project, "--params", project / "params.yaml") == 2
    err = capsys.readouterr().err
    assert "unknown variant 'nope'" in err and "Traceback" not in err
    assert run_cli("manifest", "--labels", project / "missing", "--images", project, "--out", project / "x",
                   "--params", project / "params.yaml") == 2
    assert "Traceback" not in capsys.readouterr().err
