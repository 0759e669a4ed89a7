"""Published configurations (experiments/*.yaml with `reproduce:`) and `cxrlt reproduce`: every setting has a
source, the run reads the very same file (smoke only scales it down), the data check names what is missing,
and the smoke run goes end to end through the train-eval flow to an obtained-vs-published table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cxrlt.config import load_config
from cxrlt.engine import reproduce as R

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("chexfusion-2023", "cxr-lt-2024-task1")


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("name", NAMES)
def test_every_published_setting_has_a_source_and_exists_in_the_config(name):
    spec = R.load_reproduction(name)
    cfg = load_config(spec.path)
    for key, source in spec.sources.items():
        assert str(source).split(":")[0] in ("paper", "code", "config", "our choice"), (key, source)
        section, _, field = key.partition(".")
        if section in ("data", "train", "eval") and field in ("image_size", "batch_size", "lr", "epochs", "seed",
                                                               "val_fraction", "task", "amp", "tta_flip", "augment",
                                                               "balanced_sampling", "weight_decay", "bootstrap"):
            assert hasattr(getattr(cfg, section), field), key
    assert spec.published["metrics"] and spec.published["source"]
    assert R.available() == sorted(NAMES)
    serve = cfg.variant(spec.serve)
    assert serve.init_from and cfg.variant(serve.init_from).model.endswith("_stage1")


def test_the_run_reads_the_file_and_smoke_only_scales_it_down(tmp_path):
    spec = R.load_reproduction("cxr-lt-2024-task1")
    real = R.run_overrides(spec, tmp_path)
    assert real == {"paths.labels": str(tmp_path / "cxr-lt-2024"), "paths.images": str(tmp_path / "mimic-cxr-jpg")}
    smoke = R.run_overrides(spec, tmp_path, smoke=True)
    cfg, small = load_config(spec.path), load_config(spec.path, {k: v for k, v in smoke.items() if "paths" not in k})
    assert small.data.image_size == 64 and small.variant("stage1").model == "single_test"
    assert "backbone" not in small.variant("stage1").model_args
    for same in ("lr", "weight_decay", "balanced_sampling", "augment", "seed"):
        assert getattr(small.train, same) == getattr(cfg.train, same), same
    assert small.variant("fusion").loss == cfg.variant("fusion").loss == "afl"
    assert small.variant("fusion").freeze_backbone and small.variant("fusion").init_from == "stage1"
    # a variant's own epochs are scaled too (CheXFusion's stage 2 sets them)
    s23 = R.load_reproduction("chexfusion-2023")
    c23 = load_config(s23.path, {k: v for k, v in R.run_overrides(s23, tmp_path, True).items() if "paths" not in k})
    assert c23.variant("fusion").train.epochs == 1 and c23.data.task == "task1"


def test_the_data_check_names_everything_missing(tmp_path):
    spec = R.load_reproduction("cxr-lt-2024-task1")
    (tmp_path / "cxr-lt-2024").mkdir()
    (tmp_path / "cxr-lt-2024" / "train_labeled.csv").write_text("dicom_id\n")
    problems = R.data_problems(spec, tmp_path, "task1")
    assert len(problems) == 3, problems
    assert any("development_labeled_task1.csv: missing" in p for p in problems)
    assert any("test_labeled_task1.csv: missing" in p for p in problems)
    assert any("mimic-cxr-jpg/files: missing" in p for p in problems)
    assert "does not exist" in R.data_problems(spec, tmp_path / "nope", "task1")[0]


def test_gpu_hours_come_from_the_bench_or_say_unmeasured(tmp_path):
    cfg = load_config(R.load_reproduction("cxr-lt-2024-task1").path)
    hours, why = R.gpu_hours(cfg, 1000, 500, bench=tmp_path / "none.json")
    assert hours is None and why.startswith("unmeasured")
    bench = tmp_path / "gpu.json"
    bench.write_text(json.dumps({"device": "X", "image_size": 1024, "tiny": False,
                                 "stage1": {"images_per_s": 100.0}, "stage2": {"images_per_s": 200.0}}))
    hours, why = R.gpu_hours(cfg, 3600, 900, gpus=2, bench=bench)
    # stage 1: 10 epochs x 3600 images / 100 per s; stage 2: 10 x 900 studies x 4 views / 200 per s; over 2 GPUs
    assert hours == pytest.approx((10 * 36 + 10 * 18) / 3600 / 2) and "X" in why
    bench.write_text(json.dumps({"image_size": 512, "stage1": {"images_per_s": 1}, "stage2": {"images_per_s": 1}}))
    assert R.gpu_hours(cfg, 1, 1, bench=bench)[0] is None


def test_the_table_sets_ours_beside_the_published_numbers():
    spec = R.load_reproduction("cxr-lt-2024-task1")
    results = {"split": "test", "manifest": "cache", "n_images": 10, "synthetic": False, "variants": [
        {"variant": "fusion", "mAP": 0.25, "mAP_ci_low": 0.2, "mAP_ci_high": 0.3, "mAP_ci_note": "",
         "mAP_tail": 0.1, "mAP_tail_ci_low": None, "mAP_tail_ci_high": None,
         "mAP_tail_ci_note": "no interval: 12/19 labels in < 5 patients"}]}
    md = R.published_table(spec, results)
    assert "| mAP | 0.2379 | 0.2500 [0.2000, 0.3000] | +0.0121 |" in md
    assert "| mAP_tail | 0.1050 | 0.1000 (no interval: too few positives, see the report) | -0.0050 |" in md
    assert "| mAUC | 0.8080 | not measured | - |" in md
    with pytest.raises(ValueError, match="no variant 'fusion'"):
        R.published_table(spec, {"variants": []})


@pytest.mark.slow
def test_reproduce_smoke_runs_end_to_end_through_the_flow(tmp_path, prefect_harness):
    """`cxrlt reproduce cxr-lt-2024-task1 --smoke` on a generated demo: data check, plan, the train-eval flow
    (both stages), the report and the obtained-vs-published table, also as the flow run's artifact."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2",
           "BENTOML_HOME": str(tmp_path / "bentoml")}
    cli = [sys.executable, "-m", "cxrlt"]
    subprocess.run([*cli, "demo-data", "--out", str(tmp_path / "data"), "--studies", "300"], check=True, env=env,
                   cwd=ROOT, capture_output=True)
    out = tmp_path / "out"
    run = subprocess.run([*cli, "reproduce", "cxr-lt-2024-task1", "--data", str(tmp_path / "data"), "--smoke",
                          "--no-register", "--out", str(out), "--run-dir", str(tmp_path / "run")],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "disk for the resized cache" in run.stdout and "unmeasured" in run.stdout
    table = (out / "reproduction.md").read_text()
    assert "obtained vs published" in table and "| mAP | 0.2379 |" in table and "SYNTHETIC" in table
    assert table in (out / "report.md").read_text()
    models = tmp_path / "run" / "models"
    meta = json.loads((models / "fusion" / "artefact.json").read_text())
    assert meta["model"] == "chexfusion_test" and meta["loss"]["name"] == "afl" and meta["data"]["image_size"] == 64
    # through DVC, in a run folder of its own: the very same file's settings are what dvc.lock records
    params = (tmp_path / "run" / "params.yaml").read_text()
    assert str(ROOT / "experiments" / "cxr-lt-2024-task1.yaml") in params.splitlines()[0]
    source = yaml.safe_load((ROOT / "experiments" / "cxr-lt-2024-task1.yaml").read_text())
    lineage = json.loads((models / "fusion" / "lineage.json").read_text())
    recorded = lineage["dvc_lock"]["train"]["params"]["params.yaml"]
    assert float(recorded["train"]["lr"]) == source["train"]["lr"] and recorded["data"]["image_size"] == 64
    assert lineage["stages"]["train"] == "train-stage2@fusion" and "dvc repro evaluate-stage2@fusion" in lineage["rebuild"]
    status = subprocess.run([str(Path(sys.executable).parent / "dvc"), "status", "--json"], cwd=tmp_path / "run",
                            capture_output=True, text=True, env=env)
    # a rerun skips every stage but the image fingerprint (one directory walk)
    assert status.returncode == 0 and json.loads(status.stdout) == {"images": ["always changed"]}, status.stdout
    import asyncio

    from prefect.client.orchestration import get_client

    async def keys():
        async with get_client() as c:
            return [a.key for a in await c.read_artifacts()]
    assert "reproduction-cxr-lt-2024-task1" in asyncio.run(keys())
    assert yaml.safe_load((ROOT / "experiments" / "cxr-lt-2024-task1.yaml").read_text())["data"]["image_size"] == 1024


def test_the_plan_says_what_dvc_would_keep(tmp_path):
    assert R.dvc_cache_type(tmp_path) == "reflink,copy"
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    remote = x\n[cache]\n    type = copy\n")
    assert R.dvc_cache_type(tmp_path) == "copy"
    (tmp_path / ".dvc" / "config.local").write_text("[cache]\n    type = hardlink,symlink\n")
    assert R.dvc_cache_type(tmp_path) == "hardlink,symlink"
    assert "no second copy" in R.dvc_share(2 * 10**9, "hardlink,symlink")
    assert "+2.00 GB" in R.dvc_share(2 * 10**9, "reflink,copy")
