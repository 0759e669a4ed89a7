"""Properties that fail when the code is wrong, not only when it crashes.

Each test states one thing the project promises and checks it with numbers that a plausible bug would
change: zero-shot labels are invisible to training, a text head scores each label on its own, thresholds
come from validation only, a study's label is the maximum over its images, a single-view model averages
its study's images, promotion compares models validated on the same data, and the positional encoding
is the 2-D sin/cos formula applied in token order.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrlt.artefact.checkpoint import load_artefact, save_artefact
from cxrlt.config import DataConfig, EvalConfig, TrainConfig, VariantConfig
from cxrlt.data.dataset import CXRDataset, build_items
from cxrlt.data.transforms import image_to_tensor
from cxrlt.data.manifest_io import MANIFEST_COLUMNS, load_manifest
from cxrlt.labels import LabelSpace
from cxrlt.losses import create_loss, list_losses
from cxrlt.evaluation.metrics import compute_metrics, tune_thresholds
from cxrlt.models import create_model
from cxrlt.models.fusion import ViewTokenizer, sincos_2d

NAMES = ("A", "B", "Z", "C")          # Z is held out for zero-shot (not last: indices must not be assumed)
ZS = ("Z",)
SIZE = 32


# --------------------------------------------------------------------------------------------- helpers

def _image(seed: int, size: int = SIZE) -> Image.Image:
    """A grayscale image whose content varies with the seed (bright blobs at seed-dependent places)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    a = 60 + rng.normal(0, 25, (size, size))
    for _ in range(3):
        cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(3, 9))]
        a += 150 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L")


def _frame_with_images(root, rows: list[dict]) -> pd.DataFrame:
    """Write an image for each row (path files/<dicom_id>.png) and return the frame."""
    (root / "files").mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(rows):
        r.setdefault("path", f"files/{r['dicom_id']}.png")
        _image(1000 + i).save(root / r["path"])
    return pd.DataFrame(rows)


def _write_manifest(root) -> None:
    """A hand-made manifest (the layout `load_manifest` reads) with train/val/test splits, studies of one
    to three images whose labels are per study, and the zero-shot label Z unknown (-1) in train and val
    as `build_manifest` leaves it, but known in test."""
    rng = np.random.default_rng(0)
    rows = []
    n_per_split = {"train": 16, "val": 12, "test": 12}
    s = 0
    for split, n in n_per_split.items():
        for _ in range(n):
            y = (rng.random(len(NAMES)) < 0.45).astype(int)
            y[s % len(NAMES)] = 1                      # every label has positives in every split
            y[(s + 2) % len(NAMES)] = 0                # ... and negatives
            if split != "test":
                y[NAMES.index("Z")] = -1
            for k in range(1 + s % 3):
                view = ("frontal", "lateral", "unknown")[k]
                rows.append({"dicom_id": f"d{s:03d}_{k}", "subject_id": 100 + s, "study_id": f"s{s:03d}",
                             "ViewPosition": {"frontal": "PA", "lateral": "LATERAL", "unknown": ""}[view],
                             "view": view, "split": split, **dict(zip(NAMES, y.tolist()))})
            s += 1
    frame = _frame_with_images(root, rows)[list(MANIFEST_COLUMNS) + list(NAMES)]
    frame.to_csv(root / "manifest.csv", index=False)
    train = frame[frame["split"] == "train"]
    ls = LabelSpace(NAMES, tuple(int((train[n] == 1).sum()) for n in NAMES), len(train), ZS, synthetic=True)
    (root / "manifest.json").write_text(json.dumps({"label_space": ls.to_dict(), "image_root": "."}))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("props-manifest")
    _write_manifest(root)
    return load_manifest(root)


