"""`cxrlt reproduce NAME --data DIR`: a published configuration (experiments/NAME.yaml) checked against the
data, planned (disk, GPU hours), run through the train-eval flow, and set beside the published numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cxrlt.cli.common import add_command


def cmd_reproduce(a):
    from cxrlt.config import load_config
    from cxrlt.engine.reproduce import (data_problems, load_reproduction, plan, render_plan, run_cache_type,
                                        run_overrides)

    if a.gpus < 1:
        raise ValueError(f"--gpus is {a.gpus}: give the number of GPUs to train on (1 or more)")
    spec = load_reproduction(a.name)
    sets = run_overrides(spec, a.data, smoke=a.smoke)
    cfg = load_config(spec.path, {k: v for k, v in sets.items() if not k.startswith("paths.")})
    labels_dir = Path(sets["paths.labels"]).name
    problems = data_problems(spec, a.data, cfg.data.task, labels_dir)
    if problems:
        raise FileNotFoundError(f"the data folder {a.data} is not ready for {spec.name}:\n  - " + "\n  - ".join(problems)
                                + "\nDownload the CXR-LT label files and MIMIC-CXR-JPG 2.0.0 from PhysioNet into it "
                                  "(or `cxrlt demo-data --out DIR` with --smoke)")
    run = spec.name + ("-smoke" if a.smoke else "")
    root = Path.cwd()
    run_dir = Path(a.run_dir or root / "runs" / run).absolute()
    print(render_plan(plan(spec, sets, a.gpus, run_cache_type(run_dir)))
          + f"\n  run folder: {run_dir} (its own dvc.yaml, params.yaml, dvc.lock and DVC cache)"
          + ("\n  (smoke: the same file scaled down)" if a.smoke else ""))
    if a.dry_run:
        return
    if not (root / "pipelines" / "train_eval.py").is_file():
        raise FileNotFoundError("run `cxrlt reproduce` from the project's root folder (it holds pipelines/ and "
                                "experiments/): the run goes through its train-eval flow")
    out = Path(a.out or Path("reports") / "reproduce" / run).absolute()
    cmd = [sys.executable, "-m", "pipelines.train_eval", "--params", str(spec.path.absolute()), "--run-dir",
           str(run_dir), "--report-dir", str(out),
           "--report-split", spec.report_split, "--model-name", f"cxrlt-{run}", "--no-promote",
           "--gpus", str(a.gpus), *(["--resume"] * a.resume), *(["--no-register"] * a.no_register),
           *[x for k, v in sets.items() for x in ("--set", f"{k}={json.dumps(v)}")]]
    # no telemetry from the temporary Prefect server the flow starts when PREFECT_API_URL is unset (as the stack)
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **os.environ}
    rc = subprocess.call(cmd, cwd=root, env=env)
    if rc != 0:
        raise RuntimeError(f"the train-eval flow ended with exit code {rc} (its log is above); run the same command "
                           "again: DVC skips the stages that finished (add --resume to continue a training from its "
                           "last checkpoint)")
    print(f"\nreport: {out / 'report.md'}\nobtained vs published: {out / 'reproduction.md'}")


def add_parsers(sub) -> None:
    """Add this group's subcommands to the `cxrlt` parser."""
    p = add_command(sub, "reproduce", cmd_reproduce,
                    "rerun a published configuration (experiments/NAME.yaml) and set its numbers beside the published ones")
    p.add_argument("name", help="a file of experiments/ with a `reproduce:` section (chexfusion-2023, "
                                "cxr-lt-2024-task1) or a path to one")
    p.add_argument("--data", required=True,
                   help="folder holding the label files' folder (e.g. cxr-lt-2024/) and mimic-cxr-jpg/files/")
    p.add_argument("--gpus", type=int, default=1, help="GPUs of this machine to train on (torchrun; default 1)")
    p.add_argument("--smoke", action="store_true",
                   help="the same file scaled down (image size, epochs, steps, small models): a minutes-long run, "
                        "e.g. on `cxrlt demo-data`")
    p.add_argument("--dry-run", action="store_true", help="check the data and print the plan, run nothing")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    p.add_argument("--out", help="report folder (default: reports/reproduce/NAME)")
    p.add_argument("--run-dir", help="the run's folder: its params.yaml, dvc.yaml, dvc.lock, DVC cache, resized "
                                     "images and models (default: runs/NAME; put it on a disk with room for the cache)")
    p.add_argument("--no-register", action="store_true", help="do not register the trained models")
