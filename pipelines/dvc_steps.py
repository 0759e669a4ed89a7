"""The DVC side of the `train-eval` flow: run dvc.yaml's stages, read what dvc.lock recorded for them, and
write parameter overrides where DVC reads them. No Prefect here (the flow's tasks call these), so the
functions run and test without a server.

Why the flow goes through DVC rather than calling the trainer: dvc.lock then records, per variant, the
data, code and parameters each model was built from (so a registered model can be rebuilt with one
command), `dvc repro` skips a stage whose inputs did not change (an unchanged variant is not trained
again), and `dvc exp show` / `dvc metrics diff` / `dvc plots diff` compare the runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import yaml


class DvcError(RuntimeError):
    """A DVC command failed; the message has its last output lines and what to do."""


def dvc_executable() -> str:
    """The `dvc` of this environment (beside the running python), so a flow never picks another install."""
    here = Path(sys.executable).parent / "dvc"
    return str(here) if here.exists() else "dvc"


def run_dvc(*args: str, cwd: str | Path = ".", log: Callable[[str], None] | None = None) -> str:
    """Run `dvc ARGS` in `cwd`; returns its output. Each output line goes to `log` as it comes."""
    # stage commands call `cxrlt`: this environment's, even when its bin folder is not on PATH (a worker
    # started as .venv/bin/prefect)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([dvc_executable(), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if log and line.strip():
            log(line.rstrip())
    if proc.wait() != 0:
        tail = "\n".join(lines[-25:])
        raise DvcError(f"`dvc {' '.join(args)}` failed in {cwd} (exit {proc.returncode}):\n{tail}\n"
                       "Fix the cause above and run the flow again: DVC reruns only the stages that did not finish.")
    return "\n".join(lines)


def check_repository(cwd: str | Path = ".") -> None:
    """The flow needs a DVC project (dvc.yaml + .dvc/) inside git, with the data tracked."""
    root = Path(cwd)
    missing = [p for p in ("dvc.yaml", ".dvc", "params.yaml") if not (root / p).exists()]
    if missing:
        raise DvcError(f"{root.resolve()} is not a cxrlt DVC project ({', '.join(missing)} missing): run the flow in "
                       "the project folder (a clone of the repository, after `dvc init` if .dvc/ is missing)")


def stage_names(variant: str, stage2: bool) -> tuple[str, str]:
    """dvc.yaml's (train, evaluate) stages of a variant: foreach stages are named `stage@key`."""
    return ((f"train-stage2@{variant}", f"evaluate-stage2@{variant}") if stage2
            else (f"train@{variant}", f"evaluate@{variant}"))


def repro(stage: str, cwd: str | Path = ".", log: Callable[[str], None] | None = None,
          single: bool = False) -> bool:
    """`dvc repro STAGE` (and whatever it depends on that changed); True when the stage itself ran, False
    when DVC found its inputs unchanged and kept its outputs. `single`: this stage only (its upstream was
    reproduced by an earlier call), which spares DVC re-checking the whole chain (seconds per stage)."""
    out = run_dvc("repro", *(["--single-item"] if single else []), stage, cwd=cwd, log=log)
    return f"Running stage '{stage}'" in out


def is_up_to_date(stage: str, cwd: str | Path = ".") -> bool:
    """Whether dvc.lock already records `stage` with the current data, code and parameters."""
    out = run_dvc("status", stage, "--json", cwd=cwd)
    start = out.find("{")
    return start < 0 or not json.loads(out[start:])


def commit(stage: str, cwd: str | Path = ".", log: Callable[[str], None] | None = None) -> None:
    """Record outputs that were produced outside DVC (a GPU worker ran the same command) in dvc.lock."""
    run_dvc("commit", "--force", stage, cwd=cwd, log=log)


def lock_entries(stages, cwd: str | Path = ".") -> dict:
    """dvc.lock's record of each stage (read once): its command, deps and outs with their md5s, and the
    params it read."""
    lock = Path(cwd) / "dvc.lock"
    if not lock.exists():
        raise DvcError(f"{lock} is missing: the stages {', '.join(stages)} have not run through DVC yet")
    recorded = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    missing = [s for s in stages if s not in recorded]
    if missing:
        raise DvcError(f"dvc.lock has no entry for {', '.join(missing)}: run `dvc repro {missing[0]}`")
    return {s: recorded[s] for s in stages}


def lineage(variant: str, stage2: bool, cwd: str | Path = ".") -> dict:
    """What a registered model points at: the dvc.lock entries that built and evaluated it, a digest of
    both (equal digests = the same model inputs), the git commit, and the command that rebuilds it."""
    train, evaluate = stage_names(variant, stage2)
    recorded = lock_entries((train, evaluate), cwd)
    entries = {"train": recorded[train], "evaluate": recorded[evaluate]}
    digest = hashlib.md5(json.dumps(entries, sort_keys=True, default=str).encode()).hexdigest()
    project = Path(__file__).resolve().parents[1]
    commit = _git_commit(cwd) or _git_commit(project)   # a run folder outside git: the code's commit
    # exact when dvc.lock and params.yaml were committed after the run (the md5s above say what to expect)
    rebuild = f"git checkout {commit or '<commit>'} && dvc pull && dvc repro {evaluate}"
    if Path(cwd).resolve() != project:  # a run folder of its own (pipelines/dvc_run.py)
        rebuild = f"git checkout {commit or '<commit>'} && cd {Path(cwd).resolve()} && dvc repro {evaluate}"
    return {"stages": {"train": train, "evaluate": evaluate}, "dvc_lock": entries, "lock_digest": digest,
            "git_commit": commit, "rebuild": rebuild}


def _git_commit(cwd) -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


_KEY = re.compile(r"^[A-Za-z0-9_.\-]+$")


def apply_overrides(params_path: str | Path, overrides: dict) -> dict:
    """Write `overrides` ({"train.epochs": 2, ...}) into params.yaml, as `dvc exp run --set-param` does, so
    that dvc.lock records the parameters a model was really trained with. Comments and order are kept
    (ruamel, DVC's own YAML library). Returns the previous values, for the run's log."""
    from ruamel.yaml import YAML

    if not overrides:
        return {}
    ry = YAML()
    ry.preserve_quotes = True
    path = Path(params_path)
    doc = ry.load(path.read_text())
    previous = {}
    for key, value in overrides.items():
        if not _KEY.match(key):
            raise ValueError(f"parameter name {key!r}: use dotted names such as train.epochs")
        *parents, leaf = key.split(".")
        node = doc
        for p in parents:
            if p not in node or not hasattr(node[p], "keys"):
                raise ValueError(f"params.yaml has no section {'.'.join(parents)} for {key}")
            node = node[p]
        previous[key] = node.get(leaf)
        node[leaf] = value
    with open(path, "w") as f:
        ry.dump(doc, f)
    return previous