@pytest.fixture(scope="module")
def trained(manifest, tmp_path_factory):
    """A single-view, learned-query model trained by the real engine (a few steps) on the manifest."""
    from cxrlt.engine import train

    tc = TrainConfig(epochs=2, batch_size=8, lr=3e-3, threads=1, augment=False, device="cpu")
    variant = VariantConfig(name="props-single", model="single_test", loss="bce", train=tc)
    out = tmp_path_factory.mktemp("props-models") / "props-single"
    return train(variant, DataConfig(image_size=SIZE), manifest, out, progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def evaluated(trained, manifest, tmp_path_factory):
    """The trained artefact, its head rescaled so scores spread over (0, 1) (a few steps leave them within
    a percent of each other, where rounded predictions would tie them), evaluated by the engine."""
    import shutil

    from safetensors.torch import save_file

    from cxrlt.data.images import load_grayscale
    from cxrlt.engine import evaluate

    art = shutil.copytree(trained, tmp_path_factory.mktemp("props-eval") / "props-single")
    model = load_artefact(art).model
    train_paths = manifest.split("train")["path"]
    _standardise_logits(model, torch.stack([image_to_tensor(load_grayscale(manifest.image_root / p), SIZE)
                                            for p in train_paths]))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(art / "weights.safetensors"))
    evaluate(art, manifest, EvalConfig(split="val", batch_size=16), SIZE, progress=False, device="cpu")
    return art


def _standardise_logits(model, images: torch.Tensor) -> None:
    """Rescale a learned head so each label's logit over `images` has mean 0 and sd 1: an untrained
    model's outputs barely depend on the image, and mean, max and first image must differ clearly."""
    with torch.no_grad():
        z = model(images) - model.head.out_bias
        mu, sd = z.mean(0), z.std(0)
        model.head.out_weight.div_(sd[:, None])
        model.head.out_bias.copy_(-mu / sd)


def _split_arrays(artefact, manifest, split):
    """(probs [N, L] as written to predictions_<split>.csv, targets [N, L] from the manifest), by dicom_id."""
    pred = pd.read_csv(artefact / "eval" / f"predictions_{split}.csv", dtype={"dicom_id": str, "study_id": str})
    frame = manifest.split(split).set_index("dicom_id").loc[pred["dicom_id"]]
    return pred[list(NAMES)].to_numpy(), frame[list(NAMES)].to_numpy().astype(int), pred


def _f1_at(probs, targets, thr):
    """Per-label F1 of `prob >= thr` over the known targets; NaN where a label has no positives."""
    out = []
    for c in range(probs.shape[1]):
        known = targets[:, c] >= 0
        y, called = targets[known, c] == 1, probs[known, c] >= thr[c]
        out.append(2 * (y & called).sum() / (called.sum() + y.sum()) if y.any() else np.nan)
    return np.array(out)


# -------------------------------------------- 1. zero-shot labels receive no gradient, anywhere

def _zs_batch(ls, n=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, len(ls), generator=g, dtype=dtype) * 3)
    target = (torch.rand(n, len(ls), generator=g) < 0.5).to(dtype)
    zs = [ls.index(z) for z in ls.zero_shot]
    target[:, zs] = -1                             # as the manifest stores held-out labels in train/val
    return logits, target, zs


ZS_SPACE = LabelSpace(NAMES, (50, 20, 0, 5), 100, zero_shot=ZS)


@pytest.mark.parametrize("name", list_losses())
def test_zero_shot_logits_get_exactly_zero_gradient(name):
    """As the engine calls it (target clamped to 0, label_mask False) and with raw -1 targets."""
    loss = create_loss(name, label_space=ZS_SPACE)
    logits, target, zs = _zs_batch(ZS_SPACE)
    trained = [c for c in range(len(NAMES)) if c not in zs]
    for t, mask in ((target.clamp(min=0), target >= 0), (target, None)):
        x = logits.clone().requires_grad_(True)
        loss(x, t, mask).backward()
        assert torch.equal(x.grad[:, zs], torch.zeros_like(x.grad[:, zs])), name
        assert (x.grad[:, trained] != 0).any(), name
        # whatever the held-out logits are, the loss is the same
        x2 = logits.clone()
        x2[:, zs] = torch.randn_like(x2[:, zs]) * 50
        assert loss(x2, t, mask).item() == loss(logits, t, mask).item()


