"""Does the loader keep the model fed? Loader images/s beside the model's training images/s, same settings.

    python bench/bench_loader.py --manifest prepared/matrix/cache --model single_regnetx002 --image-size 64
    python bench/bench_loader.py --manifest CACHE_1024 --model chexfusion_convnext_small_stage1 \
        --image-size 1024 --batch-size 32 --workers 8 --device cuda                  # on a GPU node

Loader variants (each over the training split of the manifest's cache, class-aware order not needed here):
  cpu-augment     the DataLoader as training uses it today: workers decode the cached JPEGs (PIL), and
                  augment each image on the CPU, one at a time
  device-augment  workers only decode; the batch is augmented on the device in one call
                  (`cxrlt.data.transforms.augment_batch`)
  device-decode   workers only read the JPEG bytes; the batch is decoded on the device in one
                  `torchvision.io.decode_jpeg` call and augmented there: training's `train.gpu_decode` +
                  `gpu_augment` path (`cxrlt.data.transforms.decode_views`). Timed on CUDA; on a CPU device
                  with --device-decode
The model figure is forward + backward + AdamW step on batches already on the device (bf16 autocast and
channels_last on CUDA), i.e. what the loader must sustain. Goal (issue 8): loader >= 1.2x model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxrlt.data.dataset import CXRDataset  # noqa: E402
from cxrlt.data.manifest_io import load_manifest
from cxrlt.data.transforms import augment_batch  # noqa: E402
from cxrlt.engine.evaluation import unit_of  # noqa: E402
from cxrlt.models import create_model  # noqa: E402


def loader_rate(name, ds, args, device) -> float:
    cuda = device.type == "cuda"
    kw = dict(batch_size=args.batch_size, shuffle=True, num_workers=args.workers, pin_memory=cuda,
              drop_last=True, generator=torch.Generator().manual_seed(0))
    if args.workers:
        kw.update(persistent_workers=True, prefetch_factor=4)
    if ds.collate_fn is not None:  # device-decode: the batch's views stay undecoded bytes
        kw["collate_fn"] = ds.collate_fn
    loader = torch.utils.data.DataLoader(ds, **kw)
    gen = torch.Generator(device=device).manual_seed(0)
    n_img, t0, it = 0, None, iter(loader)
    for step in range(args.steps + args.warmup):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            t0, n_img = time.perf_counter(), 0
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        mask = batch["view_mask"].to(device, non_blocking=True)
        x = batch["images"]
        x = x.decode(device) if name == "device-decode" else x.to(device, non_blocking=True)
        if name != "cpu-augment":
            x = augment_batch(x, mask, gen)
        n_img += int(mask.sum())
    if cuda:
        torch.cuda.synchronize()
    return n_img / (time.perf_counter() - t0)


def model_rate(model, shape, args, device) -> float:
    """Training images/s of the model on device-resident batches of `shape` [B, V, 3, S, S]."""
    cuda = device.type == "cuda"
    model = model.to(device).train()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if cuda else {}))
    x = torch.randn(shape, device=device)
    mask = torch.ones(shape[:2], dtype=torch.bool, device=device)
    types = torch.zeros(shape[:2], dtype=torch.long, device=device)
    y = (torch.rand(shape[0], model.config.num_labels, device=device) < 0.1).float()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    for step in range(args.steps + args.warmup):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x, mask, types).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize()
    return args.steps * shape[0] * shape[1] / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=Path, required=True, help="a prepared cache (cxrlt prepare) or manifest")
    ap.add_argument("--model", default="single_regnetx002", help="a registered model (cxrlt models)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--device-decode", action="store_true",
                    help="also time device-decode on a CPU device (always timed on CUDA)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    m = load_manifest(a.manifest)
    frame = m.frame[m.frame["split"] == "train"]
    model = create_model(a.model, num_labels=len(m.label_space))
    unit = unit_of(model)
    views = 1 if unit == "image" else model.config.max_views
    out = {"model": a.model, "image_size": a.image_size, "batch_size": a.batch_size, "workers": a.workers,
           "device": str(device), "loader_images_per_s": {}}
    out["model_train_images_per_s"] = round(model_rate(model, (a.batch_size, views, 3, a.image_size, a.image_size),
                                                       a, device), 1)
    print(f"model {a.model} @{a.image_size}px, batch {a.batch_size}: {out['model_train_images_per_s']} training "
          f"images/s on {device}", flush=True)

    def dataset(augment=None):
        return CXRDataset(frame, m.image_root, m.label_space.names, a.image_size, views, unit, train=True,
                          augment=augment)

    variants = {"cpu-augment": dataset(), "device-augment": dataset(augment=False)}
    if device.type == "cuda" or a.device_decode:
        variants["device-decode"] = dataset(augment=False)
        variants["device-decode"].encoded = True
    for name, ds in variants.items():
        rate = loader_rate(name, ds, a, device)
        out["loader_images_per_s"][name] = round(rate, 1)
        print(f"  loader {name:15s} {rate:8.1f} images/s = {rate / out['model_train_images_per_s']:.2f}x the model "
              f"({a.workers} workers)", flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
