"""Label-embedding queries end to end: train on Task 1 with the Task 3 findings held out, score the
held-out findings from their text alone, and score a new finding text at prediction time."""

import json

import pytest
import yaml

from cxrlt.cli import main
from cxrlt.data.demo import generate_demo
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
    dev = json.loads((trained / "models/zs-text/metrics.json").read_text())["dev"]
    assert 0.0 <= dev["zs_mAUC"] <= 1.0 and 0.0 <= dev["zs_mAP"] <= 1.0


def test_new_finding_text_is_scored_only_by_text_query_models(trained, capsys):
    img = next((trained / "demo/mimic-cxr-jpg/files").rglob("*.jpg"))
    assert main(["predict", str(img), "--artefact", str(trained / "models/zs-text"),
                 "--finding", "Bulla", "--finding", "pleural effusion"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["zero_shot"]) == {"Bulla", "pleural effusion"}
    assert all(0 <= p <= 1 for p in out["zero_shot"].values())
    assert main(["predict", str(img), "--artefact", str(trained / "models/learned"), "--finding", "Bulla"]) == 2
    assert "cannot score new findings" in capsys.readouterr().err
