"""Losses: golden values of the reference notes §5, masking, gradients, options."""

import numpy as np
import pytest
import torch

from cxrlt.labels import LabelSpace
from cxrlt.losses import class_aware_sampler_weights, create_loss, list_losses

X = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]], dtype=torch.float64)
Y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
COUNTS = [100, 10, 1]
N_TRAIN = 1000

# Golden values from the reference notes §5 (x, y, counts, N above).
GOLDEN = [
    ("bce", {}, 0.3623585238),
    ("wbce", {}, 0.5953433868),
    ("asl", {}, 0.4538510301),
    ("asl", {"gamma_pos": 0}, 0.9300459211),
    ("afl", {}, 0.1771215590),
    ("ral", {}, 0.5650133213),
]


def test_registry_lists_every_loss():
    assert list_losses() == ["afl", "asl", "bce", "ral", "wbce"]


FOCAL = ("asl", "afl", "ral")
# The focusing weight's detachment changes gradients only, so every focal golden value holds both ways.
GOLDEN_CASES = GOLDEN + [(n, {**p, "detach_focal": d}, v) for n, p, v in GOLDEN if n in FOCAL
                         for d in (True, False)]


@pytest.mark.parametrize("name,params,expected", GOLDEN_CASES)
def test_golden_values(name, params, expected):
    loss = create_loss(name, class_counts=COUNTS, n_train=N_TRAIN, **params)
    assert loss(X, Y).item() == pytest.approx(expected, abs=1e-6)
    # float32, the training dtype, must agree too.
    assert loss(X.float(), Y.float()).item() == pytest.approx(expected, abs=1e-6)


def test_golden_via_label_space():
    ls = LabelSpace(names=("a", "b", "c"), counts=tuple(COUNTS), n_train=N_TRAIN)
    assert create_loss("afl", label_space=ls)(X, Y).item() == pytest.approx(0.1771215590, abs=1e-6)
    assert create_loss("wbce", label_space=ls)(X, Y).item() == pytest.approx(0.5953433868, abs=1e-6)


def test_unweighted_losses_ignore_counts():
    a = create_loss("asl")(X, Y)
    b = create_loss("asl", class_counts=COUNTS, n_train=N_TRAIN)(X, Y)
    assert a.item() == b.item()


@pytest.mark.parametrize("name", ["wbce", "afl"])
def test_weighted_losses_require_training_counts(name):
    with pytest.raises(ValueError, match="training split"):
        create_loss(name)


def test_counts_need_n_train_and_sane_values():
    with pytest.raises(ValueError, match="n_train"):
        create_loss("wbce", class_counts=COUNTS)
    with pytest.raises(ValueError, match=r"\[0, n_train"):
        create_loss("wbce", class_counts=[5, 2000, 1], n_train=N_TRAIN)
    with pytest.raises(ValueError, match="not both"):
        ls = LabelSpace(names=("a", "b", "c"), counts=tuple(COUNTS), n_train=N_TRAIN)
        create_loss("wbce", class_counts=COUNTS, n_train=N_TRAIN, label_space=ls)


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="unknown loss 'focal'.*asl"):
        create_loss("focal")
    with pytest.raises(ValueError, match="no option.*gama_neg"):
        create_loss("asl", gama_neg=2)
    with pytest.raises(ValueError, match="reduction"):
        create_loss("bce", reduction="none")


def test_label_count_mismatch_is_reported():
    loss = create_loss("wbce", class_counts=[1, 2], n_train=10)
    with pytest.raises(ValueError, match="2 labels.*3"):
        loss(X, Y)


@pytest.mark.parametrize("name", ["bce", "wbce", "asl", "afl", "ral"])
def test_reductions_sum_and_mean(name):
    s = create_loss(name, COUNTS, N_TRAIN, reduction="sum")(X, Y)
    m = create_loss(name, COUNTS, N_TRAIN, reduction="mean")(X, Y)
    assert s.item() == pytest.approx(m.item() * X.numel(), rel=1e-12)


