"""train.gpu_decode: loader workers read JPEG bytes and each batch is decoded in one call on the device.

On the CPU (torchvision's decode_jpeg runs there too) the batched-bytes path is compared with the PIL path
of `CXRDataset`, augmentation off: identical tensors for a prepared cache's JPEGs (already at the image
size), at most one 8-bit grey level apart where the source must be resized (torch vs PIL bilinear). The
CUDA test (nvJPEG) is skipped without a GPU.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cxrlt.artefact.checkpoint import load_artefact
from cxrlt.config import TrainConfig, config_from_dict
from cxrlt.data.dataset import CXRDataset
from cxrlt.data.demo.generate import generate_demo
from cxrlt.data.manifest import build_manifest
from cxrlt.data.manifest_io import load_manifest
from cxrlt.data.prepare import prepare_cache
from cxrlt.data.transforms import IMAGENET_STD, JpegViews, decode_views, first_non_jpeg, is_jpeg
from cxrlt.engine import train
from cxrlt.engine import performance as perf
from cxrlt.engine.checkpointing import _NOT_FINGERPRINTED, EpochDataset

SIZE = 32
LEVEL = 1 / (255 * min(IMAGENET_STD))  # one 8-bit grey level after normalisation (~0.0175)
CPU = torch.device("cpu")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    """(source manifest: 320 x 256 demo JPEGs, prepared cache: SIZE x SIZE JPEGs)."""
    root = tmp_path_factory.mktemp("gpu-decode")
    generate_demo(root / "demo", n_studies=40, seed=5, progress=False)
    build_manifest(root / "demo/cxr-lt-2024", root / "demo/mimic-cxr-jpg", root / "manifest", val_fraction=0.25)
    prepare_cache(root / "manifest", root / "cache", size=SIZE, workers=1, progress=False)
    return load_manifest(root / "manifest"), load_manifest(root / "cache")


def datasets(manifest, max_views=4):
    frame = manifest.frame[manifest.frame["split"] == "train"]
    args = (frame, manifest.image_root, manifest.label_space.names, SIZE, max_views)
    cpu = CXRDataset(*args, train=True, seed=1, augment=False)
    enc = CXRDataset(*args, train=True, seed=1, augment=False)
    enc.encoded = True
    return cpu, enc


def both(cpu, enc, idx, device=CPU):
    want = torch.stack([cpu[i]["images"] for i in idx])
    batch = enc.collate_fn([enc[i] for i in idx])
    return want, batch["images"].decode(device).cpu(), batch


def test_cache_jpegs_decode_to_the_cpu_paths_tensors(manifests):
    cpu, enc = datasets(manifests[1])
    idx = list(range(min(16, len(cpu))))
    want, got, batch = both(cpu, enc, idx)
    assert got.shape == want.shape == (len(idx), 4, 3, SIZE, SIZE)
    assert batch["view_mask"].sum() > len(idx)  # studies with several views are in there
    assert torch.equal(got, want)  # libjpeg-turbo both ways, no resize: the very same tensors
    for key in ("view_mask", "view_types", "target", "label_mask", "index"):
        assert torch.equal(batch[key], torch.stack([torch.as_tensor(cpu[i][key]) for i in idx])), key


def test_sources_to_resize_are_within_one_grey_level(manifests):
    cpu, enc = datasets(manifests[0])
    idx = list(range(min(24, len(cpu))))
    want, got, batch = both(cpu, enc, idx)
    diff = (got - want).abs()
    assert diff.max() <= LEVEL + 1e-5, diff.max() / LEVEL
    assert diff.mean() < 0.5 * LEVEL
    real = batch["view_mask"][:, :, None, None, None].expand_as(got)
    assert (got[~real] == 0).all()  # empty view slots stay zero


def test_single_image_items_and_a_png_among_the_jpegs(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for k, (fmt, shape) in enumerate([("JPEG", (SIZE, SIZE)), ("PNG", (40, 50)), ("JPEG", (64, 48))]):
        a = (rng.random(shape) * 200 + 20).astype(np.uint8)
        name = f"img{k}.{'jpg' if fmt == 'JPEG' else 'png'}"
        Image.fromarray(a).save(tmp_path / name, format=fmt)
        rows.append({"study_id": k, "dicom_id": f"d{k}", "path": name, "view": "frontal", "Finding": k % 2})
    frame = pd.DataFrame(rows)
    cpu = CXRDataset(frame, tmp_path, ["Finding"], SIZE, unit="image")
    enc = CXRDataset(frame, tmp_path, ["Finding"], SIZE, unit="image")
    enc.encoded = True
    assert [enc[i]["images"][0].dim() for i in range(3)] == [1, 2, 1]  # bytes, PNG pixels, bytes
    want, got, _ = both(cpu, enc, [0, 1, 2])
    assert torch.equal(got[:2], want[:2])
    assert (got[2] - want[2]).abs().max() <= LEVEL + 1e-5
    assert first_non_jpeg(tmp_path, list(frame["path"])) == "img1.png"
    assert first_non_jpeg(tmp_path, ["img0.jpg", "img2.jpg"]) is None


def test_loader_workers_send_bytes_and_the_batch_decodes_like_the_cpu_path(manifests):
    cpu, enc = datasets(manifests[1])
    loader = DataLoader(EpochDataset(enc), batch_size=6, num_workers=1, collate_fn=enc.collate_fn,
                        sampler=[(0, i) for i in range(6)])
    batch = next(iter(loader))
    assert isinstance(batch["images"], JpegViews)
    assert all(x.dtype == torch.uint8 and x.dim() == 1 for vs in batch["images"].views for x in vs)
    speed = perf.resolve(TrainConfig(augment=False, gpu_decode=True, device="cpu"), CPU)
    moved = perf.batch_to_device(batch, CPU, speed)
    assert torch.equal(moved["images"], torch.stack([cpu[i]["images"] for i in range(6)]))


def test_the_setting_resolves_and_refuses_cpu_augmentation(manifests, tmp_path):
    assert TrainConfig().gpu_decode == "auto" and "gpu_decode" in _NOT_FINGERPRINTED
    with pytest.raises(ValueError, match="train.gpu_decode"):
        TrainConfig(gpu_decode="yes")
    assert not perf.resolve(TrainConfig(), CPU).gpu_decode  # auto: off on the CPU
    cuda = torch.device("cuda")  # resolved for a CUDA device without using one (amp given)
    assert perf.resolve(TrainConfig(amp="off", gpu_augment=True), cuda).gpu_decode
    assert perf.resolve(TrainConfig(amp="off", augment=False), cuda).gpu_decode
    assert not perf.resolve(TrainConfig(amp="off"), cuda).gpu_decode  # per-image CPU augmentation: auto is off
    with pytest.raises(ValueError, match="train.gpu_augment true"):
        perf.resolve(TrainConfig(gpu_decode=True), CPU)
    assert perf.resolve(TrainConfig(gpu_decode=True, gpu_augment=True), CPU).gpu_decode
    with pytest.raises(ValueError, match="augmented per image"):
        CXRDataset(manifests[1].frame, manifests[1].image_root, manifests[1].label_space.names, SIZE,
                   train=True).encoded = True
    # a PNG cache: off, in one line
    Image.new("L", (SIZE, SIZE)).save(tmp_path / "a.png")
    frame = pd.DataFrame([{"study_id": 1, "dicom_id": "d", "path": "a.png", "view": "frontal", "Finding": 1}])
    lines = []
    speed = perf.resolve(TrainConfig(gpu_decode=True, augment=False), CPU)
    off = perf.with_decodable(speed, CXRDataset(frame, tmp_path, ["Finding"], SIZE), lines.append)
    assert speed.gpu_decode and not off.gpu_decode
    assert len(lines) == 1 and "a.png is not a JPEG" in lines[0]
    assert perf.with_decodable(speed, datasets(manifests[1])[1], lines.append) is speed and len(lines) == 1


def test_training_with_gpu_decode_on_the_cpu(manifests, tmp_path):
    cfg = config_from_dict({"data": {"image_size": SIZE, "val_fraction": 0.25},
                            "train": {"epochs": 1, "batch_size": 4, "threads": 1, "device": "cpu",
                                      "max_steps_per_epoch": 2, "gpu_decode": True, "gpu_augment": True,
                                      "num_workers": 1, "prefetch_factor": 1},
                            "variants": {"v": {"model": "chexfusion_test", "loss": "bce"}}})
    lines = []
    art = train(cfg.variant("v"), cfg.data, manifests[1], tmp_path / "v", progress=False, log=lines.append)
    meta = load_artefact(art).meta
    assert meta["runtime"]["gpu_decode"] is True and meta["runtime"]["gpu_augment"] is True
    assert meta["train"]["gpu_decode"] is True
    assert not any("not a JPEG" in s for s in lines)


@cuda_only
def test_nvjpeg_batch_is_close_to_pil(manifests):
    """nvJPEG rounds its IDCT otherwise than libjpeg-turbo: a mean under 1 grey level, none over 4."""
    for m in manifests:
        cpu, enc = datasets(m)
        idx = list(range(min(32, len(cpu))))
        want, got, _ = both(cpu, enc, idx, device=torch.device("cuda"))
        diff = (got - want).abs()
        real = diff[torch.stack([cpu[i]["view_mask"] for i in idx])]
        assert real.mean() < LEVEL and diff.max() <= 4 * LEVEL + 1e-5, (real.mean() / LEVEL, diff.max() / LEVEL)


def test_header_check_and_empty_studies():
    """The JPEG header check on bytes and tensors alike; a study without images is all zeros."""
    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, format="JPEG")
    b = buf.getvalue()
    assert is_jpeg(b) and is_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8))
    assert not is_jpeg(b"\x89PNG")
    out = decode_views([[torch.frombuffer(bytearray(b), dtype=torch.uint8)], []], 8, 2, CPU)
    assert out.shape == (2, 2, 3, 8, 8) and (out[1] == 0).all() and (out[0, 1] == 0).all()