def test_dataset_masks_zero_shot_labels(manifest):
    """The dataset hands the engine label_mask False (and target 0, never 1) for held-out labels."""
    ds = CXRDataset(manifest.split("train"), manifest.image_root, NAMES, SIZE, max_views=4)
    z = NAMES.index("Z")
    for i in range(len(ds)):
        item = ds[i]
        assert not item["label_mask"][z] and item["target"][z] == 0
        assert item["label_mask"][[c for c in range(len(NAMES)) if c != z]].all()


def _text_model(n_labels, dim=24, seed=0):
    torch.manual_seed(seed)
    emb = torch.randn(n_labels, dim)
    return create_model("chexfusion_test", num_labels=n_labels, query="text", label_embeddings=emb).eval(), emb


def _study_batch(b=3, v=4, seed=0, size=SIZE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, v, 3, size, size, generator=g)
    mask = torch.ones(b, v, dtype=torch.bool)
    mask[1:, 2:] = False
    return x, mask, torch.randint(0, 3, (b, v), generator=g)


@pytest.mark.parametrize("name", list_losses())
def test_zero_shot_text_embedding_gets_no_gradient_and_changes_no_update(name):
    """Through a text-query model: the held-out label's embedding row gets an exactly-zero gradient, and
    every parameter's gradient is the same whatever that label's text embedding is."""
    model, emb = _text_model(len(NAMES))
    x, mask, types = _study_batch()
    loss = create_loss(name, label_space=ZS_SPACE)
    _, target, zs = _zs_batch(ZS_SPACE, n=3, seed=1, dtype=torch.float32)

    def grads(e):
        model.zero_grad(set_to_none=True)
        e = e.clone().requires_grad_(True)
        loss(model(x, mask, types, label_embeddings=e), target.clamp(min=0), target >= 0).backward()
        return e.grad, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    g_emb, g_params = grads(emb)
    assert torch.equal(g_emb[zs], torch.zeros_like(g_emb[zs]))
    assert (g_emb[[c for c in range(len(NAMES)) if c not in zs]].abs().sum(1) > 0).all()
    other = emb.clone()
    other[zs] = torch.randn(len(zs), emb.shape[1]) * 10
    _, g_other = grads(other)
    assert g_params.keys() == g_other.keys() and len(g_params) > 10
    for k in g_params:
        torch.testing.assert_close(g_other[k], g_params[k], rtol=0, atol=1e-7, msg=k)


def test_engine_training_leaves_zero_shot_output_untouched(trained):
    """Trained by the real loop, a held-out label's own output bias never moves from its zero init
    (zero gradient -> zero AdamW update, and weight decay keeps 0 at 0); trained labels' biases do."""
    art = load_artefact(trained)
    bias = art.model.head.out_bias.detach()
    z = NAMES.index("Z")
    assert bias[z].item() == 0.0
    assert (bias[[c for c in range(len(NAMES)) if c != z]] != 0).all()


# ---------------------------------------------- 2. a text head scores each label on its own

def test_text_head_logit_does_not_depend_on_the_other_labels():
    model, emb = _text_model(5)
    x, mask, types = _study_batch()
    a, b, c, d, e = range(5)
    with torch.inference_mode():
        full = model(x, mask, types)
        abc = model(x, mask, types, label_embeddings=emb[[a, b, c]])
        only_a = model(x, mask, types, label_embeddings=emb[[a]])
        dae = model(x, mask, types, label_embeddings=emb[[d, a, e]])
        reversed_ = model(x, mask, types, label_embeddings=emb.flip(0))
    assert only_a.shape == (3, 1) and dae.shape == (3, 3)
    torch.testing.assert_close(abc, full[:, :3], rtol=0, atol=1e-5)
    for got in (only_a[:, 0], dae[:, 1], abc[:, 0], reversed_[:, 4]):
        torch.testing.assert_close(got, full[:, a], rtol=0, atol=1e-5)
    torch.testing.assert_close(reversed_, full.flip(1), rtol=0, atol=1e-5)
    # not trivially constant: different texts and different studies get different logits
    assert (full[:, a] - full[:, b]).abs().min() > 1e-4 and (full[0] - full[1]).abs().min() > 1e-6


# ------------------------------------- 3. thresholds: tuned on validation, applied unchanged to test

