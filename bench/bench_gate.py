"""Benchmark the input gate of one model: false rejections of genuine radiographs and refusals of inputs
that are not chest radiographs, with every check run (rules and OOD) so each refusal is attributed.

    python bench/bench_gate.py ARTEFACT --manifest MANIFEST [--calibrate-on CACHE] [--frr 0.01] [--input matched]

ARTEFACT: an evaluated artefact folder; MANIFEST: a manifest whose `test` split holds the genuine images
(the original-size demo images: prepared/matrix/manifest). A model without a stored gate, or any model with
--calibrate-on, is calibrated first into a temporary copy (the artefact itself is never written), on that
manifest (the one it was trained on, e.g. prepared/matrix/cache). Prints one table row per input kind:
how many, the share refused, and by which checks. `--input model` or `--input matched` calibrates one of the
gate's two parts alone (`matched` is the gate of earlier versions: a histogram-matched copy of each image, a
backbone pass of its own), for comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from cxrlt.data.manifest_io import load_manifest
from cxrlt.gate import calibrate_artefact, load_gate
from cxrlt.gate.measure import measure
from cxrlt.inference import Predictor


def row(name: str, r: dict) -> str:
    codes = ", ".join(f"{k} {v}" for k, v in sorted(r["first_codes"].items(), key=lambda kv: -kv[1]))
    return (f"| {name:<20} | {r['n']:>5} | {r['refused']:>7.1%} | {r['by_rules']:>7.1%} | {r['by_ood']:>7.1%} | "
            f"{codes} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artefact")
    ap.add_argument("--manifest", required=True, help="manifest whose test split is measured")
    ap.add_argument("--calibrate-on", help="manifest to (re)calibrate the gate on, in a temporary copy")
    ap.add_argument("--frr", type=float, default=0.01, help="target false-rejection rate when calibrating")
    ap.add_argument("--input", choices=["model+matched", "model", "matched"], default="model+matched",
                    help="the images the gate's features come from when calibrating (default: the model's input, "
                         "then its histogram-matched copy for the images over the first threshold)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=100, help="synthetic images per non-chest category")
    ap.add_argument("--n-preserving", type=int, default=200, help="test images re-exported per transform")
    ap.add_argument("--min-side", type=int, default=64)
    ap.add_argument("--json", help="also write the numbers here")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(a.artefact)
        if a.calibrate_on or load_gate(path) is None:
            path = Path(shutil.copytree(path, Path(tmp) / path.name))
            calibrate_artefact(path, load_manifest(a.calibrate_on or a.manifest), frr=a.frr, log=print,
                               input=a.input)
        p = Predictor.from_path(path)
        g = p.ood_gate
        then = (f"; over it, the {g.fallback.input} gate decides: threshold {g.fallback.threshold:.2f}"
                if g.fallback is not None else "")
        print(f"model {Path(a.artefact).name} ({p.artefact.meta['model']}, {p.image_size} px); gate ({g.input} input): "
              f"threshold {g.threshold:.2f}, target FRR {g.frr:.2%}, {g.n_train} train / {g.n_val} val images{then}")
        res = measure(p, load_manifest(a.manifest), a.split, a.n_preserving, a.n, min_side=a.min_side)
    print("\n| input | n | refused | by rules | by OOD | first refusal codes |\n|---|---|---|---|---|---|")
    print(row(f"genuine ({a.split})", res["genuine"]))
    for name, r in res["preserving"].items():
        print(row(f"  re-exported {name}", r))
    print(row("  inverted (negative)", res["inverted"]))
    for name, r in res["categories"].items():
        print(row(name, r))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
