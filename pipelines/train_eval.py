"""The `train-eval` flow: dvc.yaml's stages per variant (manifest -> cache -> train -> evaluate), then
register each model with the dvc.lock entries that built it and serve the best by validation mAP.

The flow runs DVC (pipelines/dvc_steps.py) instead of calling the trainer around it: dvc.lock records the
data, code and parameters of every model, and a variant whose inputs did not change is neither trained
nor evaluated nor registered again. Training can run here or on a GPU worker of a Prefect work pool
(`train_on`, pipelines/train_variant.py). Tasks pass paths and registry tags, never tensors. Each
evaluation publishes a table artifact, the promotion a markdown one (pipelines/artifacts.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task

from cxrlt.artefact.meta import LINEAGE
from cxrlt.config import load_config
from pipelines import artifacts
from pipelines import dvc_steps as dvc


@task(name="data", retries=1, retry_delay_seconds=5)
def data_task(project: str) -> str:
    """The manifest and the resized cache (dvc.yaml's `manifest` and `prepare` stages)."""
    log = get_run_logger()
    ran = dvc.repro("prepare", cwd=project, log=log.info)
    log.info("data: %s", "rebuilt" if ran else "unchanged (DVC)")
    return str(Path(project) / _params(project)["paths"]["cache"])


def _params(project: str) -> dict:
    """params.yaml as written (its `paths` and which variants are stage 2 are read by dvc.yaml, not config)."""
    return yaml.safe_load((Path(project) / "params.yaml").read_text()) or {}


# training is expensive: one retry covers a transient failure (e.g. a killed worker) and continues from
# the run's last checkpoint rather than from scratch (`cxrlt train --resume`, which the stage runs)
@task(name="train", retries=1, retry_delay_seconds=10, task_run_name="train-{variant}")
def train_task(variant: str, stage2: bool, project: str, resume: bool = False, train_on: str | None = None,
               gpus: int = 1, job_variables: dict | None = None, upstream_done: bool = True) -> bool:
    """Train through DVC; True when it trained, False when dvc.lock says the variant is up to date.
    `upstream_done`: this run already reproduced every stage it depends on (data, and the stage-1 variant
    of a stage-2 one), so DVC need not re-check them."""
    from prefect.runtime import task_run

    log = get_run_logger()
    stage, _ = dvc.stage_names(variant, stage2)
    resume = resume or task_run.run_count > 1  # a retry resumes; a first attempt only when asked to
    if train_on:
        if dvc.is_up_to_date(stage, cwd=project):
            log.info("%s: unchanged (DVC), not trained again", variant)
            return False
        _train_remotely(variant, stage, project, resume, train_on, gpus, job_variables)
        dvc.commit(stage, cwd=project, log=log.info)  # the worker ran the stage's command: record it
        return True
    if resume:  # dvc.yaml's command has no --resume: continue the checkpoint with the CLI, then record it
        _train_here_resuming(variant, project, log)
        dvc.commit(stage, cwd=project, log=log.info)
        return True
    ran = dvc.repro(stage, cwd=project, log=log.info, single=upstream_done)
    log.info("%s: %s", variant, "trained" if ran else "unchanged (DVC), not trained again")
    return ran


def _train_here_resuming(variant: str, project: str, log) -> None:
    from cxrlt.data.manifest_io import load_manifest
    from cxrlt.engine import train

    cfg = load_config(Path(project) / "params.yaml")
    train(cfg.variant(variant), cfg.data, load_manifest(Path(project) / _params(project)["paths"]["cache"]),
          Path(project) / "models" / variant, progress=False, log=log.info, resume=True)


def _train_remotely(variant, stage, project, resume, train_on, gpus, job_variables) -> None:
    from prefect.deployments import run_deployment

    params = {"variant": variant, "manifest": _params(project)["paths"]["cache"], "out": f"models/{variant}",
              "gpus": gpus, "resume": resume}
    get_run_logger().info("%s: training on %s (%d GPU(s))", variant, train_on, gpus)
    run = run_deployment(train_on, parameters=params, job_variables=job_variables or None, timeout=None)
    if not run.state or not run.state.is_completed():
        raise RuntimeError(f"training {variant} on {train_on} ended {run.state.name if run.state else 'without a state'}"
                           f" (flow run {run.name}): see that run's logs in the Prefect UI; rerun the flow with "
                           "resume=true to continue from its checkpoint")
    art = Path(project) / "models" / variant / "artefact.json"
    if not art.exists():
        raise RuntimeError(f"the worker trained {variant} but {art} is not visible here: put the project folder on "
                           "storage both machines mount at the same path (see pipelines/train_variant.py)")


@task(name="evaluate", task_run_name="evaluate-{variant}")
def evaluate_task(variant: str, stage2: bool, project: str) -> dict:
    log = get_run_logger()
    _, stage = dvc.stage_names(variant, stage2)
    ran = dvc.repro(stage, cwd=project, log=log.info, single=True)
    metrics = json.loads((Path(project) / "models" / variant / "metrics.json").read_text())
    for split, m in metrics.items():
        log.info("%s %s: mAP %.4f mAUC %.4f mF1 %.4f", variant, split, m["mAP"], m["mAUC"], m["mF1"])
    artifacts.publish_metrics(variant, metrics, skipped=not ran)
    lineage = dvc.lineage(variant, stage2, cwd=project)
    (Path(project) / "models" / variant / LINEAGE).write_text(json.dumps(lineage, indent=2))
    return metrics


@task(name="register", retries=2, retry_delay_seconds=2, task_run_name="register-{artefact}")
def register_task(artefact: str, model_name: str) -> str:
    """Register the artefact, unless a model built from the same dvc.lock entries is registered already."""
    from cxrlt.registry import store

    digest = _lock_digest(Path(artefact))
    variant = json.loads((Path(artefact) / "artefact.json").read_text()).get("variant")
    for row in store.list_registered(model_name) if digest else []:
        if row["variant"] == variant and _lock_digest(store.model_path(row["tag"])) == digest:
            get_run_logger().info("%s: already registered as %s (same dvc.lock entries)", variant, row["tag"])
            return row["tag"]
    return store.register(artefact, name=model_name)


def _lock_digest(folder: Path) -> str | None:
    try:
        return json.loads((folder / LINEAGE).read_text())["lock_digest"]
    except (OSError, ValueError, KeyError):
        return None


@task(name="promote-best")
def promote_task(model_name: str, manifest: str) -> str:
    """The best of the models validated on this run's data (other data sets' mAPs are not comparable)."""
    from cxrlt.registry import store
    from cxrlt.provenance import data_version

    old = store.serving_tag(required=False, name=model_name)
    before = store.last_event(model_name)
    new = store.promote_best(model_name, data_version(manifest)["manifest_md5"])
    after = store.last_event(model_name)
    event = after if after != before else None  # None: nothing changed, the best already served
    artifacts.publish_promotion(model_name, old, new, event, store.list_registered(model_name))
    return new


@task(name="comparison-report")
def report_task(artefacts: list[str], manifest: str, out_dir: str, split: str = "test") -> str:
    from cxrlt.evaluation.report import write_report

    return str(write_report(artefacts, out_dir, manifest=manifest, split=split))


@task(name="obtained-vs-published")
def reproduction_task(params_path: str, report_dir: str) -> str:
    """A published configuration's run (a params file with `reproduce:`): its numbers beside the published ones,
    in the report folder (reproduction.md, and at the end of report.md) and as this run's markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    from cxrlt.engine.reproduce import load_reproduction, published_table

    spec = load_reproduction(params_path)
    table = published_table(spec, json.loads((Path(report_dir) / "results.json").read_text()))
    (Path(report_dir) / "reproduction.md").write_text(table)
    report = Path(report_dir) / "report.md"
    report.write_text(report.read_text().rstrip() + "\n\n" + table)   # the report leads to the same table
    create_markdown_artifact(table, key=artifacts.artifact_key(f"reproduction-{spec.name}"),
                             description=f"{spec.title}: obtained vs published")
    print(table)
    return str(Path(report_dir) / "reproduction.md")


@flow(name="train-eval", log_prints=True)
def train_eval(variants: list[str] | None = None, project_dir: str = ".", params: str = "params.yaml",
               epochs: int | None = None, image_size: int | None = None, max_steps_per_epoch: int | None = None,
               register_models: bool = True, promote: bool = True, model_name: str = "cxrlt",
               report_dir: str | None = None, resume: bool = False, train_on: str | None = None, gpus: int = 1,
               train_job_variables: dict | None = None, labels: str | None = None, images: str | None = None,
               work_dir: str = "prepared", models_dir: str = "models", overrides: dict | None = None,
               report_split: str = "test", run_dir: str | None = None) -> dict[str, Any]:
    """Train, evaluate and register each variant of params.yaml (or those named), then serve the best.

    With the project's own params.yaml (the default), every step is a dvc.yaml stage run through DVC:
    dvc.lock records each model's data, code and parameters, and unchanged variants are skipped.
    labels/images/epochs/image_size/max_steps_per_epoch are then written into params.yaml (as `dvc exp run
    --set-param` does) so that dvc.lock records them. train_on: a deployment such as `train-variant/gpu`
    whose work pool runs on a GPU host (pipelines/deploy_gpu.py), with `gpus` GPUs per run and
    `train_job_variables` (e.g. {"env": {"CUDA_VISIBLE_DEVICES": "0,1"}}); default: train here.

    Another params file with `run_dir` (what `cxrlt reproduce` does) runs through DVC too, in a run folder
    of its own (pipelines/dvc_run.py: the file and the overrides as its params.yaml, the project's stages,
    its own dvc.lock and DVC cache), so that it is recorded and resumable like any other experiment.
    Another params file without it (e.g. experiments/demo-matrix.yaml, with seeded variants) is trained with the
    library into work_dir / models_dir, outside dvc.lock (pipelines/matrix_steps.py); there the overrides
    apply to this run only, and `gpus` > 1 trains here with torchrun. `overrides`: any other dotted settings
    ({"train.batch_size": 4}), as `cxrlt --set`. With `report_dir`, the variants are compared in one report on
    `report_split`, and a published configuration (a params file with `reproduce:`, `cxrlt reproduce`) gets its
    numbers beside the published ones; with `resume`, trainings continue from the checkpoints an interrupted
    run left (a retried train task always does).
    """
    project = str(Path(project_dir))
    overrides = {**(overrides or {}), **{k: v for k, v in {
        "paths.labels": labels, "paths.images": images, "train.epochs": epochs, "data.image_size": image_size,
        "train.max_steps_per_epoch": max_steps_per_epoch}.items() if v is not None}}
    params_path = source = Path(project) / params
    if run_dir:  # the file and the overrides become the run folder's params.yaml, run by DVC there
        from pipelines import dvc_run

        project = str(dvc_run.write_run(Path(project) / run_dir, params_path, overrides, project, gpus))
        params_path, overrides = Path(project) / "params.yaml", {}
    in_dvc = params_path.resolve() == (Path(project) / "params.yaml").resolve()
    # checked before anything is written: an unknown variant or parameter fails with params.yaml untouched
    cfg = load_config(params_path, {k: v for k, v in overrides.items() if not k.startswith("paths.")})
    names = cfg.select(variants)
    if in_dvc:
        dvc.check_repository(project)
        previous = dvc.apply_overrides(params_path, overrides)
        if previous:
            print("params.yaml: " + ", ".join(f"{k} {previous[k]!r} -> {v!r}" for k, v in overrides.items()))
        overrides = {}
    names.sort(key=lambda n: bool(cfg.variant(n).init_from))  # a stage-2 variant starts from its stage-1 artefact
    seeded = [n for n in names if cfg.variant(n).name != cfg.variant(n).group]  # <name>-seed<k>
    if in_dvc and seeded:
        raise ValueError(f"{', '.join(seeded)} are seeded runs, which dvc.yaml's foreach stages cannot expand: put the "
                         "seeded variants in a params file of their own (as experiments/demo-matrix.yaml) and run the "
                         "flow with params=<that file>, or list each seed as its own variant")
    if in_dvc:
        results = _through_dvc(names, project, cfg, resume, train_on, gpus, train_job_variables, register_models,
                               model_name)
        cache = results.pop("_cache")
    else:
        results, cache = _outside_dvc(names, project, params_path, overrides, work_dir, models_dir, resume,
                                      register_models, model_name, gpus)
    if report_dir:
        results["report"] = report_task([results[n]["artefact"] for n in names], cache, report_dir, report_split)
        print(f"comparison report: {results['report']}")
        if "reproduce" in (yaml.safe_load(source.read_text()) or {}):
            results["reproduction"] = reproduction_task(str(source), report_dir)
    if register_models and promote:
        results["serving"] = promote_task(model_name, cache)
        print(f"serving {results['serving']}")
    return results


def _through_dvc(names, project, cfg, resume, train_on, gpus, job_variables, register_models, model_name) -> dict:
    stage2_names = set(_params(project).get("stage2_variants") or {})
    results: dict[str, Any] = {"_cache": data_task(project)}
    for n in names:  # sequential: on a CPU box parallel training only fights for the same cores
        stage2 = n in stage2_names
        upstream_done = not stage2 or cfg.variant(n).init_from in names
        trained = train_task(n, stage2, project, resume, train_on, gpus, job_variables, upstream_done)
        results[n] = {"artefact": str(Path(project) / "models" / n), "trained": trained,
                      "metrics": evaluate_task(n, stage2, project)}
        if register_models:
            results[n]["tag"] = register_task(results[n]["artefact"], model_name)
    return results


def _outside_dvc(names, project, params_path, overrides, work_dir, models_dir, resume, register_models,
                 model_name, gpus: int = 1) -> tuple[dict, str]:
    from pipelines import matrix_steps as direct

    paths = (yaml.safe_load(params_path.read_text()) or {}).get("paths", {})
    labels = overrides.get("paths.labels") or paths.get("labels")
    images = overrides.get("paths.images") or paths.get("images")
    if not labels or not images:
        raise ValueError(f"{params_path} has no paths.labels / paths.images: give them in the file or as the flow's "
                         "labels and images parameters")
    run_overrides = {k: v for k, v in overrides.items() if not k.startswith("paths.")}
    root = Path(project)
    manifest = direct.manifest_task(str(root / labels), str(root / images), str(root / work_dir / "manifest"),
                                    str(params_path), run_overrides)
    cache = direct.prepare_task(manifest, str(root / work_dir / "cache"),
                                load_config(params_path, run_overrides).data.image_size)
    results: dict[str, Any] = {}
    for n in names:
        art = direct.train_task(n, cache, str(root / models_dir / n), str(params_path), run_overrides, resume, gpus)
        results[n] = {"artefact": art, "metrics": direct.evaluate_task(n, art, cache, str(params_path), run_overrides)}
        if register_models:
            results[n]["tag"] = register_task(art, model_name)
    return results, cache


def main(argv=None) -> None:
    """`python -m pipelines.train_eval`: the flow run here, without a deployment (what `cxrlt reproduce` starts);
    with PREFECT_API_URL set it reports to that server, else to a temporary local one."""
    import argparse

    from cxrlt.cli.common import overrides as parse_set

    ap = argparse.ArgumentParser(prog="python -m pipelines.train_eval", description=main.__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--variant", action="append", dest="variants", help="a variant to run (default: all); repeatable")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a parameter; repeatable")
    ap.add_argument("--work-dir", default="prepared")
    ap.add_argument("--run-dir", help="run another params file through DVC in this folder (pipelines/dvc_run.py)")
    ap.add_argument("--models-dir", default="models")
    ap.add_argument("--report-dir")
    ap.add_argument("--report-split", default="test")
    ap.add_argument("--model-name", default="cxrlt")
    ap.add_argument("--no-register", action="store_true")
    ap.add_argument("--no-promote", action="store_true")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--gpus", type=int, default=1)
    a = ap.parse_args(argv)
    train_eval(variants=a.variants, params=a.params, overrides=parse_set(a.set), work_dir=a.work_dir,
               models_dir=a.models_dir, report_dir=a.report_dir, report_split=a.report_split, run_dir=a.run_dir,
               model_name=a.model_name, register_models=not a.no_register,
               promote=not a.no_promote and not a.no_register, resume=a.resume, gpus=a.gpus)


if __name__ == "__main__":
    main()
