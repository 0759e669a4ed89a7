"""The GPU figures of issue 8 in one JSON: run by bench/gpu.sh (which also makes the data it needs).

  stage1   CheXFusion stage 1 (ConvNeXt-S, single image) training images/s and peak memory at the largest
           batch that fits (doubling until out of memory), bf16 autocast + channels_last + fused AdamW,
           without and with torch.compile
  stage2   the fusion model's training steps/s and studies/s (4 views, frozen stage-1 backbone as CheXFusion)
  loader   bench/bench_loader.py's loader images/s beside the model's
  serving  cxrlt.inference.Predictor: studies/s scoring one study per call vs batches of 32

Every section has a time budget; a section that fails records its error instead of stopping the others.
`--tiny` runs the same code with tiny models and sizes, on the CPU (how it is tested).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxrlt.models import create_model  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_rate(model, batch, views, size, device, steps, compile_=False) -> dict:
    """Images/s of forward + backward + AdamW step on device-resident batches; peak memory on CUDA."""
    cuda = device.type == "cuda"
    model = model.to(device).train()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if cuda else {}))
    run = torch.compile(model) if compile_ else model
    x = torch.randn(batch, views, 3, size, size, device=device)
    mask = torch.ones(batch, views, dtype=torch.bool, device=device)
    types = (torch.arange(views, device=device) % 2).expand(batch, -1)
    y = (torch.rand(batch, model.config.num_labels, device=device) < 0.1).float()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(run(x, mask, types).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3 if compile_ else 2):  # warm-up (compilation happens here)
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    dt = time.perf_counter() - t0
    out = {"batch": batch, "images_per_s": round(steps * batch * views / dt, 1), "steps_per_s": round(steps / dt, 2)}
    if cuda:
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def largest_batch(make_model, views, size, device, start, limit, steps, compile_=False) -> dict:
    """Double the batch until it no longer fits (or `limit`); the figures at the largest that fitted."""
    best, batch = None, start
    while batch <= limit:
        try:
            best = train_rate(make_model(), batch, views, size, device, steps, compile_)
        except torch.OutOfMemoryError:
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        batch *= 2
    if best is None:
        raise RuntimeError(f"even a batch of {start} does not fit")
    return best


def serving_rate(name, size, views, device, n=64, batch=32) -> dict:
    from PIL import Image

    from cxrlt.artefact.checkpoint import load_artefact, save_artefact
    from cxrlt.inference import Predictor
    from cxrlt.labels import LabelSpace

    import tempfile

    ls = LabelSpace.from_counts({f"L{i}": 1000 // (i + 1) for i in range(40)}, n_train=2000)
    with tempfile.TemporaryDirectory() as tmp:
        model = create_model(name, num_labels=len(ls))
        art = save_artefact(Path(tmp) / "a", model, model_name=name, label_space=ls, data={"image_size": size},
                            variant="bench", loss={"name": "asl"}, thresholds=[0.5] * len(ls))
        p = Predictor(load_artefact(art, device), "bench", device)
        img = Image.new("L", (size, size), 100)
        studies = [[img] * views for _ in range(n)]
        vs = [["frontal", "lateral", "frontal", "lateral"][:views]] * n
        p.predict(studies[:2], vs[:2])
        _sync(device)
        t0 = time.perf_counter()
        for s, v in zip(studies, vs):
            p.predict([s], [v])
        _sync(device)
        one = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            p.predict(studies[i:i + batch], vs[i:i + batch])
        _sync(device)
        many = n / (time.perf_counter() - t0)
    return {"studies_per_s_unbatched": round(one, 1), f"studies_per_s_batch{batch}": round(many, 1),
            "ratio": round(many / one, 2)}


def section(out, name, fn):
    t0 = time.perf_counter()
    try:
        out[name] = fn()
    except Exception as e:  # one failing section must not lose the others' figures
        out[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)}
    out.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
    print(json.dumps({name: out[name]}), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the JSON to write")
    ap.add_argument("--cache", type=Path, help="a prepared cache for the loader section")
    ap.add_argument("--tiny", action="store_true", help="tiny models and sizes (the CPU test of this script)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--skip-compile", action="store_true",
                    help="leave out torch.compile (its CPU compile of even a tiny model takes minutes)")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.tiny:
        s1, s2, size, start, limit, serve = "single_test", "chexfusion_test", 32, 2, 8, "chexfusion_test"
    else:
        s1, s2, size, start, limit = "chexfusion_convnext_small_stage1", "chexfusion_convnext_small", 1024, 8, 512
        serve = "chexfusion_convnext_small"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "tiny": a.tiny, "image_size": size}
    make1 = lambda: create_model(s1, num_labels=40)  # noqa: E731
    section(out, "stage1", lambda: largest_batch(make1, 1, size, device, start, limit, a.steps))
    if a.skip_compile:
        out["stage1_compiled"] = {"skipped": "--skip-compile"}
    else:
        section(out, "stage1_compiled", lambda: train_rate(make1(), out["stage1"]["batch"], 1, size, device,
                                                           a.steps, compile_=True))

    def stage2():
        model = create_model(s2, num_labels=40)
        for p in model.backbone.parameters():  # CheXFusion stage 2: the stage-1 backbone is frozen
            p.requires_grad_(False)
        return train_rate(model, max(1, start // 2), 4, size, device, a.steps)

    section(out, "stage2", stage2)
    if a.cache:
        from bench_loader import main as loader_main

        js = a.out.with_name("loader.json")
        section(out, "loader", lambda: (loader_main(["--manifest", str(a.cache), "--model", s1, "--image-size",
                                                     str(size), "--batch-size", str(out["stage1"].get("batch", 8)),
                                                     "--workers", str(a.workers), "--steps", str(a.steps),
                                                     "--json", str(js)]), json.loads(js.read_text()))[1])
    section(out, "serving", lambda: serving_rate(serve, size, 2, device))
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
