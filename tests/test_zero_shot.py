"""Label-embedding queries end to end: train on Task 1 with the Task 3 findings held out, score the
held-out findings from their text alone, and score a new finding text at prediction time."""

import json

import pytest
import yaml

from cxrlt.cli.main import main
from cxrlt.data.demo.generate import generate_demo
from cxrlt.labels import TASK3_LABELS

PARAMS = {
    "data": {"image_size": 32, "val_fraction": 0.2, "seed": 0, "task": "task3", "zero_shot": list(TASK3_LABELS)},
    "train": {"epochs": 1, "batch_size": 8, "lr": 0.001, "threads": 1},
    "eval": {"split": "val", "batch_size": 16},
    "variants": {
        "zs-text": {"model": "single_test", "loss": "asl", "model_args": {"query": "text"},
                    "text_encoder": {"name": "tiny", "prompt": "description"}},
        "learned": {"model": "single_test", "loss": "asl"},
    },
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs")
    generate_demo(root / "demo", n_studies=60, seed=7, progress=False)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    run = lambda *a: main([str(x) for x in a])  # noqa: E731
    assert run("manifest", "--labels", root / "demo/cxr-lt-2024", "--images", root / "demo/mimic-cxr-jpg",
               "--out", root / "manifest", "--params", params) == 0
    for v in PARAMS["variants"]:
        assert run("train", "--variant", v, "--manifest", root / "manifest", "--out", root / "models" / v,
                   "--params", params, "--quiet") == 0
        assert run("evaluate", "--artefact", root / "models" / v, "--manifest", root / "manifest",
                   "--params", params, "--quiet") == 0
    return root


def test_held_out_findings_are_never_trained_but_scored(trained):
    meta = json.loads((trained / "models/zs-text/artefact.json").read_text())
    ls = meta["label_space"]
    assert set(ls["zero_shot"]) == set(TASK3_LABELS) and len(ls["names"]) == 45
    assert all(ls["counts"][ls["names"].index(z)] == 0 for z in TASK3_LABELS)
    assert meta["text_encoder"]["name"] == "tiny" and meta["text_encoder"]["embedding_id"]
    # held out in training (unknown in train and val), labelled in dev: scored there, from the written
    # predictions, as the mean AP / AUROC over the held-out labels only
    import numpy as np
    import pandas as pd

    from cxrlt.data.manifest_io import load_manifest
    from cxrlt.labels import LabelSpace
    from cxrlt.evaluation.metrics import compute_metrics

    man = load_manifest(trained / "manifest")
    assert (man.frame.loc[man.frame["split"].isin(["train", "val"]), list(TASK3_LABELS)] == -1).all().all()
    dev = json.loads((trained / "models/zs-text/metrics.json").read_text())["dev"]
    pred = pd.read_csv(trained / "models/zs-text/eval/predictions_dev.csv", dtype={"dicom_id": str})
    y = man.split("dev").set_index("dicom_id").loc[pred["dicom_id"], ls["names"]].to_numpy()
    ref = compute_metrics(pred[ls["names"]].to_numpy(), y, LabelSpace.from_dict(ls))
    zs = ref["per_label"].set_index("label").loc[list(TASK3_LABELS)]
    assert (zs["n_pos"] > 0).all()
    # (the CSV's 6 decimals can tie a tiny model's nearly equal scores: hence the tolerance)
    assert dev["zs_mAUC"] == pytest.approx(zs["auroc"].mean(), abs=2e-3)
    assert ref["zs_mAUC"] == pytest.approx(zs["auroc"].mean(), abs=1e-12)
    assert dev["zs_mAP"] == pytest.approx(zs["ap"].mean(), abs=2e-3)
    assert dev["mAP"] == pytest.approx(ref["mAP"], abs=2e-3) and not np.isclose(dev["mAP"], dev["zs_mAP"])


def test_new_finding_text_is_scored_only_by_text_query_models(trained, capsys):
    img = next((trained / "demo/mimic-cxr-jpg/files").rglob("*.jpg"))
    assert main(["predict", str(img), "--artefact", str(trained / "models/zs-text"),
                 "--finding", "pleural effusion", "--finding", "Bulla"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["zero_shot"]) == {"Bulla", "pleural effusion"}
    # a finding's score comes from its own text: other findings asked alongside (before it) do not move it
    assert main(["predict", str(img), "--artefact", str(trained / "models/zs-text"), "--finding", "Bulla"]) == 0
    alone = json.loads(capsys.readouterr().out)["zero_shot"]
    assert alone["Bulla"] == pytest.approx(out["zero_shot"]["Bulla"], abs=2e-6)
    assert out["zero_shot"]["Bulla"] != out["zero_shot"]["pleural effusion"]
    assert main(["predict", str(img), "--artefact", str(trained / "models/learned"), "--finding", "Bulla"]) == 2
    assert "cannot score new findings" in capsys.readouterr().err