@pytest.mark.parametrize("name", ["bce", "wbce", "asl", "afl", "ral"])
def test_mask_removes_elements(name):
    loss = create_loss(name, COUNTS, N_TRAIN)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    # Garbage in the masked positions must not matter, neither its logit nor its target.
    x2 = X.clone()
    x2[~mask] = 30.0
    y2 = Y.clone()
    y2[~mask] = 1 - y2[~mask]
    a, b = loss(X, Y, mask), loss(x2, y2, mask)
    assert a.item() == pytest.approx(b.item(), abs=1e-12)
    # -1 targets are the same as a mask.
    y3 = Y.clone()
    y3[~mask] = -1
    assert loss(X, y3).item() == pytest.approx(a.item(), abs=1e-12)
    # Mean reduction averages over labelled elements only: equal to evaluating the kept ones alone.
    keep = mask.flatten()
    alone = create_loss(name, COUNTS, N_TRAIN, reduction="sum")
    per_elem = []
    for i in range(X.numel()):
        m1 = torch.zeros(X.numel(), dtype=torch.bool)
        m1[i] = True
        per_elem.append(alone(X, Y, m1.view_as(mask)).item())
    per_elem = np.array(per_elem)
    expected = per_elem[keep.numpy()].sum()
    if loss.reduction == "mean":
        expected /= keep.sum().item()
    assert a.item() == pytest.approx(expected, rel=1e-10)
    # Masked elements receive exactly zero gradient.
    x = X.clone().requires_grad_(True)
    loss(x, Y, mask).backward()
    assert torch.all(x.grad[~mask] == 0)
    # (x = -3, y = 0 sits below the ASL margin, so its own gradient may legitimately be 0.)
    assert x.grad[mask].abs().sum() > 0


def test_fully_masked_batch_is_zero_and_differentiable():
    x = X.clone().requires_grad_(True)
    out = create_loss("afl", COUNTS, N_TRAIN)(x, torch.full_like(Y, -1))
    assert out.item() == 0.0
    out.backward()
    assert torch.all(x.grad == 0)


EXTREME_CASES = [(n, {}) for n in ("bce", "wbce")] + [
    (n, p) for n in FOCAL
    for p in ({}, {"detach_focal": False}, {"gamma_neg": 0.5, "gamma_pos": 0.5}, {"clip": 0})]


@pytest.mark.parametrize("name,params", EXTREME_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_finite_at_extreme_logits(name, params, dtype):
    x = torch.tensor([[50.0, -50.0, 50.0, -50.0, 0.0]], dtype=dtype, requires_grad=True)
    y = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]], dtype=dtype)
    out = create_loss(name, [1, 2, 3, 4, 5], 10, **params)(x, y)
    out.backward()
    assert torch.isfinite(out)
    assert torch.isfinite(x.grad).all()
    # The undecided positive (x = 0, y = 1) is pushed up. (At x = -50 the 1e-8 log clamp of the
    # ASL family legitimately zeroes the gradient, as in the reference implementations.)
    assert x.grad[0, 4] < 0


def test_detach_changes_gradient_not_value():
    for name, p in [("asl", {}), ("afl", {}), ("ral", {})]:
        a = create_loss(name, COUNTS, N_TRAIN, detach_focal=True, **p)
        b = create_loss(name, COUNTS, N_TRAIN, detach_focal=False, **p)
        xa, xb = X.clone().requires_grad_(True), X.clone().requires_grad_(True)
        va, vb = a(xa, Y), b(xb, Y)
        va.backward()
        vb.backward()
        assert va.item() == pytest.approx(vb.item(), abs=1e-12)
        assert not torch.allclose(xa.grad, xb.grad), name


def test_gradient_matches_finite_differences():
    x = X.clone().requires_grad_(True)
    loss = create_loss("ral", COUNTS, N_TRAIN)
    assert torch.autograd.gradcheck(lambda z: loss(z, Y), (x,))


