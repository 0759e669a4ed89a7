"""Benchmark: what a heatmap costs. One study scored (`Predictor.predict`) vs. scored and explained
(`Predictor.explain`, Grad-CAM: one forward and backward pass per finding), timed in one run, so the ratio
holds on a noisy machine. A randomly initialised model of the given variant, saved as an artefact in a
temporary folder (nothing downloaded).

    python bench/bench_explain.py [--model chexfusion_regnetx002] [--size 128] [--images 2] [--findings 1 5]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from PIL import Image

from cxrlt.artefact.checkpoint import save_artefact
from cxrlt.inference import Predictor
from cxrlt.labels import LabelSpace
from cxrlt.models import create_model

from bench_forward import timeit  # the bench folder's own timer (run as a script, bench/ is on the path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="chexfusion_regnetx002")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--findings", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    labels = LabelSpace.from_counts({f"Label {i}": 100 - i for i in range(8)}, n_train=1000, synthetic=True)
    torch.manual_seed(0)
    model = create_model(a.model, num_labels=len(labels))
    images = a.images
    rng = np.random.default_rng(0)
    study = [Image.fromarray(rng.integers(0, 255, (a.size, a.size), dtype=np.uint8), mode="L") for _ in range(images)]
    views = ["frontal", "lateral", "unknown", "unknown"][:images]
    with tempfile.TemporaryDirectory() as tmp:
        p = Predictor.from_path(save_artefact(tmp, model, model_name=a.model, label_space=labels,
                                              data={"image_size": a.size}, synthetic=True), device=a.device)
        base = timeit(lambda: p.predict([study], [views]), a.repeat)
        print(f"{a.model} at {a.size} px, {images} image(s), {a.device}")
        print(f"  predict:                 {1000 * base:8.1f} ms")
        for n in a.findings:
            names = list(p.label_names[:n])
            t = timeit(lambda: (p.predict([study], [views]), p.explain(study, views, names)), a.repeat)
            print(f"  predict + explain x{n}:   {1000 * t:8.1f} ms   ({t / base:.1f}x predict)")


if __name__ == "__main__":
    main()
