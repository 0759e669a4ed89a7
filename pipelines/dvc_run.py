"""A params file other than params.yaml, run through DVC all the same: a DVC project of its own (a run folder).

`cxrlt reproduce` (a published configuration, experiments/NAME.yaml) trains on data of its own, often on a
scratch disk beside the GPUs. So that it is resumable and recorded like any other experiment, the run gets a
folder holding:

  params.yaml   the experiment file as the run reads it (its settings, the data paths and any --set), so
                DVC tracks every parameter the file states
  dvc.yaml      the project's stages, unchanged but for where the library's code lies (relative to the
                run folder, or absolute when the folder is elsewhere), and `--gpus N` on the train commands
  .dvc/         `dvc init --no-scm`: the run's own DVC cache (on the run's disk), linked rather than copied
  dvc.lock      what DVC recorded: each model's data, code and parameters

`dvc repro` in that folder reruns only what changed (an interrupted run continues where it stopped), and
`dvc status` / `dvc exp show` / `dvc metrics show` work there as in the project.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

from cxrlt.engine.reproduce import RUN_CACHE_TYPES as LINK_TYPES
from pipelines import dvc_steps as dvc
RUN_ONLY_SECTIONS = ("reproduce",)   # a published configuration's description: read by the report, not DVC


def run_params(params_path: str | Path, overrides: dict) -> dict:
    """The run's parameters: the file's sections with the dotted overrides applied ({"paths.images": ...}),
    the data paths absolute, and the manifest and cache inside the run folder."""
    doc = yaml.safe_load(Path(params_path).read_text()) or {}
    doc = {k: copy.deepcopy(v) for k, v in doc.items() if k not in RUN_ONLY_SECTIONS}
    doc.setdefault("paths", {})
    doc.setdefault("stage2_variants", {})
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key}: {'.'.join(parents)} is not a section of {params_path}")
        node[leaf] = value
    paths = doc["paths"]
    for key in ("labels", "images"):
        if not paths.get(key):
            raise ValueError(f"{params_path}: paths.{key} is not set (give it in the file or as an override)")
        paths[key] = str(Path(paths[key]).absolute())
    paths.setdefault("fingerprint", "prepared/images.json")
    paths.setdefault("manifest", "prepared/manifest")
    paths.setdefault("cache", "prepared/cache")
    return doc


def run_stages(project: str | Path, run_dir: str | Path, params: dict, gpus: int = 1) -> dict:
    """The project's dvc.yaml for a run folder: code dependencies re-pointed at the project's files,
    stages a params file cannot feed (stage 2 without stage-2 variants) left out, `--gpus` on training."""
    project, run_dir = Path(project).absolute(), Path(run_dir).absolute()
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    # relative inside the project (the record holds when the project moves), absolute from elsewhere
    to_project = Path(os.path.relpath(project, run_dir)) if run_dir.is_relative_to(project) else project
    stages = {}
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)
        if stage.get("foreach") == "${stage2_variants}" and not params.get("stage2_variants"):
            continue
        body = copy.deepcopy(body)
        body["deps"] = [d if _run_local(d) else str(to_project / d) for d in body.get("deps", [])]
        if gpus > 1 and body["cmd"].startswith("cxrlt train "):
            body["cmd"] += f" --gpus {gpus}"
        stages[name] = {"foreach": stage["foreach"], "do": body} if "do" in stage else body
    return {"stages": stages}


def _run_local(dep: str) -> bool:
    """A dependency the run folder holds or names itself (data paths, the cache, its models)."""
    return "${" in dep or dep.startswith("models/")


def write_run(run_dir: str | Path, params_path: str | Path, overrides: dict, project: str | Path = ".",
              gpus: int = 1, log=print) -> Path:
    """Create or update the run folder for `params_path` + `overrides`; returns it. An existing run keeps
    its dvc.lock and DVC cache, so only what the new parameters or code change runs again."""
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    params = run_params(params_path, overrides)
    header = (f"# The parameters of this run: {Path(params_path).absolute()} with the run's settings applied.\n"
              "# Written by the train-eval flow at each start (edit the source file, not this one).\n")
    _write_if_changed(run_dir / "params.yaml", header + yaml.safe_dump(params, sort_keys=False))
    _write_if_changed(run_dir / "dvc.yaml",
                      "# The project's stages for this run folder (pipelines/dvc_run.py); regenerated at each start.\n"
                      + yaml.safe_dump(run_stages(project, run_dir, params, gpus), sort_keys=False))
    if not (run_dir / ".dvc").is_dir():
        dvc.run_dvc("init", "--no-scm", "-q", cwd=run_dir)
        dvc.run_dvc("config", "cache.type", LINK_TYPES, cwd=run_dir)
        dvc.run_dvc("config", "core.analytics", "false", cwd=run_dir)
        log(f"run folder {run_dir}: a DVC project of its own (cache.type {LINK_TYPES})")
    return run_dir


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
