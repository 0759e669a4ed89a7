"""The speed settings of the training loop (cxrlt.engine.performance) on a tiny demo, on the CPU.

What runs here: settings parsing and resolution, gradient accumulation (the gradient of k micro-batches
is the gradient of the whole batch, for mean and sum losses, and a run with it trains like one without,
and resumes bit-exactly), activation checkpointing (same loss, gradients and BatchNorm statistics),
channels_last, torch.compile through Dynamo (eager backend: the state-dict prefixes, saving, loading),
persistent loader workers (each epoch's augmentation), and one run with every CPU setting on at once.
CUDA-only settings (fp16 + GradScaler, auto on a GPU, pinned memory) are skipped without a GPU.

Runs that are compared use models without BatchNorm or dropout (`NO_BN`: test_convnext has LayerNorm
only): BatchNorm's batch statistics depend on the micro-batch, dropout on the draw order.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, default_collate

from cxrlt.artefact.checkpoint import load_artefact
from cxrlt.config import TrainConfig, config_from_dict
from cxrlt.data.demo.generate import generate_demo
from cxrlt.data.manifest import build_manifest
from cxrlt.data.manifest_io import load_manifest
from cxrlt.engine import TRAIN_STATE, make_dataset, per_image, predict, read_history, train
from cxrlt.engine import performance as perf
from cxrlt.engine.checkpointing import EpochDataset
from cxrlt.engine.distributed import Dist, ShardedEpochSampler
from cxrlt.engine.loop import TrainForward, accumulate, summed_loss
from cxrlt.losses import create_loss
from cxrlt.models import create_model

SIZE = 32
NO_BN = {"backbone": "test_convnext", "dropout": 0.0}
BASE = {"epochs": 1, "batch_size": 8, "lr": 0.003, "threads": 1, "device": "cpu", "max_steps_per_epoch": 3}
CPU = torch.device("cpu")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-settings")
    generate_demo(root / "demo", n_studies=60, seed=3, progress=False)
    build_manifest(root / "demo/cxr-lt-2024", root / "demo/mimic-cxr-jpg", root / "manifest", val_fraction=0.2)
    return load_manifest(root / "manifest")


def variant(model="chexfusion_test", loss="bce", model_args=NO_BN, **train_settings):
    cfg = config_from_dict({"data": {"image_size": SIZE, "val_fraction": 0.2},
                            "train": {**BASE, **train_settings},
                            "variants": {"v": {"model": model, "loss": loss, "model_args": dict(model_args)}}})
    return cfg.variant("v"), cfg.data


def run(manifest, out, on_checkpoint=None, resume=False, **kw):
    v, d = variant(**kw)
    return train(v, d, manifest, out, progress=False, log=lambda s: None, resume=resume, on_checkpoint=on_checkpoint)


def val_probs(art, manifest):
    model = load_artefact(art).model  # strict: a prefixed or missing key fails here
    ds = make_dataset(manifest, "val", model, SIZE, train=False)
    return per_image(ds, predict(model, ds, progress=False), manifest.split("val"))[list(ds.label_names)].to_numpy()


def history(art):
    return read_history(art)


def batch_of(manifest, model, n, start=0):
    ds = make_dataset(manifest, "train", model, SIZE, train=True, seed=0)
    return default_collate([ds[i] for i in range(start, start + n)])


def split(batch, k):
    m = len(batch["index"]) // k
    return [{key: v[i * m:(i + 1) * m] for key, v in batch.items()} for i in range(k)]


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# --- settings -------------------------------------------------------------------------------------------

def test_settings_parse_old_amp_values_and_refuse_bad_ones():
    assert TrainConfig(amp=True).amp == "auto" and TrainConfig(amp=False).amp == "off"
    assert TrainConfig().amp == "auto" and TrainConfig(amp="bf16").amp == "bf16"
    v, _ = variant(amp=False)  # `amp: false` of an older params.yaml
    assert v.train.amp == "off"
    for bad, match in (({"amp": "fp32"}, "train.amp is 'fp32'"), ({"channels_last": "yes"}, "train.channels_last"),
                       ({"grad_accum_steps": 0}, "grad_accum_steps is 0"), ({"compile": ""}, "train.compile")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)


def test_auto_settings_resolve_off_on_the_cpu_and_fp16_is_refused():
    s = perf.resolve(TrainConfig(), CPU)
    assert (s.amp, s.channels_last, s.fused_adamw, s.cudnn_benchmark, s.pin_memory, s.compile) == (
        "off", False, False, False, False, "")
    s = perf.resolve(TrainConfig(amp="bf16", channels_last=True, fused_adamw=True, compile=True), CPU)
    assert (s.amp, s.amp_dtype, s.grad_scaler, s.channels_last, s.fused_adamw, s.compile) == (
        "bf16", torch.bfloat16, False, True, True, "inductor")
    assert not perf.resolve(TrainConfig(cudnn_benchmark=True, deterministic=True), CPU).cudnn_benchmark
    with pytest.raises(ValueError, match="train.amp is fp16, which needs a CUDA device"):
        perf.resolve(TrainConfig(amp="fp16"), CPU)
    assert perf.loader_kwargs(TrainConfig(num_workers=0), s) == {"pin_memory": False}
    assert perf.loader_kwargs(TrainConfig(num_workers=2, prefetch_factor=4), s) == {
        "pin_memory": False, "persistent_workers": True, "prefetch_factor": 4}


# --- gradient accumulation ------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["bce", "asl"])  # mean and sum reduction
def test_k_micro_batches_give_the_gradient_of_the_whole_batch(manifest, loss):
    torch.manual_seed(0)
    model = create_model("chexfusion_test", num_labels=len(manifest.label_space), **NO_BN)
    v, _ = variant(loss=loss)
    loss_fn, mean = summed_loss(v, manifest.label_space, CPU)
    assert mean == (loss == "bce")
    batch = batch_of(manifest, model, 8)
    # unknown labels in one micro-batch only: a mean of the micro-batches' means would weigh them wrongly
    batch["label_mask"][:2, :25] = False
    speed = perf.resolve(TrainConfig(), CPU)
    net = TrainForward(model)

    # the variant's own loss (its reduction) on the whole batch, as a one-batch step computes it
    model.zero_grad()
    reference = create_loss(loss, class_counts=manifest.label_space.counts, n_train=manifest.label_space.n_train)
    want = reference(model(batch["images"], batch["view_mask"], batch["view_types"]), batch["target"],
                     batch["label_mask"])
    want.backward()
    g_want = grads(model)
    for k in (1, 2, 4):
        model.zero_grad()
        got = accumulate(net, loss_fn, split(batch, k), mean, Dist(), speed, CPU)
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
        g = grads(model)
        assert g.keys() == g_want.keys()
        for name in g:
            torch.testing.assert_close(g[name], g_want[name], rtol=1e-4, atol=1e-6, msg=f"k={k} {name}")


def test_a_run_with_grad_accumulation_trains_like_one_batch(manifest, tmp_path):
    one = run(manifest, tmp_path / "one", grad_accum_steps=1)
    acc = run(manifest, tmp_path / "acc", grad_accum_steps=4)
    np.testing.assert_allclose(history(acc)["train_loss"], history(one)["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(val_probs(acc, manifest), val_probs(one, manifest), rtol=1e-4, atol=1e-5)
    runtime = load_artefact(acc).meta["runtime"]
    assert (runtime["grad_accum_steps"], runtime["micro_batch"], runtime["world_size"]) == (4, 2, 1)
    with pytest.raises(ValueError, match="must be divisible by 3"):
        run(manifest, tmp_path / "bad", grad_accum_steps=3)


def test_grad_accumulation_resumes_mid_epoch_to_identical_weights(manifest, tmp_path):
    settings = dict(grad_accum_steps=2, epochs=2, checkpoint_every_steps=1, deterministic=True)
    ref = run(manifest, tmp_path / "ref", **settings)

    class Killed(Exception):
        pass

    def die(path, state):
        if (state["epoch"], state["step"]) == (1, 2):
            raise Killed

    with pytest.raises(Killed):
        run(manifest, tmp_path / "res", on_checkpoint=die, **settings)
    assert (tmp_path / "res" / TRAIN_STATE).exists()
    res = run(manifest, tmp_path / "res", resume=True, **settings)
    assert load_artefact(res).meta["resumes"] == [{"epoch": 2, "step": 2}]
    a, b = load_file(str(ref / "weights.safetensors")), load_file(str(res / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert history(ref)[["train_loss", "val_mAP"]].equals(history(res)[["train_loss", "val_mAP"]])


# --- activation checkpointing, channels_last --------------------------------------------------------------

def test_activation_checkpointing_gives_the_same_loss_gradients_and_batchnorm_statistics(manifest):
    torch.manual_seed(0)
    plain = create_model("chexfusion_test", num_labels=len(manifest.label_space))  # BatchNorm, dropout
    ckpt = copy.deepcopy(plain)
    assert perf.enable_activation_checkpointing(ckpt) == 4 + 1 + 1  # 4 stages with weights, 1 fusion layer, head
    assert ckpt.state_dict().keys() == plain.state_dict().keys()
    calls = []
    ckpt.backbone.layer2[0].conv1.register_forward_hook(lambda *a: calls.append(1))
    batch = batch_of(manifest, plain, 6)
    loss_fn = create_loss("bce")
    out = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        model.train()
        torch.manual_seed(1)  # the same dropout draws (checkpointing replays them in the recomputation)
        loss = loss_fn(model(batch["images"], batch["view_mask"], batch["view_types"]), batch["target"])
        loss.backward()
        out[name] = (loss.detach(), grads(model), {k: v.clone() for k, v in model.state_dict().items()})
    assert len(calls) == 2  # forward, and again in backward: its activations were not kept
    torch.testing.assert_close(out["ckpt"][0], out["plain"][0], rtol=0, atol=0)
    for n, g in out["plain"][1].items():
        torch.testing.assert_close(out["ckpt"][1][n], g, rtol=1e-5, atol=1e-7, msg=n)
    for n, t in out["plain"][2].items():  # running statistics updated once, not twice
        torch.testing.assert_close(out["ckpt"][2][n], t, rtol=0, atol=0, msg=n)


def test_channels_last_model_and_batches_compute_the_same(manifest):
    torch.manual_seed(0)
    plain = create_model("chexfusion_test", num_labels=len(manifest.label_space), **NO_BN).train()
    nhwc = perf.prepare_model(copy.deepcopy(plain), perf.resolve(TrainConfig(channels_last=True), CPU))
    convs = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    batch = batch_of(manifest, plain, 4)
    images = perf.channels_last_images(batch["images"])
    assert torch.equal(images, batch["images"])
    b, v, c, h, w = images.shape
    assert images.reshape(b * v, c, h, w).is_contiguous(memory_format=torch.channels_last)
    loss_fn = create_loss("bce")
    res = {}
    for name, model, x in (("plain", plain, batch["images"]), ("nhwc", nhwc, images)):
        loss = loss_fn(model(x, batch["view_mask"], batch["view_types"]), batch["target"])
        loss.backward()
        res[name] = (loss.detach(), grads(model))
    torch.testing.assert_close(res["nhwc"][0], res["plain"][0], rtol=1e-5, atol=1e-6)
    for n, g in res["plain"][1].items():
        torch.testing.assert_close(res["nhwc"][1][n], g.contiguous(), rtol=1e-4, atol=1e-6, msg=n)


# --- torch.compile ------------------------------------------------------------------------------------------

def test_compiled_runs_save_and_load_plain_state_dicts(manifest, tmp_path):
    """Dynamo captures the model (eager backend: no code generation, seconds on a CPU); checkpoints and
    the artefact hold the plain module's keys, and a resume goes on from them."""
    keys = []
    plain = run(manifest, tmp_path / "plain")
    compiled = run(manifest, tmp_path / "compiled", compile="eager", checkpoint_every_steps=1,
                   on_checkpoint=lambda p, s: keys.extend(s["model"]))
    assert keys and not any(k.startswith(("_orig_mod.", "module.")) for k in keys)
    assert load_artefact(compiled).meta["runtime"]["compile"] == "eager"
    np.testing.assert_allclose(history(compiled)["train_loss"], history(plain)["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(val_probs(compiled, manifest), val_probs(plain, manifest), rtol=1e-4, atol=1e-5)
    # a state dict of a compiled (or DDP) module, prefixes and all, loads into the plain model
    model = load_artefact(compiled).model
    wrapped = torch.compile(TrainForward(model), backend="eager").state_dict()
    assert all(k.startswith("_orig_mod.model.") for k in wrapped)
    plain_keys = perf.plain_state_dict({k.replace("_orig_mod.model.", "module._orig_mod."): v
                                        for k, v in wrapped.items()})
    model.load_state_dict(plain_keys, strict=True)


@cuda_only
def test_inductor_compile_on_cuda(manifest, tmp_path):
    # not on the CPU: inductor's C++ code generation took ~260 s for the first step on a 2-core machine
    art = run(manifest, tmp_path / "inductor", device="cuda", compile=True)
    assert load_artefact(art).meta["runtime"]["compile"] == "inductor"
    assert np.isfinite(history(art)["train_loss"]).all()


# --- loader -------------------------------------------------------------------------------------------------

def test_persistent_workers_see_each_epochs_augmentation(manifest):
    """Workers that live through several epochs still augment item i of epoch e as epoch e's draw."""
    model = create_model("single_test", num_labels=len(manifest.label_space))
    ds = make_dataset(manifest, "train", model, SIZE, train=True, seed=0)
    ref = make_dataset(manifest, "train", model, SIZE, train=True, seed=0)
    for kw in ({"num_workers": 0}, {"num_workers": 1, "persistent_workers": True}):
        sampler = ShardedEpochSampler(len(ds), 0, None, batch_size=8)
        loader = DataLoader(EpochDataset(ds), batch_size=8, sampler=sampler, **kw)
        for epoch in range(2):
            sampler.set_epoch(epoch)
            got = next(iter(loader))
            ref.set_epoch(epoch)
            want = torch.stack([ref[i]["images"] for i in got["index"].tolist()])
            assert torch.equal(got["images"], want), (kw, epoch)
    ref.set_epoch(0)
    first = ref[0]["images"]
    ref.set_epoch(1)
    assert not torch.equal(first, ref[0]["images"])  # epochs do draw differently


# --- everything at once -------------------------------------------------------------------------------------

def test_every_cpu_setting_at_once(manifest, tmp_path):
    art = run(manifest, tmp_path / "all", model="chexfusion_test", model_args={}, loss="asl", amp="bf16",
              channels_last=True, fused_adamw=True, activation_checkpointing=True, grad_accum_steps=2,
              gpu_augment=True, num_workers=1, prefetch_factor=1, compile="eager", epochs=2)
    meta = load_artefact(art).meta
    assert {k: meta["runtime"][k] for k in ("amp", "channels_last", "fused_adamw", "activation_checkpointing",
                                            "grad_accum_steps", "gpu_augment", "compile", "micro_batch")} == {
        "amp": "bf16", "channels_last": True, "fused_adamw": True, "activation_checkpointing": True,
        "grad_accum_steps": 2, "gpu_augment": True, "compile": "eager", "micro_batch": 4}
    assert meta["train"]["amp"] == "bf16" and meta["train"]["grad_accum_steps"] == 2
    h = history(art)
    assert len(h) == 2 and np.isfinite(h["train_loss"]).all()
    assert np.isfinite(val_probs(art, manifest)).all()


# --- CUDA only ----------------------------------------------------------------------------------------------

@cuda_only
def test_auto_settings_on_a_gpu(manifest, tmp_path):
    art = run(manifest, tmp_path / "gpu", device="cuda", model_args={})
    rt = load_artefact(art).meta["runtime"]
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    assert rt["amp"] == ("bf16" if bf16 else "fp16")
    assert rt["channels_last"] and rt["fused_adamw"] and rt["cudnn_benchmark"] and rt["pin_memory"]
    assert np.isfinite(history(art)["train_loss"]).all()


@cuda_only
def test_fp16_with_grad_scaler_on_a_gpu(manifest, tmp_path):
    art = run(manifest, tmp_path / "fp16", device="cuda", amp="fp16", grad_accum_steps=2)
    assert load_artefact(art).meta["runtime"]["amp"] == "fp16"
    assert np.isfinite(history(art)["train_loss"]).all()
    assert np.isfinite(val_probs(art, manifest)).all()
