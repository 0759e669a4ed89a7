"""Benchmark: does the data and evaluation path scale linearly up to the full CXR-LT 2024 size?

A synthetic release of the full size (258,871 training images, 39,293 development, 78,946 test; label
files only, no pixels) is planned with the demo's study/patient structure and long-tailed labels
(`cxrlt.data.demo.plan.plan_demo`, re-split to exact split sizes). At 1x, 2x and 4x of a base size (the full size
times --base-fraction, 1/4 by default, so 4x is the full release) it times, with peak memory:

  manifest   build_manifest on the written label CSVs (read, validate, split, write, load back; no images)
  split      the patient splits of cxrlt.data.splits (linked patients, test, val, overlap check) on a
             copy of the manifest frame (the copy untimed; its memory counts)
  sampler    class_aware_sampler_weights + one epoch of EpochSampler's class-aware draws
  metrics    compute_metrics on (test size) x 40 predictions
  bootstrap  bootstrap_ci with 200 patient resamples on the same predictions
  drift      read_log + drift_report on 50,000 logged studies at 4x (scaled down below) against the
             validation studies' predictions

Each cost runs in a forked child process: wall and CPU time are the best of up to 5 runs (fewer when a
run is slow); memory is that child's peak resident set growth, ru_maxrss after minus before (Linux
starts a child's peak at its size at fork, so earlier costs and the inputs the parent holds are not
counted; native allocations such as torch's are; the parent's freed heap is trimmed first). A cost whose
CPU time grows faster than linearly, cpu(4x)/cpu(1x) > 4.5, fails the run (CPU time, because on a shared
machine the wall time also measures the neighbours; both are printed).

    python bench/bench_scale.py [--base-fraction 0.25] [--only split,metrics] [--json OUT] [--keep DIR]

The full run (0.25) takes about 3-4 minutes on 2 cores; --base-fraction 0.02 about a minute.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlt.evaluation.bootstrap import bootstrap_ci
from cxrlt.data.demo.generate import IMAGE_COLUMNS
from cxrlt.data.demo.plan import plan_demo
from cxrlt.data.manifest import build_manifest
from cxrlt.data.splits import merge_linked_patients, overlap_notes, split_test, split_validation
from cxrlt.labels import TASK1_LABELS
from cxrlt.losses import class_aware_sampler_weights
from cxrlt.evaluation.metrics import compute_metrics
from cxrlt.monitoring.drift import drift_report
from cxrlt.monitoring.log import prediction_record, read_log

FULL = {"train": 258_871, "dev": 39_293, "test": 78_946}      # CXR-LT 2024 images per split
FULL_LOG = 50_000                                            # logged studies for the drift report at 4x
FILES = {"train": "train_labeled.csv", "dev": "development_labeled_task1.csv", "test": "test_labeled_task1.csv"}
SCALES = (1, 2, 4)
LIMIT = 4.5                                                  # time(4x) / time(1x): no worse than linear
N_BOOT = 200
COSTS = ("manifest", "split", "sampler", "metrics", "bootstrap", "drift")


# ---------------------------------------------------------------- inputs

def plan_images(total: int, seed: int = 0) -> pd.DataFrame:
    """A demo plan with at least `total` images (plus slack for the patients cut at split boundaries)."""
    n_studies = max(20, math.ceil(total / 1.6) + 200)        # the demo has ~1.66 images per study
    while True:
        plan = plan_demo(n_studies, seed)
        if len(plan) >= total + 200:
            return plan
        n_studies = math.ceil(n_studies * 1.05)


def take_splits(plan: pd.DataFrame, sizes: dict, seed: int = 0) -> pd.DataFrame:
    """Rows of `plan` re-split by patient to exactly `sizes` images per split: patients are taken in a
    random order; the one crossing a split's size gives its first images and loses the rest, so no
    patient is in two splits."""
    patients = plan["subject_id"].unique()
    order = np.random.default_rng(seed).permutation(len(patients))
    rank = pd.Series(np.arange(len(patients)), index=patients[order])
    rows = plan.assign(_rank=plan["subject_id"].map(rank).to_numpy()).sort_values("_rank", kind="stable")
    rows = rows.reset_index(drop=True)
    first = rows["_rank"].ne(rows["_rank"].shift()).to_numpy()      # first row of each patient
    parts, start = [], 0
    for split, n in sizes.items():
        if start + n > len(rows):
            raise RuntimeError("the plan holds too few images for these split sizes")
        part = rows.iloc[start:start + n].copy()
        part["split"] = split
        parts.append(part)
        nxt = np.flatnonzero(first[start + n:])
        start = start + n + (int(nxt[0]) if len(nxt) else len(rows))
    return pd.concat(parts, ignore_index=True).drop(columns="_rank")


def write_release(frame: pd.DataFrame, labels_dir: Path) -> None:
    """The three CXR-LT 2024 Task 1 label files, as the release lays them out."""
    labels_dir.mkdir(parents=True, exist_ok=True)
    cols = list(IMAGE_COLUMNS) + list(TASK1_LABELS)
    for split, name in FILES.items():
        part = frame.loc[frame["split"] == split, cols]
        part.to_csv(labels_dir / name, index=False)


def predictions(y: np.ndarray, seed: int) -> np.ndarray:
    """Scores that rank positives higher, with ties as six-decimal CSV scores have them."""
    rng = np.random.default_rng(seed)
    logit = 2.0 * (y > 0) - 1.5 + rng.normal(0, 1.2, y.shape)
    return np.round(1 / (1 + np.exp(-logit)), 6)


def write_log(path: Path, n: int, seed: int) -> None:
    """`n` prediction-log lines in the service's record format (`prediction_record`), written in one go."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(TASK1_LABELS))) < 0.1).astype(np.int8)
    probs = predictions(y, seed + 1)
    lines = []
    for i in range(n):
        k = 1 + int(rng.integers(0, 3))
        stats = [{"width": 2544.0, "height": 3056.0, "mean_intensity": float(rng.normal(120, 10)),
                  "std_intensity": float(rng.normal(60, 5))} for _ in range(k)]
        rec = prediction_record(model_tag="cxrlt:bench", probabilities=dict(zip(TASK1_LABELS, probs[i].tolist())),
                                views=["frontal"] + ["lateral"] * (k - 1), image_stats=stats)
        lines.append(json.dumps(rec, separators=(",", ":")))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def reference(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(TASK1_LABELS))) < 0.1).astype(np.int8)
    return pd.DataFrame(predictions(y, seed + 1), columns=[f"p_{c}" for c in TASK1_LABELS])


