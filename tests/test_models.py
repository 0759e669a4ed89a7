"""The public model contract: shapes, batch independence, masked slots, permutation, artefact round trip."""

import pytest
import torch

from cxrlt.artefact.checkpoint import load_artefact, save_artefact
from cxrlt.artefact.meta import ArtefactError
from cxrlt.labels import LabelSpace
from cxrlt.models import create_model, list_models
from cxrlt.models.fusion import sincos_2d

TEST_MODELS = list_models("*_test")


def _batch(b, v, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, v, 3, s, s, generator=g)
    mask = torch.ones(b, v, dtype=torch.bool)
    types = torch.randint(0, 3, (b, v), generator=g)
    return x, mask, types


def test_test_variants_exist_and_build_fast():
    assert {"chexfusion_test", "single_test"} <= set(TEST_MODELS)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_forward_shape(name):
    m = create_model(name, num_labels=7).eval()
    v = m.config.max_views
    x, mask, types = _batch(2, v)
    with torch.inference_mode():
        assert m(x, mask, types).shape == (2, 7)
        assert m(x[:, 0]).shape == (2, 7)  # [B, C, H, W] means one image per study


@pytest.mark.parametrize("name", TEST_MODELS)
def test_prediction_independent_of_batch_mates(name):
    m = create_model(name).eval()
    v = m.config.max_views
    x, mask, types = _batch(4, v)
    if v > 1:
        mask[1, 2:] = False
    x2, _, _ = _batch(4, v, seed=1)
    x2[0], mask2, types2 = x[0], mask.clone(), types.clone()
    mask2[1:] = True
    with torch.inference_mode():
        alone = m(x[:1], mask[:1], types[:1])
        a = m(x, mask, types)[:1]
        b = m(x2, mask2, types2)[:1]
    torch.testing.assert_close(a, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, alone, atol=1e-5, rtol=1e-5)


def test_masked_slot_content_is_ignored():
    m = create_model("chexfusion_test").eval()
    x, mask, types = _batch(2, 4)
    mask[:, 2:] = False
    y = x.clone()
    y[:, 2:] = torch.randn_like(y[:, 2:]) * 100
    t2 = types.clone()
    t2[:, 2:] = 1 - t2[:, 2:].clamp(max=1)
    with torch.inference_mode():
        torch.testing.assert_close(m(x, mask, types), m(y, mask, t2), atol=1e-5, rtol=1e-5)


def test_view_permutation_invariant_without_view_and_slot_embeddings():
    m = create_model("chexfusion_test", view_embedding=False, slot_embedding=False).eval()
    x, mask, types = _batch(2, 4)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.inference_mode():
        torch.testing.assert_close(m(x, mask, types), m(x[:, perm], mask[:, perm], types[:, perm]),
                                   atol=1e-5, rtol=1e-4)


def test_view_types_matter_when_embedded():
    m = create_model("chexfusion_test").eval()
    x, mask, types = _batch(1, 2)
    with torch.inference_mode():
        a = m(x, mask, torch.tensor([[0, 1]]))
        b = m(x, mask, torch.tensor([[1, 0]]))
    assert not torch.allclose(a, b)


def test_empty_study_is_refused():
    m = create_model("chexfusion_test").eval()
    x, mask, types = _batch(2, 4)
    mask[1] = False
    with pytest.raises(ValueError, match="at least one image"):
        m(x, mask, types)


def test_positional_encoding_is_the_2d_sincos_formula_in_row_major_order():
    """Token r * w + c (row-major, as flatten(2) orders a feature map) encodes row r in the first half of
    the channels and column c in the second: [sin(r f), cos(r f), sin(c f), cos(c f)], f_k = 1e4^(-k/(d/4)).
    h != w, so a transposed encoding cannot pass; tokens' positional order: see test_properties."""
    d, h, w = 16, 3, 5
    pe = sincos_2d(d, h, w)
    f = 10000.0 ** (-torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    r, c = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    r, c = r.reshape(-1, 1) * f, c.reshape(-1, 1) * f
    expected = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], 1).float()
    torch.testing.assert_close(pe, expected, atol=1e-6, rtol=0)


def test_widths_come_from_the_backbone():
    m = create_model("chexfusion_test")
    assert m.tokenizer.proj.in_channels == m.backbone.num_features


def test_unknown_model_and_option_are_clear():
    with pytest.raises(KeyError, match="available"):
        create_model("nope")
    with pytest.raises(ValueError, match="unknown model option"):
        create_model("chexfusion_test", colour=1)


def test_artefact_roundtrip_is_strict(tmp_path):
    ls = LabelSpace(("A", "B", "C"), (5, 3, 1), 10)
    m = create_model("chexfusion_test", num_labels=3).eval()
    save_artefact(tmp_path / "a", m, model_name="chexfusion_test", label_space=ls, data={"image_size": 32})
    art = load_artefact(tmp_path / "a")
    x, mask, types = _batch(2, 4)
    with torch.inference_mode():
        torch.testing.assert_close(art.model(x, mask, types), m(x, mask, types))
    assert art.label_space == ls and art.meta["pretrained_source"] == "random"
    # weights that do not fit the recorded architecture must not load silently
    import json
    meta = json.loads((tmp_path / "a" / "artefact.json").read_text())
    meta["model_config"]["fusion_layers"] = 2
    (tmp_path / "a" / "artefact.json").write_text(json.dumps(meta))
    with pytest.raises(ArtefactError, match="do not match"):
        load_artefact(tmp_path / "a")
