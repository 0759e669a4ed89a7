"""The `train-variant` flow: one variant's training, run by a Prefect worker on a GPU host.

`train-eval` sends its training steps here when given `train_on="train-variant/<deployment>"`: the
deployment lives in a work pool whose worker runs on the GPU machine (see pipelines/deploy_gpu.py and the
README's "Training at scale"). The flow runs the very command of dvc.yaml's train stage, `cxrlt train`,
with `--gpus N` (torchrun launches one process per GPU on that host) and the device; `train-eval` then
records the outputs in dvc.lock (`dvc commit`), evaluates and registers as for a local run.

Both machines must see the project folder at the same path (a shared file system: NFS, a cluster's
home or scratch), since the worker writes the artefact and the orchestrating flow reads it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger


def train_command(variant: str, manifest: str, out: str, params: str = "params.yaml", gpus: int = 1,
                  device: str | None = None, resume: bool = False) -> list[str]:
    """`cxrlt train` as dvc.yaml runs it, plus the GPU count and device of the worker."""
    cmd = [sys.executable, "-m", "cxrlt", "train", "--variant", variant, "--manifest", manifest, "--out", out,
           "--params", params, "--gpus", str(int(gpus)), "--quiet"]
    if device:
        cmd += ["--set", f"train.device={device}"]
    if resume:
        cmd.append("--resume")
    return cmd


@flow(name="train-variant", log_prints=True)
def train_variant(variant: str, manifest: str, out: str, project_dir: str = ".", params: str = "params.yaml",
                  gpus: int = 1, device: str | None = None, resume: bool = False) -> str:
    """Train one variant of params.yaml with `cxrlt train --gpus N` in `project_dir` (the project folder as
    this host sees it); returns the artefact folder. `device`: cuda, cpu or auto (train.device)."""
    log = get_run_logger()
    if gpus < 1:
        raise ValueError(f"gpus is {gpus}: give the number of GPUs to train on (1 or more)")
    cwd = Path(project_dir)
    if not (cwd / params).exists():
        raise FileNotFoundError(f"{(cwd / params).resolve()} is missing on this worker: start the worker where the "
                                "project folder is mounted, or pass project_dir")
    cmd = train_command(variant, manifest, out, params, gpus, device, resume)
    log.info("running %s in %s", shlex.join(cmd), cwd.resolve())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            log.info(line)
            tail = (tail + [line])[-20:]
    if proc.wait() != 0:
        raise RuntimeError(f"training {variant} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return str(cwd / out)
