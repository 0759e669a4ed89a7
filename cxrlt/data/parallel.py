"""Work over many images in worker processes: the demo's drawing, the image cache and the validation images'
statistics all run a module-level function over chunks of files with one progress bar."""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path


def default_workers() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n, 16))


def run_chunked(fn, jobs: list, root: Path, arg, workers: int, progress: bool, desc: str) -> list:
    """Results of `fn(chunk, str(root), arg)` over chunks of `jobs`, in worker processes when worth it.

    `fn` must be a module-level function (it is pickled).
    """
    from tqdm.auto import tqdm

    chunks = [jobs[i:i + 32] for i in range(0, len(jobs), 32)]
    results = []
    # a bar only on a terminal (tqdm's disable=None): piped into Prefect's or DVC's logs it would flood them
    with tqdm(total=len(jobs), desc=desc, unit="img", disable=None if progress else True) as bar:
        if workers <= 1 or len(jobs) < 128:      # a pool costs more than it saves on tiny sets
            for c in chunks:
                results.append(fn(c, str(root), arg))
                bar.update(len(c))
            return results
        # spawn, not fork: callers may hold torch threads, and forking those can deadlock
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            futures = {ex.submit(fn, c, str(root), arg): len(c) for c in chunks}
            for fut in as_completed(futures):
                results.append(fut.result())
                bar.update(futures[fut])
    return results