def test_thresholds_are_tuned_on_validation_and_applied_unchanged(evaluated, manifest):
    stored = json.loads((evaluated / "eval" / "thresholds.json").read_text())
    assert stored["split"] == "val"
    thr = np.asarray(stored["thresholds"])
    p_val, y_val, _ = _split_arrays(evaluated, manifest, "val")
    assert len(np.unique(p_val.round(4))) > 0.8 * p_val.size       # spread scores: no tie hides a bug
    np.testing.assert_allclose(thr, tune_thresholds(p_val, y_val, NAMES), atol=2e-6)
    assert thr[NAMES.index("Z")] == 0.5                               # no val positives: the default
    # what travels with the model (artefact meta, Predictor) is the validation thresholds
    np.testing.assert_array_equal(load_artefact(evaluated).thresholds, thr)
    # test's f1_tuned is F1 at those thresholds, and those are not test's own optimum
    p_test, y_test, _ = _split_arrays(evaluated, manifest, "test")
    table = pd.read_csv(evaluated / "eval" / "per_label_test.csv").set_index("label").loc[list(NAMES)]
    np.testing.assert_allclose(table["threshold"], thr, atol=1e-12)
    np.testing.assert_allclose(table["f1_tuned"], _f1_at(p_test, y_test, thr), atol=1e-9)
    assert np.abs(tune_thresholds(p_test, y_test, NAMES) - thr).max() > 1e-3
    # and val's f1_tuned is the best F1 any threshold reaches on val
    val_table = pd.read_csv(evaluated / "eval" / "per_label_val.csv").set_index("label").loc[list(NAMES)]
    for c, n in enumerate(NAMES):
        if n in ZS:
            continue
        best = np.nanmax([_f1_at(p_val[:, [c]], y_val[:, [c]], [t])[0] for t in np.unique(p_val[:, c])])
        assert val_table.loc[n, "f1_tuned"] == pytest.approx(best, abs=1e-9), n


def test_metrics_json_is_the_metrics_of_the_written_predictions(evaluated, manifest):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    thr = np.asarray(json.loads((evaluated / "eval" / "thresholds.json").read_text())["thresholds"])
    ls = manifest.label_space
    for split in ("val", "test"):
        p, y, _ = _split_arrays(evaluated, manifest, split)
        ref = compute_metrics(p, y, ls, thresholds=thr)
        for k in ("mAP", "mAUC", "mF1", "mF1_tuned"):
            assert metrics[split][k] == pytest.approx(ref[k], abs=2e-5), (split, k)
    assert "zs_mAP" in metrics["test"] and "zs_mAP" not in metrics["val"]   # Z has no val targets


def test_tuned_threshold_is_not_glued_to_a_tuning_score():
    """The docstring's promise: the threshold lies between scores, never on one, so the optimum survives
    rounding of the scores (here: by less than 1e-6, as predictions_<split>.csv writes them)."""
    p = np.array([[0.3103200197], [0.41], [0.52], [0.66]])
    y = np.array([[1], [1], [0], [1]])                   # best F1 (6/7): call all four positive
    thr = tune_thresholds(p, y, ["A"])
    assert _f1_at(p, y, thr)[0] == pytest.approx(6 / 7)
    assert not (p[:, 0] == thr[0]).any()
    assert _f1_at(p.round(6), y, thr)[0] == pytest.approx(6 / 7)


# --------------------------------------------- 4. a study's label is the maximum over its images

def _disagreeing_frame():
    #            A: 1/0 -> 1   B: 0/-1 -> 0   C: -1/-1 -> -1   D: 0/1 -> 1   E: -1/1 -> 1   F: -1/0 -> 0
    rows = [
        dict(dicom_id="i1", study_id="s1", view="frontal", A=1, B=0, C=-1, D=0, E=-1, F=-1),
        dict(dicom_id="i2", study_id="s1", view="lateral", A=0, B=-1, C=-1, D=1, E=1, F=0),
        dict(dicom_id="i3", study_id="s2", view="frontal", A=0, B=0, C=0, D=0, E=0, F=0),
        dict(dicom_id="i4", study_id="s0", view="unknown", A=-1, B=1, C=0, D=-1, E=0, F=1),
    ]
    return rows, ("A", "B", "C", "D", "E", "F")


