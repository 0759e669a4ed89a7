"""Tasks for params files that DVC does not read (e.g. experiments/demo-matrix.yaml) and for seeded
variants, which dvc.yaml's foreach stages cannot expand: the `train-eval` flow trains and evaluates these
with the library directly, into their own folders. Their models are registered with a lineage that says
they are not in dvc.lock, and name the params file and commit that rebuild them.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task

from cxrlt.artefact.meta import LINEAGE
from cxrlt.config import load_config
from pipelines import artifacts



@task(name="manifest", retries=1, retry_delay_seconds=5)
def manifest_task(labels: str, images: str, out: str, params: str, overrides: dict) -> str:
    from cxrlt.data.layouts import build_layout_manifest

    d = load_config(params, overrides).data
    # the layout (CXR-LT 2024, NIH ChestX-ray14, PadChest) is read off the files in the labels folder
    m = build_layout_manifest(None, labels, images, out, task=d.task, val_fraction=d.val_fraction, seed=d.seed,
                              zero_shot=tuple(d.zero_shot))
    get_run_logger().info("manifest: %d images, %d studies", len(m.frame), m.frame["study_id"].nunique())
    return out


@task(name="prepare", retries=1, retry_delay_seconds=5)
def prepare_task(manifest: str, out: str, image_size: int) -> str:
    from cxrlt.data.prepare import prepare_cache

    return str(prepare_cache(manifest, out, size=image_size, progress=False))


# one retry covers a transient failure and continues from the run's last checkpoint
@task(name="train", retries=1, retry_delay_seconds=10, task_run_name="train-{variant}")
def train_task(variant: str, manifest: str, out: str, params: str, overrides: dict, resume: bool = False,
               gpus: int = 1) -> str:
    from prefect.runtime import task_run

    from cxrlt.data.manifest_io import load_manifest
    from cxrlt.engine import distributed, train

    cfg = load_config(params, overrides)
    resume = resume or task_run.run_count > 1  # a retry resumes; a first attempt only when asked to
    if gpus > 1:  # torchrun starts one trainer per GPU: `cxrlt train --gpus N` with the same settings
        args = ["--variant", variant, "--manifest", manifest, "--params", params, "--out", out, "--quiet",
                *(["--resume"] * resume), *[x for k, v in overrides.items() for x in ("--set", f"{k}={json.dumps(v)}")]]
        distributed.launch(gpus, args)
        return out
    return str(train(cfg.variant(variant), cfg.data, load_manifest(manifest), out, progress=False,
                     log=get_run_logger().info, resume=resume))


@task(name="evaluate", task_run_name="evaluate-{variant}")
def evaluate_task(variant: str, artefact: str, manifest: str, params: str, overrides: dict) -> dict:
    from cxrlt.data.manifest_io import load_manifest
    from cxrlt.engine import evaluate
    from cxrlt.provenance import git_commit

    cfg = load_config(params, overrides)  # only `eval`: the image size is the artefact's own
    res = evaluate(artefact, load_manifest(manifest), cfg.eval, progress=False)
    for split, m in res.items():
        get_run_logger().info("%s %s: mAP %.4f mAUC %.4f mF1 %.4f", variant, split, m["mAP"], m["mAUC"], m["mF1"])
    artifacts.publish_metrics(variant, res, skipped=False)
    lineage = {"dvc_lock": None, "lock_digest": None, "params_file": str(params), "overrides": overrides,
               "git_commit": git_commit(), "note": "trained outside dvc.lock (a params file DVC does not read, or "
               "a seeded variant)",
               "rebuild": f"git checkout <commit> && prefect deployment run 'train-eval/<name>' -p params={params} "
                          f"-p variants='[\"{variant}\"]'"}
    (Path(artefact) / LINEAGE).write_text(json.dumps(lineage, indent=2))
    return res