# ---------------------------------------------------------------- measuring

def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):    # not glibc: nothing to trim
        pass


def measure(fn, max_repeat: int = 5, slow_s: float = 3.0, setup=None) -> dict:
    """Time and peak memory of `fn()` in a forked child (see the module docstring); with `setup`,
    `fn(setup())`, the setup untimed (its memory counts, as the input of fn)."""
    gc.collect()
    _trim()                              # freed heap goes back to the OS, so the child's growth is its own
    gc.freeze()                          # the parent's objects stay put: the child's collector copies no pages
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                         # child
        os.close(r)
        try:
            base = _maxrss_bytes()
            times, cpu = [], []
            while len(times) < max_repeat:
                args = () if setup is None else (setup(),)
                t, c = time.perf_counter(), time.process_time()
                fn(*args)
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
                if sum(times) > slow_s:
                    break
            out = {"seconds": min(times), "cpu_seconds": min(cpu), "runs": len(times),
                   "peak_mib": (_maxrss_bytes() - base) / 2**20}
        except BaseException:            # noqa: BLE001 - reported by the parent
            out = {"error": traceback.format_exc()}
        with os.fdopen(w, "w") as f:
            f.write(json.dumps(out))
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    gc.unfreeze()
    out = json.loads(data) if data else {"error": "the child process died (out of memory?)"}
    if "error" in out:
        raise RuntimeError(f"measurement failed in the child:\n{out['error']}")
    return out


# ---------------------------------------------------------------- the costs

def costs_at(scale: float, plan: pd.DataFrame, work: Path, base_fraction: float, log_full: int,
             only=COSTS) -> tuple[dict, dict]:
    """Inputs of one scale, then each cost measured on them; returns (sizes, results)."""
    f = base_fraction * scale
    sizes = {s: max(20, round(n * f)) for s, n in FULL.items()}
    n_log = max(20, round(log_full * scale / max(SCALES)))
    d = work / f"x{scale:g}"
    frame = take_splits(plan, sizes, seed=0)
    write_release(frame, d / "labels")
    if "drift" in only:
        write_log(d / "predictions.jsonl", n_log, seed=int(scale))
    out_dir = d / "manifest"
    res = {}

    if "manifest" in only:
        res["manifest"] = measure(lambda: build_manifest(d / "labels", d / "images", out_dir, task="task1",
                                                         check_images=False))
    m = build_manifest(d / "labels", d / "images", out_dir, task="task1", check_images=False)
    names = list(m.label_space.names)
    unsplit = m.frame.assign(split=m.frame["split"].replace({"val": "train"}))

    def split(fr):
        merge_linked_patients(fr)
        split_test(fr, 0.2, 0)
        split_validation(fr, 0.1, 0)
        overlap_notes(fr)

    if "split" in only:
        res["split"] = measure(split, setup=unsplit.copy)

    train = m.split("train")
    y_train = train[names].to_numpy()

    def sampler():
        import torch

        from cxrlt.engine.checkpointing import EpochSampler

        w = class_aware_sampler_weights(y_train.clip(min=0))      # as the training loop calls it
        s = EpochSampler(len(w), seed=0, weights=torch.as_tensor(w, dtype=torch.float64))
        s.set_epoch(1)
        order = list(iter(s))
        assert len(order) == len(w)

    if "sampler" in only:
        res["sampler"] = measure(sampler)

    test = m.split("test")
    y = test[names].to_numpy()
    p = predictions(y, seed=3)
    patients = test["subject_id"].to_numpy()
    if "metrics" in only:
        res["metrics"] = measure(lambda: compute_metrics(p, y, m.label_space))
    if "bootstrap" in only:
        res["bootstrap"] = measure(lambda: bootstrap_ci(p, y, m.label_space, patients, n_boot=N_BOOT, seed=0),
                                   max_repeat=2)

    n_ref = int(m.split("val")["study_id"].nunique())
    ref = reference(max(20, round(n_ref)), seed=7)
    if "drift" in only:
        res["drift"] = measure(lambda: drift_report(read_log(d / "predictions.jsonl"), ref, d / "drift",
                                                    model_tag="cxrlt:bench"), max_repeat=2)
    shape = {"images": {s: int((m.frame["split"] == s).sum()) for s in ("train", "val", "dev", "test")},
             "patients": int(m.frame["subject_id"].nunique()), "studies": int(m.frame["study_id"].nunique()),
             "eval": [int(p.shape[0]), int(p.shape[1])], "n_boot": N_BOOT, "log": n_log, "reference": len(ref)}
    return shape, res