def test_study_label_is_the_max_over_images_unknown_only_if_all_unknown(tmp_path):
    rows, names = _disagreeing_frame()
    frame = _frame_with_images(tmp_path, rows)
    items = {it.key: it for it in build_items(frame, names, unit="study")}
    assert items["s1"].target.tolist() == [1, 0, -1, 1, 1, 0]
    assert items["s2"].target.tolist() == [0, 0, 0, 0, 0, 0]
    assert items["s0"].target.tolist() == [-1, 1, 0, -1, 0, 1]
    # the same order of the rows reversed gives the same study labels ("first image" would not)
    rev = {it.key: it for it in build_items(frame.iloc[::-1].reset_index(drop=True), names, unit="study")}
    assert all(rev[k].target.tolist() == items[k].target.tolist() for k in items)
    # per image: each image keeps its own labels
    per_image = {it.key: it.target.tolist() for it in build_items(frame, names, unit="image")}
    assert per_image["i1"] == [1, 0, -1, 0, -1, -1] and per_image["i2"] == [0, -1, -1, 1, 1, 0]
    # through the Dataset: target (unknown -> 0) and label_mask
    ds = CXRDataset(frame, tmp_path, names, 16, max_views=4)
    s1 = next(ds[i] for i in range(len(ds)) if ds.items[i].key == "s1")
    assert s1["target"].tolist() == [1, 0, 0, 1, 1, 0]
    assert s1["label_mask"].tolist() == [True, True, False, True, True, True]
    assert s1["view_mask"].tolist() == [True, True, False, False]
    label_names_missing = names + ("G",)   # a label the frame lacks is unknown everywhere
    assert (build_items(frame, label_names_missing)[0].target[-1] == -1)


# ------------------------------------------- 5. a single-view model averages its study's images

@pytest.fixture(scope="module")
def single_artefact(tmp_path_factory):
    torch.manual_seed(0)
    ls = LabelSpace(NAMES, (50, 20, 0, 5), 100, zero_shot=ZS)
    m = create_model("single_test", num_labels=len(NAMES)).eval()
    _standardise_logits(m, torch.stack([image_to_tensor(_image(s), SIZE) for s in range(8)]))
    return save_artefact(tmp_path_factory.mktemp("single") / "a", m, model_name="single_test", label_space=ls,
                         data={"image_size": SIZE})


