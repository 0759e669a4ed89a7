"""View-specific backbones (`view_backbones` separate | split): routing by view, the view classifier
for unknown views, the shared stem of `split`, and stage 2 started from a shared stage-1 artefact."""

import copy

import pytest
import timm
import torch

from cxrlt.artefact.checkpoint import load_artefact, save_artefact
from cxrlt.engine import init_backbone
from cxrlt.labels import LabelSpace
from cxrlt.models import create_model, list_models
from cxrlt.models.views import ViewBackbones, view_classifier_accuracy

VIEW_MODELS = ["chexfusion_separate_test", "chexfusion_split_test"]
F_, L_, U_ = 0, 1, 2


def _study(v=2, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, v, 3, s, s, generator=g), torch.ones(1, v, dtype=torch.bool)


def _force_classifier(model, view: int) -> None:
    """Make the view classifier predict `view` for every image."""
    fc = model.view_classifier.fc
    with torch.no_grad():
        fc.weight.zero_()
        fc.bias.copy_(torch.tensor([1.0, -1.0]) * (1 if view == F_ else -1))


def _synthetic_views(n: int, s: int = 32, seed: int = 0):
    """Frontal = bright left half, lateral = bright right half, plus noise: [n, 3, s, s], codes [n]."""
    g = torch.Generator().manual_seed(seed)
    views = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, s, s, generator=g) * 0.5
    half = torch.zeros(n, 1, s, s)
    half[views == F_, :, :, : s // 2] = 1.0
    half[views == L_, :, :, s // 2:] = 1.0
    return (x + 2 * half).expand(n, 3, s, s).contiguous(), views


def test_variants_registered_and_covered_by_the_test_loops():
    names = set(list_models())
    assert {"chexfusion_regnetx002_separate", "chexfusion_regnetx002_split",
            "chexfusion_convnext_small_separate", "chexfusion_convnext_small_split"} <= names
    assert set(VIEW_MODELS) <= set(list_models("*_test"))  # so test_models' contract tests run on them
    assert not hasattr(create_model("chexfusion_test"), "auxiliary_loss")  # shared: no view classifier


@pytest.mark.parametrize("name", VIEW_MODELS)
def test_widths_from_backbone_and_masked_slots_ignored(name):
    m = create_model(name).eval()
    assert m.tokenizer.proj.in_channels == m.backbone.num_features
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 32, 32, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    types = torch.tensor([[0, 2, 1, 2], [1, 0, 0, 0]])
    y, t2 = x.clone(), types.clone()
    y[~mask] = torch.randn_like(y[~mask]) * 100
    t2[~mask] = 2 - t2[~mask]
    with torch.inference_mode():
        torch.testing.assert_close(m(x, mask, types), m(y, mask, t2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", VIEW_MODELS)
def test_each_view_uses_its_own_branch(name):
    m = create_model(name, view_embedding=False).eval()
    x, mask = _study(v=1)
    with torch.inference_mode():
        frontal, lateral = m(x, mask, torch.tensor([[F_]])), m(x, mask, torch.tensor([[L_]]))
        torch.testing.assert_close(frontal, lateral)  # both branches start from the same weights
        for p in m.backbone.branches["lateral"].parameters():
            p.zero_()
        torch.testing.assert_close(m(x, mask, torch.tensor([[F_]])), frontal)
        assert not torch.allclose(m(x, mask, torch.tensor([[L_]])), lateral)


@pytest.mark.parametrize("name", VIEW_MODELS)
def test_unknown_views_follow_the_classifier(name):
    m = create_model(name, view_embedding=False).eval()
    x, mask = _study(v=2)
    with torch.inference_mode():
        known = {v: m(x, mask, torch.tensor([[F_, v]])) for v in (F_, L_)}
        for v in (F_, L_):
            _force_classifier(m, v)
            assert (m.predict_views(x, mask) == v).all()
            torch.testing.assert_close(m(x, mask, torch.tensor([[F_, U_]])), known[v])


def test_split_shares_the_stem_and_gradients_reach_only_the_used_branch():
    m = create_model("chexfusion_split_test")
    (stem_f, late_f), (stem_l, late_l) = m.backbone.path_modules(F_), m.backbone.path_modules(L_)
    assert stem_f is stem_l
    ids = lambda mod: {id(p) for p in mod.parameters()}  # noqa: E731
    assert ids(stem_f) == ids(stem_l) and ids(stem_f)
    assert not ids(late_f) & ids(late_l) and not ids(stem_f) & (ids(late_f) | ids(late_l))
    x, mask = _study(v=1)
    m(x, mask, torch.tensor([[F_]])).sum().backward()
    grads = lambda mod: [p.grad for p in mod.parameters()]  # noqa: E731
    assert any(g is not None and g.abs().sum() > 0 for g in grads(stem_f))
    assert any(g is not None and g.abs().sum() > 0 for g in grads(late_f))
    assert all(g is None for g in grads(late_l))


@pytest.mark.parametrize("backbone", ["test_convnext", "test_byobnet", "test_nfnet", "regnetx_002"])
def test_split_computes_the_same_function_as_the_backbone(backbone):
    full = timm.create_model(backbone, num_classes=0, global_pool="").eval()
    vb = ViewBackbones(copy.deepcopy(full), "split", split_stage=1).eval()
    vb.load_shared_state(full.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = full.forward_features(x)
        torch.testing.assert_close(vb.forward_features(x, torch.tensor([F_, L_])), ref, atol=1e-5, rtol=1e-4)


def test_clear_errors():
    with pytest.raises(ValueError, match="stem.*stages"):
        create_model("chexfusion_test", view_backbones="split")  # test_resnet: no stem/stages
    with pytest.raises(ValueError, match="split_stage"):
        create_model("chexfusion_split_test", split_stage=4)
    with pytest.raises(ValueError, match="view_backbones must be one of"):
        create_model("chexfusion_test", view_backbones="both")
    m = create_model("chexfusion_separate_test").eval()
    x, mask = _study(v=1)
    with pytest.raises(ValueError, match="view_types"):
        m(x, mask, torch.tensor([[3]]))
    with pytest.raises(ValueError, match="no view classifier"):
        view_classifier_accuracy(create_model("chexfusion_test"), [])
    with pytest.raises(ValueError, match="fit no branch"):
        m.backbone.load_shared_state({**m.backbone.branches["frontal"].state_dict(), "extra": torch.zeros(1)})


def test_auxiliary_loss_trains_the_view_classifier():
    torch.manual_seed(0)
    m = create_model("chexfusion_separate_test", view_classifier_size=32)
    x, views = _synthetic_views(32)
    images, mask = x[:, None], torch.ones(32, 1, dtype=torch.bool)
    # nothing known -> 0, and an unknown image never enters the loss
    assert float(m.auxiliary_loss(images, mask, torch.full((32, 1), U_))) == 0.0
    opt = torch.optim.Adam(m.view_classifier.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = m.auxiliary_loss(images, mask, views[:, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    xt, vt = _synthetic_views(48, seed=1)
    held_out = [{"images": xt[i:i + 2], "view_mask": torch.tensor([True, i % 3 != 0]),
                 "view_types": torch.stack([vt[i], vt[i + 1] if i % 5 else torch.tensor(U_)])}
                for i in range(0, 48, 2)]
    assert view_classifier_accuracy(m, held_out, batch_size=8) > 0.9


@pytest.mark.parametrize("name,backbone", [("chexfusion_separate_test", "test_resnet"),
                                           ("chexfusion_split_test", "test_convnext")])
def test_stage2_starts_every_branch_from_the_stage1_backbone(tmp_path, name, backbone):
    ls = LabelSpace(("A", "B"), (5, 3), 10)
    s1 = create_model("single_test", backbone=backbone, num_labels=2)
    save_artefact(tmp_path / "s1", s1, model_name="single_test", label_space=ls)
    m = create_model(name, num_labels=2)
    init_backbone(m, tmp_path / "s1")
    ref = s1.backbone.state_dict()
    vb = m.backbone
    parts = ([vb.stem] if vb.stem is not None else []) + [vb.branches["frontal"], vb.branches["lateral"]]
    covered = set()
    for part in parts:
        for k, v in part.state_dict().items():
            assert torch.equal(v, ref[k]), k
            covered.add(k)
    assert covered == set(ref)
    if vb.stem is not None:  # the late stages really are in both branches
        assert any(k.startswith("stages.3") for k in vb.branches["lateral"].state_dict())
    # a view-specific stage 1 of the same layout passes on its branches and view classifier as they are;
    # one of another layout does not load
    other = create_model(name, num_labels=2)
    save_artefact(tmp_path / "same", other, model_name=name, label_space=ls)
    init_backbone(m, tmp_path / "same")
    for a, b in ((m.backbone, other.backbone), (m.view_classifier, other.view_classifier)):
        for k, v in b.state_dict().items():
            assert torch.equal(a.state_dict()[k], v), k
    if name == "chexfusion_split_test":
        sep = create_model("chexfusion_separate_test", backbone=backbone, num_labels=2)
        save_artefact(tmp_path / "sep", sep, model_name="chexfusion_separate_test", label_space=ls)
        with pytest.raises(ValueError, match="view_backbones='separate'"):
            init_backbone(m, tmp_path / "sep")


def test_view_specific_artefact_roundtrip(tmp_path):
    ls = LabelSpace(("A", "B", "C"), (5, 3, 1), 10)
    m = create_model("chexfusion_split_test", num_labels=3).eval()
    save_artefact(tmp_path / "a", m, model_name="chexfusion_split_test", label_space=ls)
    art = load_artefact(tmp_path / "a")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 32, 32, generator=g)
    mask, types = torch.ones(2, 4, dtype=torch.bool), torch.tensor([[0, 1, 2, 2], [2, 1, 0, 0]])
    with torch.inference_mode():
        torch.testing.assert_close(art.model(x, mask, types), m(x, mask, types))
