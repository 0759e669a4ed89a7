"""Grad-CAM heatmaps (cxrlt.explain) and `Predictor.explain`: maps point at the evidence a model learned,
are exactly zero where the model cannot see, follow the flip of a flip-averaging model, and one study's
maps never depend on anything else."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cxrlt.explain import gradcam, heatmap_png
from cxrlt.inference import MAX_EXPLAIN, Predictor, StudyInputError
from cxrlt.models import create_model, list_models

ONE = torch.ones(1, dtype=torch.bool)
UNKNOWN = torch.full((1,), 2)


def _shapes(x: torch.Tensor, kind: int, cell: int, side: int, size: int) -> None:
    """Draw shape `kind` (0 a filled square, 1 a cross) into grid cell `cell` of a [S, S] image."""
    r, c = divmod(cell, side // size)
    r, c = r * size, c * size
    if kind == 0:
        x[r + 8:r + 24, c + 8:c + 24] += 0.7
    else:
        x[r + 14:r + 18, c + 4:c + 28] += 0.7
        x[r + 4:r + 28, c + 14:c + 18] += 0.7


def test_gradcam_points_at_what_drives_each_label():
    """A tiny model learns label 0 = "a square somewhere", label 1 = "a cross somewhere" (each in a random
    cell of the backbone's 3x3 feature grid). In images holding both, label 0's map peaks on the square and
    label 1's on the cross: the same image, two findings, two places. (Untrained, the same check scores
    about half: the maps then follow brightness, not the label.)"""
    torch.manual_seed(0)
    side, cell = 96, 32  # test_resnet has stride 32: a 3x3 feature map
    n_cells = (side // cell) ** 2
    model = create_model("single_test", num_labels=2, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    gen = torch.Generator().manual_seed(0)

    def batch(n, both=False):
        x, y, where = torch.rand(n, side, side, generator=gen) * 0.3, torch.zeros(n, 2), []
        for i in range(n):
            cells = torch.randperm(n_cells, generator=gen)[:2].tolist()
            has = [True, True] if both else (torch.rand(2, generator=gen) < 0.5).tolist()
            for k in range(2):
                if has[k]:
                    _shapes(x[i], k, cells[k], side, cell)
                    y[i, k] = 1
            where.append(cells)
        return x[:, None].expand(-1, 3, -1, -1), y, where

    for _ in range(40):
        x, y, _ = batch(16)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, _, where = batch(10, both=True)
    hits = 0
    for i in range(len(x)):
        for label in (0, 1):
            cam = gradcam(model, x[i:i + 1], ONE, UNKNOWN, label)
            assert cam.shape == (1, side, side) and cam.dtype == torch.float32
            assert float(cam.min()) >= 0 and float(cam.max()) == pytest.approx(1.0)
            per_cell = cam[0].reshape(side // cell, cell, side // cell, cell).sum((1, 3)).flatten()
            hits += int(per_cell.argmax()) == where[i][label]
    assert hits >= 17, f"{hits}/20 maps peaked on the shape that drives their label"


def test_gradcam_is_zero_where_the_model_cannot_see():
    """A fusion model whose feature maps are zeroed on their left half: every map of every label is
    exactly 0 there (up to the bilinear upsampling's half-cell border), and not zero everywhere."""
    torch.manual_seed(0)
    model = create_model("chexfusion_test", num_labels=4).eval()
    blind = torch.ones(8, 8)
    blind[:, :4] = 0  # 256 px / stride 32 = 8x8 feature map; columns 0-3 cover pixels 0-127

    def mask_left(module, args):
        return (args[0] * blind.to(args[0]),)

    hook = model.tokenizer.register_forward_pre_hook(mask_left)
    try:
        images = torch.randn(4, 3, 256, 256)
        view_mask = torch.tensor([True, True, False, False])
        seen = []
        for label in range(4):
            cam = gradcam(model, images, view_mask, torch.tensor([0, 1, 2, 2]), label)
            assert cam.shape == (2, 256, 256)
            assert torch.count_nonzero(cam[:, :, :112]) == 0, label  # 112 = 128 - half a 32 px cell
            seen.append(float(cam[:, :, 144:].max()))
    finally:
        hook.remove()
    assert max(seen) == pytest.approx(1.0)


def test_gradcam_of_a_flip_averaging_model_mirrors_with_the_image():
    """`tta_flip` averages the logits of an image and its mirror: the map of the mirrored image is the
    mirrored map (the mirror pass's map is mirrored back before it is added)."""
    torch.manual_seed(1)
    model = create_model("single_test", num_labels=3, tta_flip=True).eval()
    x = torch.randn(1, 3, 128, 128)
    a = gradcam(model, x, ONE, UNKNOWN, 2)
    b = gradcam(model, x.flip(-1), ONE, UNKNOWN, 2)
    assert float(a.max()) == pytest.approx(1.0)
    assert torch.allclose(b, a.flip(-1), atol=1e-5)


def test_several_labels_in_one_pass_equal_one_call_each():
    torch.manual_seed(2)
    model = create_model("chexfusion_test", num_labels=5).eval()
    images, view_mask, types = torch.randn(4, 3, 128, 128), torch.tensor([True, True, True, False]), torch.full((4,), 2)
    together = gradcam(model, images, view_mask, types, [3, 0, 4])
    assert together.shape == (3, 3, 128, 128)
    for k, label in enumerate([3, 0, 4]):
        assert torch.allclose(together[k], gradcam(model, images, view_mask, types, label), atol=1e-6)


@pytest.mark.parametrize("name", list_models("*_test"))
def test_gradcam_runs_on_every_variant(name):
    torch.manual_seed(0)
    model = create_model(name, num_labels=3).eval()
    v = model.config.max_views
    images = torch.randn(v, 3, 64, 64)
    view_mask = torch.zeros(v, dtype=torch.bool)
    view_mask[0] = True
    types = torch.full((v,), 2)
    types[0] = 0
    with torch.inference_mode():  # as a service calls it: gradients are switched on inside
        cam = gradcam(model, images, view_mask, types, 1)
    assert cam.shape == (1, 64, 64) and 0 <= float(cam.min()) <= float(cam.max()) <= 1
    assert not any(p.grad is not None for p in model.parameters())  # nothing accumulates in the weights


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, label_space):
    from cxrlt.artefact.checkpoint import save_artefact

    torch.manual_seed(0)
    model = create_model("chexfusion_test", num_labels=len(label_space))
    path = save_artefact(tmp_path_factory.mktemp("explain") / "m", model, model_name="chexfusion_test",
                         label_space=label_space, data={"image_size": 64}, synthetic=True,
                         thresholds=[0.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # the first three are "findings"
    return Predictor.from_path(path)


def _img(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), mode="L")


def test_predictor_explain_answers_each_finding_on_each_image(predictor):
    images, views = [_img(1), _img(2)], ["frontal", "lateral"]
    names = list(predictor.label_names)
    out = predictor.explain(images, views, [names[4], names[1]])
    assert [(d["finding"], d["image"]) for d in out] == [(names[4], 0), (names[4], 1), (names[1], 0), (names[1], 1)]
    for d in out:
        assert d["method"] == "gradcam" and (d["width"], d["height"]) == (64, 64)
        assert d["map"].shape == (64, 64) and d["map"].dtype == np.float32
        assert 0 <= d["map"].min() <= d["map"].max() <= 1
    for name in (names[4], names[1]):  # one scale per finding over the study: its strongest spot is 1
        top = max(d["map"].max() for d in out if d["finding"] == name)
        assert top == pytest.approx(1.0) or top == 0
    # a study's maps are its own: explaining another study in between changes nothing
    again = predictor.explain([_img(7)], None, [names[4]])
    assert len(again) == 1 and again[0]["image"] == 0
    assert all(np.array_equal(a["map"], b["map"]) for a, b in zip(out, predictor.explain(images, views,
                                                                                          [names[4], names[1]])))


def test_predictor_explain_findings_word_and_bad_names(predictor):
    names = list(predictor.label_names)
    probs = predictor.predict([[_img(3)]])[0]
    over = [names[i] for i in np.argsort(-probs) if probs[i] >= predictor.thresholds[i]]
    assert set(over) == set(names[:3])
    assert predictor.explain_targets([_img(3)], None, ["findings"]) == over
    # named ones first, then the over-threshold ones not already named; never more than MAX_EXPLAIN
    assert predictor.explain_targets([_img(3)], None, [names[5], "findings", names[5]]) == [names[5], *over]
    assert predictor.explain([_img(3)], None, ["findings"], probs=np.full(len(names), -1.0)) == []  # none over
    with pytest.raises(StudyInputError, match="unknown finding.*Nodule.*Atelectasis"):
        predictor.explain([_img(3)], None, ["Nodule"])
    with pytest.raises(StudyInputError, match=f"at most {MAX_EXPLAIN}"):
        predictor.explain([_img(3)], None, names)
    with pytest.raises(StudyInputError, match="name 1 to"):
        predictor.explain([_img(3)], None, [" "])


def test_single_image_model_explains_each_image_on_one_scale(tmp_path, label_space):
    from cxrlt.artefact.checkpoint import save_artefact

    torch.manual_seed(0)
    model = create_model("single_test", num_labels=len(label_space))
    p = Predictor.from_path(save_artefact(tmp_path / "s", model, model_name="single_test", label_space=label_space,
                                          data={"image_size": 128}, synthetic=True))
    out = p.explain([_img(1, 128), _img(2, 128), _img(3, 128)], None, [p.label_names[0]])
    assert [d["image"] for d in out] == [0, 1, 2]
    assert max(d["map"].max() for d in out) == pytest.approx(1.0)


def test_heatmap_png_is_8_bit_grey_at_the_map_size():
    m = torch.zeros(40, 30)
    m[5, 7], m[6, 7] = 1.0, 0.5
    img = Image.open(io.BytesIO(heatmap_png(m)))
    assert img.format == "PNG" and img.mode == "L" and img.size == (30, 40)
    a = np.asarray(img)
    assert a[5, 7] == 255 and a[6, 7] == 128 and a.sum() == 255 + 128