def test_defaults_match_the_reference():
    asl, afl, ral = create_loss("asl"), create_loss("afl", COUNTS, N_TRAIN), create_loss("ral")
    assert (asl.gamma_neg, asl.gamma_pos, asl.clip, asl.reduction) == (4, 1, 0.05, "sum")
    assert (afl.gamma_neg, afl.gamma_pos, afl.clip, afl.reduction, afl.class_weighted) == (4, 1, 0.05, "mean", True)
    assert (ral.gamma_neg, ral.gamma_pos, ral.lamb, ral.reduction) == (4, 0, 1.5, "sum")
    assert create_loss("bce").reduction == "mean" and create_loss("wbce", COUNTS, N_TRAIN).reduction == "mean"


def test_weights_are_buffers_that_move_with_the_module():
    loss = create_loss("afl", COUNTS, N_TRAIN)
    names = dict(loss.named_buffers())
    assert set(names) == {"pos_weight", "neg_weight"}
    assert torch.allclose(names["pos_weight"], torch.exp(1 - torch.tensor([0.1, 0.01, 0.001], dtype=torch.float64)))
    loss = loss.to(torch.float32)  # e.g. for a device without float64; the loss still works
    assert loss.pos_weight.dtype == torch.float32
    assert loss(X.float(), Y.float()).item() == pytest.approx(0.1771215590, abs=1e-6)


def test_class_aware_sampler_balances_labels():
    rng = np.random.default_rng(0)
    n = 4000
    freq = np.array([0.5, 0.1, 0.01])
    t = (rng.random((n, 3)) < freq).astype(float)
    t[:5, 1] = -1  # unknown targets are not positives
    w = class_aware_sampler_weights(t)
    assert w.shape == (n,) and np.isclose(w.sum(), 1) and (w > 0).all()
    pos = t > 0.5
    draws_per_label = (w[:, None] * pos).sum(axis=0)
    # Each label (and the no-positive group) gets a quarter of the draws as "the drawn class"; a head
    # label also rides along on the others' draws (label 0 co-occurs with half of them), so it gets
    # about 1/4 + 1/2 * 1/2. Plain uniform sampling would be 50:1 between labels 0 and 2.
    empty_share = w[~pos.any(axis=1)].sum()
    assert empty_share == pytest.approx(0.25)
    assert draws_per_label[2] == pytest.approx(0.25, abs=0.02)
    assert draws_per_label[1] == pytest.approx(0.25, abs=0.05)
    assert draws_per_label[0] / draws_per_label[2] < 2.5
    # Without co-occurrence the balance is exact.
    t2 = np.zeros((13, 2))
    t2[:10, 0] = 1
    t2[10:12, 1] = 1
    w2 = class_aware_sampler_weights(t2)
    assert np.allclose([w2[:10].sum(), w2[10:12].sum(), w2[12]], 1 / 3)


def test_class_aware_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        class_aware_sampler_weights(np.zeros(5))


@pytest.mark.parametrize("name", ["asl", "afl", "ral"])
def test_half_precision_logits_are_computed_in_float32(name):
    loss = create_loss(name, COUNTS, N_TRAIN)
    x = X.to(torch.bfloat16).requires_grad_(True)
    out = loss(x, Y.to(torch.bfloat16))
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(loss(x.detach().double(), Y).item(), abs=1e-6)
    out.backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_class_aware_sampler_weights_by_blocks_equal_one_product():
    rng = np.random.default_rng(1)
    t = (rng.random((3 * 4096 + 17, 6)) < [0.4, 0.2, 0.05, 0.01, 0.001, 0.0]).astype(np.int8)
    t[rng.random(t.shape) < 0.05] = -1
    pos = t > 0.5
    counts = pos.sum(0)
    w = pos.astype(np.float64) @ np.divide(1.0, counts, out=np.zeros(6), where=counts > 0)
    w[~pos.any(1)] = 1.0 / (~pos.any(1)).sum()
    np.testing.assert_array_equal(class_aware_sampler_weights(t), w / w.sum())
