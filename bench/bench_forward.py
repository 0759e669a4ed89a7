"""Benchmark: two ways of doing the same work, timed in one run (ratios hold on a noisy machine).

1. Fusion forward over padded studies: only the real images through the backbone (what CheXFusion
   does here) vs. every slot, empty ones included (the naive padded batch).
2. Scoring N studies: one batched forward vs. one forward per study (why the service batches).

    python bench/bench_forward.py [--model chexfusion_regnetx002] [--size 96] [--studies 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from cxrlt.models import create_model


def timeit(fn, repeat: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="chexfusion_regnetx002")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--studies", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    m = create_model(a.model).to(dev).eval()
    v = m.config.max_views
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.studies, v, 3, a.size, a.size, generator=g).to(dev)
    # real CXR-LT: 1 image 45%, 2 images 46%, 3 images 9% of studies -> most slots are empty
    n_img = torch.multinomial(torch.tensor([0.45, 0.46, 0.08, 0.01]), a.studies, replacement=True, generator=g) + 1
    mask = (torch.arange(v)[None] < n_img[:, None]).to(dev)
    types = torch.zeros(a.studies, v, dtype=torch.long, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def masked():
        with torch.inference_mode():
            m(x, mask, types); sync()

    def all_slots():  # same network, but empty slots also run through the backbone
        with torch.inference_mode():
            m.backbone.forward_features(x.flatten(0, 1)); sync()

    def batched():
        with torch.inference_mode():
            m(x, mask, types); sync()

    def one_by_one():
        with torch.inference_mode():
            for i in range(a.studies):
                m(x[i:i + 1], mask[i:i + 1], types[i:i + 1])
            sync()

    print(f"{a.model} at {a.size}px on {dev}, {a.studies} studies, {int(mask.sum())} real images in {a.studies * v} slots")
    t_m, t_a = timeit(masked, a.repeat), timeit(all_slots, a.repeat)
    print(f"  forward, real images only : {t_m * 1e3:8.1f} ms")
    print(f"  backbone over every slot  : {t_a * 1e3:8.1f} ms   ({t_a / t_m:.2f}x the masked forward)")
    t_b, t_1 = timeit(batched, a.repeat), timeit(one_by_one, a.repeat)
    print(f"  {a.studies} studies, one batch    : {t_b * 1e3:8.1f} ms  ({a.studies / t_b:.1f} studies/s)")
    print(f"  {a.studies} studies, one at a time: {t_1 * 1e3:8.1f} ms  ({a.studies / t_1:.1f} studies/s, "
          f"batching is {t_1 / t_b:.2f}x faster)")


if __name__ == "__main__":
    main()