def test_single_view_study_probability_is_the_mean_of_its_images(single_artefact):
    from cxrlt.inference import Predictor

    pred = Predictor.from_path(single_artefact)
    assert pred.max_views == 1
    imgs = [_image(s) for s in range(5)]
    views = ["frontal", "lateral", None, None, "lateral"]
    # each image alone, with its view (the view embedding makes the view matter)
    alone = np.concatenate([pred.predict([[im]], views=[[v]]) for im, v in zip(imgs, views)])     # [5, L]
    assert np.abs(alone[0] - alone[1]).min() > 1e-3 and np.abs(alone[1] - alone[2]).min() > 1e-3
    studies = [[imgs[0], imgs[1], imgs[2]], [imgs[3]], [imgs[4], imgs[0]]]
    got = pred.predict(studies, views=[views[:3], None, [views[4], views[0]]])
    want = np.stack([alone[:3].mean(0), alone[3], alone[[4, 0]].mean(0)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)     # float32 noise, amplified by the rescaling
    # neither the max nor the first image would pass: they are far from the mean here
    for first, members in ((0, [0, 1, 2]), (4, [4, 0])):
        assert np.abs(alone[members].max(0) - alone[members].mean(0)).max() > 1e-2
        assert np.abs(alone[first] - alone[members].mean(0)).max() > 1e-2


def test_engine_scores_single_view_models_per_image(evaluated, manifest):
    """The engine's evaluation scores per image, as the challenge does: a single-view model's row for an
    image is that image's own prediction (not its study's), and equals the Predictor on that image."""
    from cxrlt.data.images import load_grayscale
    from cxrlt.inference import Predictor

    _, _, pred = _split_arrays(evaluated, manifest, "test")
    frame = manifest.split("test").set_index("dicom_id")
    multi = pred[pred.groupby("study_id")["dicom_id"].transform("size") > 1]
    assert len(multi) >= 4
    p = Predictor.from_path(evaluated)
    for _, row in multi.iterrows():
        img = load_grayscale(manifest.image_root / frame.loc[row["dicom_id"], "path"])
        own = p.predict([[img]], views=[[frame.loc[row["dicom_id"], "view"]]])[0]
        # (batch of 16 vs 1: float32 noise, amplified by the rescaled head)
        np.testing.assert_allclose(row[list(NAMES)].to_numpy(dtype=float), own, atol=2e-5)
    spread = multi.groupby("study_id")[list(NAMES)].agg(lambda s: s.max() - s.min()).to_numpy()
    assert (spread > 1e-2).any(axis=1).all()          # images of one study really got their own rows


def test_engine_copies_a_fusion_models_study_prediction_to_its_images(manifest, tmp_path):
    from cxrlt.engine import evaluate

    torch.manual_seed(0)
    m = create_model("chexfusion_test", num_labels=len(NAMES))
    art = save_artefact(tmp_path / "fusion", m, model_name="chexfusion_test", label_space=manifest.label_space,
                        data={"image_size": SIZE})
    evaluate(art, manifest, EvalConfig(split="val"), SIZE, splits=("val", "test"), progress=False, device="cpu")
    _, _, pred = _split_arrays(art, manifest, "test")
    spread = pred.groupby("study_id")[list(NAMES)].agg(lambda s: s.max() - s.min()).to_numpy()
    assert spread.max() == 0.0
    assert pred.groupby("study_id")[list(NAMES)].first().std().min() > 0   # studies differ


# --------------------------------- 6. promotion: best validation mAP among the same data's models

def _registered(tmp_path, name, val_map, data_md5):
    from cxrlt.registry import store

    ls = LabelSpace(("A", "B"), (5, 3), 10)
    m = create_model("single_test", num_labels=2)
    art = save_artefact(tmp_path / f"{name}-{val_map}-{data_md5}", m, model_name="single_test", label_space=ls,
                        data={"image_size": SIZE}, metrics={"val": {"mAP": val_map, "mAUC": 0.5}},
                        data_version={"manifest_md5": data_md5, "dvc_md5": None})
    return store.register(art, name=name)


def test_promotion_picks_the_best_validation_map_on_the_same_data(tmp_path):
    from cxrlt.registry import store

    name = "cxrlt-props-promote"
    tags = {}
    # registration order mixes old/new with good/bad, so neither "newest" nor "first" equals "best"
    for key, val_map, data in (("v1-mid", 0.55, "v1"), ("v1-best", 0.61, "v1"), ("v2-top", 0.90, "v2"),
                               ("v1-low", 0.20, "v1"), ("v2-low", 0.30, "v2")):
        tags[key] = _registered(tmp_path, name, val_map, data)
    assert store.best_tag(name, data_version="v1") == tags["v1-best"]
    assert store.best_tag(name, data_version="v2") == tags["v2-top"]
    assert store.best_tag(name) == tags["v2-top"]                  # no data version: all models
    with pytest.raises(store.RegistryError, match="on data v3"):
        store.best_tag(name, data_version="v3")
    assert store.promote_best(name, data_version="v1") == tags["v1-best"]
    assert store.serving_tag() == tags["v1-best"]
    assert store.promote_best(name, data_version="v2") == tags["v2-top"]
    assert store.serving_tag() == tags["v2-top"] and store.rollback(name=name) == tags["v1-best"]
    # promoting the model already served changes nothing
    assert store.promote_best(name, data_version="v1") == tags["v1-best"]
    assert [h["tag"] for h in store.history(name)] == [tags["v1-best"], tags["v2-top"], tags["v1-best"]]


def test_best_tag_with_fixed_rows(monkeypatch):
    """best_tag over fixed registry rows with distinct creation times: neither the newest, the oldest nor
    the first listed, nor the best of another data version, nor a model without a validation mAP wins."""
    from cxrlt.registry import store

    rows = [  # list_registered order: newest first
        {"tag": "m:new-low", "val_mAP": 0.31, "created": "2024-05-05T00:00:00", "data_version": "v1"},
        {"tag": "m:other-data", "val_mAP": 0.95, "created": "2024-05-04T00:00:00", "data_version": "v2"},
        {"tag": "m:no-metric", "val_mAP": None, "created": "2024-05-03T00:00:00", "data_version": "v1"},
        {"tag": "m:best", "val_mAP": 0.62, "created": "2024-05-02T00:00:00", "data_version": "v1"},
        {"tag": "m:old-mid", "val_mAP": 0.50, "created": "2024-05-01T00:00:00", "data_version": "v1"},
        {"tag": "m:tie-older", "val_mAP": 0.62, "created": "2024-04-01T00:00:00", "data_version": "v1"},
    ]
    monkeypatch.setattr(store, "list_registered", lambda name=store.MODEL_NAME: [dict(r) for r in rows])
    assert store.best_tag("m", data_version="v1") == "m:best"          # tie on mAP: the newer one
    assert store.best_tag("m", data_version="v2") == "m:other-data"
    assert store.best_tag("m") == "m:other-data"


def test_promote_without_a_data_version_stays_on_one_data_set(monkeypatch):
    """`cxrlt registry promote` with no tag: the best on the served model's data, never a higher mAP
    validated on other data; with nothing served and several data sets, a clear refusal."""
    from cxrlt.registry import store

    rows = [{"tag": "m:v1-low", "val_mAP": 0.30, "created": "2024-05-03", "data_version": "v1", "serving": True},
            {"tag": "m:v2-top", "val_mAP": 0.90, "created": "2024-05-02", "data_version": "v2", "serving": False},
            {"tag": "m:v1-best", "val_mAP": 0.55, "created": "2024-05-01", "data_version": "v1", "serving": False}]
    served = []
    monkeypatch.setattr(store, "list_registered", lambda name=store.MODEL_NAME: [dict(r) for r in rows])
    monkeypatch.setattr(store, "serving_tag", lambda required=True: next(r["tag"] for r in rows if r["serving"]))
    monkeypatch.setattr(store, "set_serving", lambda tag, reason="", action="": served.append(tag) or tag)
    assert store.promote_best("m") == "m:v1-best" and served == ["m:v1-best"]
    assert store.promote_best("m", data_version="v2") == "m:v2-top"
    rows[0]["serving"] = False
    monkeypatch.setattr(store, "serving_tag", lambda required=True: None)
    with pytest.raises(store.RegistryError, match="2 different data sets"):
        store.promote_best("m")


# ------------------------------------- 7. the positional encoding: the formula, in token order

def _pe_formula(d, r, c):
    q = d // 4
    f = [10000.0 ** (-k / q) for k in range(q)]
    return ([math.sin(r * fk) for fk in f] + [math.cos(r * fk) for fk in f]
            + [math.sin(c * fk) for fk in f] + [math.cos(c * fk) for fk in f])


def test_tokenizer_adds_the_encoding_of_each_tokens_own_position():
    """(sincos_2d itself against the formula: test_models.) h != w, so a transposed encoding fails."""
    torch.manual_seed(0)
    tok = ViewTokenizer(in_channels=8, d_model=16).eval()
    h, w = 3, 5
    with torch.no_grad():
        # an empty feature map: every token is the projection's bias plus its position's encoding
        zero = tok(torch.zeros(1, 8, h, w))[0]
        np.testing.assert_allclose((zero - tok.proj.bias).numpy(),
                                   np.array([_pe_formula(16, r, c) for r in range(h) for c in range(w)]), atol=1e-6)
        # moving the content moves the content part of the tokens, never the encoding part
        feats = torch.randn(2, 8, h, w)
        for moved, order in ((feats.roll(2, dims=-1), torch.arange(h * w).view(h, w).roll(2, dims=-1)),
                             (feats.flip(-2), torch.arange(h * w).view(h, w).flip(-2))):
            a, b = tok(feats), tok(moved)
            pe = sincos_2d(16, h, w)
            torch.testing.assert_close(b - pe, (a - pe)[:, order.reshape(-1)], atol=1e-5, rtol=0)
            assert not torch.allclose(b, a[:, order.reshape(-1)], atol=1e-3)   # the encoding did not move


def test_fusion_output_depends_on_token_positions_only_through_the_encoding():
    """Without slot/view embeddings, the fusion transformer and the query head are blind to token order
    except through the positional encoding: rolling or transposing the feature map changes the logits,
    and the same roll with the encoding subtracted does not."""
    torch.manual_seed(0)
    m = create_model("chexfusion_test", num_labels=5, slot_embedding=False, view_embedding=False).eval()
    c, h, w = m.num_features, 4, 4
    feats = torch.randn(2, c, h, w) * 3
    mask, types = torch.ones(1, 2, dtype=torch.bool), torch.tensor([[0, 1]])

    def logits(f, without_pe=False):
        t = m.tokenizer(f)
        if without_pe:
            t = t - sincos_2d(t.shape[-1], h, w)
        fused, pad = m.fusion(t[None], mask, types)
        return m.head(fused, pad)

    with torch.no_grad():
        base = logits(feats)
        for moved in (feats.roll(1, dims=-1), feats.roll(2, dims=-2), feats.transpose(-1, -2)):
            assert (logits(moved) - base).abs().max() > 1e-3
            torch.testing.assert_close(logits(moved, True), logits(feats, True), atol=1e-5, rtol=1e-5)


def test_evaluate_bootstraps_over_each_images_patient(trained, manifest, tmp_path, monkeypatch):
    """The bootstrap gets the patient of every evaluated image, row for row, so that a patient's images
    move together; image or study ids would pass correlated images off as independent (too narrow)."""
    import shutil

    from cxrlt.engine import evaluate
    from cxrlt.evaluation import bootstrap

    seen, real = [], bootstrap.bootstrap_ci

    def spy(probs, targets, label_space, groups_ids, *args, **kwargs):
        seen.append(np.asarray(groups_ids).copy())
        return real(probs, targets, label_space, groups_ids, *args, **kwargs)

    monkeypatch.setattr(bootstrap, "bootstrap_ci", spy)
    art = shutil.copytree(trained, tmp_path / "props-single")
    res = evaluate(art, manifest, EvalConfig(split="val", batch_size=16, bootstrap=5), SIZE, progress=False,
                   device="cpu")
    order = ["val"] + [s for s in ("dev", "test") if s in res]
    assert len(seen) == len(order)
    for split, ids in zip(order, seen):
        frame = manifest.split(split)
        assert list(ids) == list(frame["subject_id"].astype(str)), split
    assert any(len(set(ids)) < len(ids) for ids in seen)        # patients with several images: a real check
    assert "mAP_ci95_labels" in res["val"]                      # what the interval rests on is recorded


def test_metrics_recomputed_from_the_written_predictions_equal_metrics_json(evaluated, manifest):
    """predictions_<split>.csv holds the very numbers the metrics were computed from: compute_metrics on the
    file, with the stored thresholds, gives metrics.json exactly (not to a tolerance)."""
    from cxrlt.evaluation.metrics import summary

    meta = json.loads((evaluated / "artefact.json").read_text())
    ls = LabelSpace.from_dict(meta["label_space"])
    stored = json.loads((evaluated / "metrics.json").read_text())
    thr = np.asarray(json.loads((evaluated / "eval" / "thresholds.json").read_text())["thresholds"])
    for split, want in stored.items():
        pred = pd.read_csv(evaluated / "eval" / f"predictions_{split}.csv", dtype={"dicom_id": str})
        frame = manifest.split(split).set_index("dicom_id").loc[pred["dicom_id"]]
        got = summary(compute_metrics(pred[list(ls.names)].to_numpy(), frame[list(ls.names)].to_numpy(), ls,
                                      thresholds=thr))
        for key in ("mAP", "mAUC", "mF1", "mF1_tuned", "ece", "mAP_head", "mAP_medium", "mAP_tail"):
            if key in want:
                assert got[key] == want[key], (split, key, got[key], want[key])
