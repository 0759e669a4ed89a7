"""The `train-eval` flow: manifest -> resized cache -> (train -> evaluate -> register) per variant ->
serve the best by validation mAP. Each step is a small task; tasks pass paths and registry tags, never
tensors. The same library functions back the DVC stages (dvc.yaml), so both define one pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from cxrlt.config import load_config


@task(name="manifest", retries=1, retry_delay_seconds=5)
def build_manifest_task(labels: str, images: str, out: str, params: str, overrides: dict) -> str:
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


# training is expensive: one retry covers a transient failure (e.g. a killed worker) and continues from
# the run's last checkpoint rather than from scratch
@task(name="train", retries=1, retry_delay_seconds=10, task_run_name="train-{variant}")
def train_task(variant: str, manifest: str, out: str, params: str, overrides: dict, resume: bool = False) -> str:
    from prefect.runtime import task_run

    from cxrlt.data.manifest import load_manifest
    from cxrlt.engine import train

    cfg = load_config(params, overrides)
    log = get_run_logger()
    resume = resume or task_run.run_count > 1  # a retry resumes; a first attempt only when asked to
    return str(train(cfg.variant(variant), cfg.data, load_manifest(manifest), out, progress=False, log=log.info,
                     resume=resume))


@task(name="evaluate", task_run_name="evaluate-{artefact}")
def evaluate_task(artefact: str, manifest: str, params: str, overrides: dict) -> dict:
    from cxrlt.data.manifest import load_manifest
    from cxrlt.engine import evaluate

    cfg = load_config(params, overrides)  # only `eval`: the image size is the artefact's own
    res = evaluate(artefact, load_manifest(manifest), cfg.eval, progress=False)
    for split, m in res.items():
        get_run_logger().info("%s %s: mAP %.4f mAUC %.4f mF1 %.4f", artefact, split, m["mAP"], m["mAUC"], m["mF1"])
    return res


@task(name="register", retries=2, retry_delay_seconds=2, task_run_name="register-{artefact}")
def register_task(artefact: str, model_name: str) -> str:
    from cxrlt import registry

    return registry.register(artefact, name=model_name)


@task(name="promote-best")
def promote_task(model_name: str, manifest: str) -> str:
    """The best of the models validated on this run's data (other data sets' mAPs are not comparable)."""
    from cxrlt import registry
    from cxrlt.provenance import data_version

    return registry.promote_best(model_name, data_version(manifest)["manifest_md5"])


@task(name="comparison-report")
def report_task(artefacts: list[str], manifest: str, out_dir: str) -> str:
    from cxrlt.report import write_report

    return str(write_report(artefacts, out_dir, manifest=manifest))


@flow(name="train-eval", log_prints=True)
def train_eval(variants: list[str] | None = None, labels: str | None = None, images: str | None = None,
               work_dir: str = "prepared", models_dir: str = "models", params: str = "params.yaml",
               epochs: int | None = None, image_size: int | None = None, max_steps_per_epoch: int | None = None,
               register_models: bool = True, promote: bool = True, model_name: str = "cxrlt",
               report_dir: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate and register each variant of params.yaml (or those named), then serve the best.

    labels/images: the label-file folder (CXR-LT 2024, NIH or PadChest layout) and the image root
    (default: params.yaml `paths`, the built-in demo). epochs/image_size/max_steps_per_epoch override
    params.yaml for this run.
    A seeded variant (`seeds: [0, 1, 2]`) runs once per seed as <name>-seed<k>; naming <name> in
    `variants` runs all its seeds. Models are registered under `model_name`; the best of that name by
    validation mAP gets served. With `report_dir`, the variants of this run are compared in one report
    (cxrlt.report). With `resume`, trainings continue from the checkpoints an interrupted flow run left
    (a retried train task always does).
    """
    import yaml

    raw = yaml.safe_load(Path(params).read_text()) or {}
    paths = raw.get("paths", {})
    labels, images = labels or paths["labels"], images or paths["images"]
    overrides: dict[str, Any] = {}
    if epochs is not None:
        overrides["train.epochs"] = epochs
    if image_size is not None:
        overrides["data.image_size"] = image_size
    if max_steps_per_epoch is not None:
        overrides["train.max_steps_per_epoch"] = max_steps_per_epoch
    cfg = load_config(params, overrides)
    names = cfg.select(variants)  # fails fast on an unknown name, before any work
    # stage-1 variants first: a stage-2 variant starts from its stage-1 artefact
    names.sort(key=lambda n: bool(cfg.variant(n).init_from))
    manifest = build_manifest_task(labels, images, f"{work_dir}/manifest", params, overrides)
    cache = prepare_task(manifest, f"{work_dir}/cache", cfg.data.image_size)
    results: dict[str, Any] = {}
    for n in names:  # sequential: on a CPU box parallel training only fights for the same cores
        art = train_task(n, cache, f"{models_dir}/{n}", params, overrides, resume)
        res = evaluate_task(art, cache, params, overrides)
        results[n] = {"artefact": art, "metrics": res}
        if register_models:
            results[n]["tag"] = register_task(art, model_name)
    if report_dir:
        results["report"] = report_task([results[n]["artefact"] for n in names], cache, report_dir)
        print(f"comparison report: {results['report']}")
    if register_models and promote:
        results["serving"] = promote_task(model_name, cache)
        print(f"serving {results['serving']}")
    return results