def table(name: str, per_scale: dict) -> tuple[str, float]:
    """One cost's figures; the limit applies to CPU time (this process's own work, whatever else runs on the
    machine), wall time is shown beside it."""
    wall = [per_scale[s]["seconds"] for s in SCALES]
    cpu = [per_scale[s]["cpu_seconds"] for s in SCALES]
    mem = [per_scale[s]["peak_mib"] for s in SCALES]

    def ratio(v):
        return v[-1] / v[0] if v[0] > 0 else float("inf")

    mark = "ok" if ratio(cpu) <= LIMIT else "SUPER-LINEAR"
    lines = [f"{name}",
             "  scale           " + "".join(f"{f'{s}x':>10}" for s in SCALES) + "    4x/1x",
             "  wall time (s)   " + "".join(f"{v:>10.3f}" for v in wall) + f"{ratio(wall):>9.2f}",
             "  CPU time (s)    " + "".join(f"{v:>10.3f}" for v in cpu) + f"{ratio(cpu):>9.2f}  {mark}",
             "  peak mem (MiB)  " + "".join(f"{v:>10.1f}" for v in mem) + f"{ratio(mem):>9.2f}"]
    return "\n".join(lines), ratio(cpu)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-fraction", type=float, default=0.25,
                    help="base size (1x) as a fraction of the full CXR-LT 2024 size; 0.25 makes 4x the full size")
    ap.add_argument("--json", type=Path, help="also write the figures here as JSON")
    ap.add_argument("--only", default=",".join(COSTS), help=f"comma-separated costs to measure, of {','.join(COSTS)}")
    ap.add_argument("--keep", type=Path, help="write the synthetic files here and keep them (default: a temp dir)")
    a = ap.parse_args(argv)
    if not 0 < a.base_fraction <= 1:
        ap.error("--base-fraction must be in (0, 1]")
    only = tuple(c for c in COSTS if c in a.only.split(","))
    if not only or set(a.only.split(",")) - set(COSTS):
        ap.error(f"--only takes costs of {COSTS}")
    t_all = time.perf_counter()
    import evidently.presets  # noqa: F401 - imported once here, so no child times the import
    import torch  # noqa: F401

    from cxrlt.engine.checkpointing import EpochSampler  # noqa: F401

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="cxrlt-bench-scale-"))
    try:
        top = {s: max(20, round(n * a.base_fraction * max(SCALES))) for s, n in FULL.items()}
        plan = plan_images(sum(top.values()))
        print(f"full size {FULL} images; base (1x) = {a.base_fraction:g} of it; plan of {len(plan)} images "
              f"({time.perf_counter() - t_all:.0f} s)", flush=True)
        log_full = round(FULL_LOG * a.base_fraction * max(SCALES))
        shapes, results = {}, {}
        for s in SCALES:
            t = time.perf_counter()
            shapes[s], res = costs_at(s, plan, work, a.base_fraction, log_full, only)
            for name, r in res.items():
                results.setdefault(name, {})[s] = r
            print(f"{s}x: {shapes[s]} ({time.perf_counter() - t:.0f} s)", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    ratios = {}
    for name, per in results.items():
        text, ratios[name] = table(name, per)
        print(text)
    total = time.perf_counter() - t_all
    print(f"\nwhole run {total:.0f} s; memory = peak RSS growth (ru_maxrss delta) of a forked child per cost")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({
            "base_fraction": a.base_fraction, "scales": list(SCALES), "limit": LIMIT, "seconds_total": total,
            "memory": "ru_maxrss growth of a forked child (peak RSS, native allocations included)",
            "inputs": {str(s): v for s, v in shapes.items()},
            "costs": {n: {"by_scale": {str(s): v for s, v in per.items()}, "cpu_time_ratio": ratios[n],
                          "wall_time_ratio": per[SCALES[-1]]["seconds"] / per[SCALES[0]]["seconds"],
                          "linear": ratios[n] <= LIMIT} for n, per in results.items()}}, indent=2) + "\n")
    bad = [n for n, r in ratios.items() if r > LIMIT]
    if bad:
        print(f"super-linear: {bad}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
