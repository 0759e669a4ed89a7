"""Create the GPU work pool and the `train-variant/<name>` deployment that `train-eval` sends its training to.

Run once, on any machine that reaches the Prefect server (PREFECT_API_URL):

    python -m pipelines.deploy_gpu --pool gpu --project-dir /shared/cxrlt --gpus 4

then start a worker on the GPU host, in the project's environment:

    prefect worker start --pool gpu            # a process worker: runs each flow run as a subprocess

and run the flow with its training sent to that pool:

    prefect deployment run 'train-eval/demo' -p train_on=train-variant/gpu -p gpus=4

The pool is a `process` pool: the worker runs the flow in the environment it was started from (the
project's virtual environment with CUDA torch), in `--project-dir` (the project folder as the GPU host
sees it; shared with the orchestrating machine). Job variables carry the device settings: `env` (e.g.
CUDA_VISIBLE_DEVICES, NCCL_* for the interconnect), overridable per run with `train_job_variables`.
"""

from __future__ import annotations

import argparse
import asyncio
import json


async def ensure_pool(name: str, pool_type: str = "process") -> bool:
    """Create the work pool `name` unless it exists; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            await client.read_work_pool(name)
            return False
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=name, type=pool_type,
                                                         description="GPU host(s) for cxrlt training"))
            return True


def deploy(pool: str, project_dir: str, name: str = "gpu", gpus: int = 1, device: str = "cuda",
           env: dict | None = None) -> str:
    """The `train-variant/<name>` deployment on `pool`, running from `project_dir`; returns its full name."""
    from pipelines.train_variant import train_variant

    created = asyncio.run(ensure_pool(pool))
    print(f"work pool {pool!r} {'created' if created else 'exists'}")
    flow = train_variant.from_source(source=project_dir, entrypoint="pipelines/train_variant.py:train_variant")
    flow.deploy(name=name, work_pool_name=pool, build=False, push=False, print_next_steps=False,
                parameters={"project_dir": project_dir, "gpus": gpus, "device": device},
                job_variables={"working_dir": project_dir, "env": dict(env or {})},
                description=f"Train one cxrlt variant on {gpus} GPU(s) of a worker in pool {pool}")
    return f"train-variant/{name}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--pool", default="gpu", help="work pool name (created as a process pool if missing)")
    ap.add_argument("--project-dir", required=True,
                    help="the project folder as the GPU host sees it (shared with this machine)")
    ap.add_argument("--name", default="gpu", help="deployment name: train-variant/<name> (default: gpu)")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs per training run on the worker (default: 1)")
    ap.add_argument("--device", default="cuda", help="train.device on the worker: cuda, cpu or auto")
    ap.add_argument("--env", default="{}", help='job environment as JSON, e.g. \'{"NCCL_DEBUG": "WARN"}\'')
    a = ap.parse_args(argv)
    try:
        env = json.loads(a.env)
    except ValueError as e:
        ap.error(f"--env is not JSON ({e})")
    print(f"deployment {deploy(a.pool, a.project_dir, a.name, a.gpus, a.device, env)} ready; start a worker with "
          f"`prefect worker start --pool {a.pool}` on the GPU host")


if __name__ == "__main__":
    main()
