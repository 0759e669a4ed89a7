"""Multi-label losses for long-tailed chest X-ray classification (reference notes §5).

Every loss is an `nn.Module` called as `loss(logits, targets, mask=None)`:
- `logits`, `targets`: [B, L]; targets are 0/1 (soft values in [0, 1] also work, every formula is linear
  in y); a target of -1 means "unknown".
- `mask`: optional [B, L], 1/True = labelled. Unknown targets and masked elements contribute nothing, and
  with `reduction="mean"` the average is taken over the labelled elements only, so a batch's loss does
  not shrink because some of its labels are missing.

Class weights (weighted BCE, CheXFusion's asymmetric focal loss) are
    w = y * exp(1 - f_c) + (1 - y) * exp(f_c),   f_c = n_c / N,
with n_c and N the counts of the training split actually used. They are never pasted constants: they
come in through `create_loss(..., class_counts=, n_train=)` or `create_loss(..., label_space=)`.

The defaults reproduce the published settings (and the golden values in the reference notes):
    bce   mean
    wbce  mean, class-weighted
    asl   sum,  gamma_neg=4, gamma_pos=1, clip=0.05, focusing weight detached (Ridnik et al.'s
          `AsymmetricLoss` class and training script detach it; their "optimized" twin does not)
    afl   mean, class-weighted ASL terms, gamma_neg=4, gamma_pos=1, clip=0.05
    ral   sum,  gamma_neg=4, gamma_pos=0, clip=0.05, lamb=1.5, epsilon_pos=1, epsilon_pos_pow=-2.5,
          epsilon_neg=0, focusing weight not detached (as the RAL authors' class)
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["create_loss", "list_losses", "register_loss", "class_frequencies",
           "class_aware_sampler_weights", "MultiLabelLoss", "BCELoss", "AsymmetricLoss", "RobustAsymmetricLoss"]

_REDUCTIONS = ("sum", "mean")


def class_frequencies(class_counts: Sequence[int], n_train: int | None) -> torch.Tensor:
    """f_c = n_c / N from the training split's positive counts and its number of training images."""
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {counts.shape}")
    if n_train is None or n_train <= 0:
        raise ValueError("n_train (the number of training images the counts were taken from) must be a "
                         f"positive number to turn class_counts into frequencies; got {n_train!r}")
    if (counts < 0).any() or (counts > n_train).any():
        raise ValueError(f"class_counts must lie in [0, n_train={n_train}]; got min {counts.min()}, "
                         f"max {counts.max()}")
    # float64 so the weights are exact; they are cast to the logits' dtype at each call.
    return torch.as_tensor(counts / n_train, dtype=torch.float64)


def _safe_pow(base: torch.Tensor, gamma: float) -> torch.Tensor:
    """base ** gamma for base >= 0 whose gradient stays finite where base == 0 (even for gamma < 1)."""
    if gamma == 0:
        return torch.ones_like(base)
    positive = base > 0
    # The double `where` keeps 0 ** (gamma - 1) = inf out of the backward pass.
    safe = torch.where(positive, base, torch.ones_like(base))
    return torch.where(positive, safe.pow(gamma), torch.zeros_like(base))


class MultiLabelLoss(nn.Module):
    """Shared masking, class weighting and reduction; subclasses give the per-element loss."""

    def __init__(self, class_freq: torch.Tensor | None = None, class_weighted: bool = False,
                 reduction: str = "mean"):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.class_weighted = bool(class_weighted)
        if self.class_weighted:
            if class_freq is None:
                raise ValueError(f"{type(self).__name__} with class weights needs the per-label positive "
                                 "counts of the training split: pass class_counts= and n_train= (or "
                                 "label_space=) to create_loss")
            # Buffers, not attributes: they follow `.to(device)` and are saved with the state dict.
            self.register_buffer("pos_weight", torch.exp(1.0 - class_freq))
            self.register_buffer("neg_weight", torch.exp(class_freq))
        else:
            self.pos_weight = None
            self.neg_weight = None

    def elementwise(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if logits.shape != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
        if logits.dtype in (torch.float16, torch.bfloat16):
            # Under mixed precision: eps = 1e-8 underflows in half precision and the sum loses digits.
            logits = logits.float()
        targets = targets.to(logits.dtype)
        labelled = targets >= 0
        if mask is not None:
            if mask.shape != logits.shape:
                raise ValueError(f"mask {tuple(mask.shape)} must have the logits' shape {tuple(logits.shape)}")
            labelled = labelled & mask.to(torch.bool)
        # Unknown targets become 0 so every element's loss is finite; `where` then drops them.
        y = torch.where(labelled, targets, torch.zeros_like(targets))
        loss = self.elementwise(logits, y)
        if self.class_weighted:
            n_labels = logits.shape[-1]
            if self.pos_weight.numel() != n_labels:
                raise ValueError(f"the loss was built for {self.pos_weight.numel()} labels (class_counts) "
                                 f"but the logits have {n_labels}")
            pw = self.pos_weight.to(logits.dtype)
            nw = self.neg_weight.to(logits.dtype)
            loss = loss * (y * pw + (1 - y) * nw)
        loss = torch.where(labelled, loss, torch.zeros_like(loss))
        total = loss.sum()
        if self.reduction == "mean":
            total = total / labelled.sum().clamp_min(1).to(total.dtype)
        return total

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, class_weighted={self.class_weighted}"


class BCELoss(MultiLabelLoss):
    """Binary cross-entropy on logits (optionally class-weighted = "weighted BCE")."""

    def elementwise(self, logits, y):
        # torch's logits version is the stable log-sum-exp form; no clamping needed.
        return F.binary_cross_entropy_with_logits(logits, y, reduction="none")


class AsymmetricLoss(MultiLabelLoss):
    """ASL (Ridnik et al., 2021): -[y (1-p)^g+ log p + (1-y) p_m^g- log(1-p_m)], p_m = max(p - m, 0).

    With `class_weighted=True` and `reduction="mean"` this is CheXFusion's asymmetric focal loss.
    """

    def __init__(self, class_freq=None, class_weighted=False, reduction="sum", gamma_pos=1.0,
                 gamma_neg=4.0, clip=0.05, eps=1e-8, detach_focal=True):
        super().__init__(class_freq, class_weighted, reduction)
        if gamma_pos < 0 or gamma_neg < 0:
            raise ValueError(f"gamma_pos and gamma_neg must be >= 0, got {gamma_pos}, {gamma_neg}")
        if not 0 <= (clip or 0) < 1:
            raise ValueError(f"clip (probability margin) must be in [0, 1), got {clip}")
        if not 0 < eps < 1:
            raise ValueError(f"eps (log clamp) must be in (0, 1), got {eps}")
        self.gamma_pos, self.gamma_neg = float(gamma_pos), float(gamma_neg)
        self.clip, self.eps, self.detach_focal = float(clip or 0.0), float(eps), bool(detach_focal)

    def _parts(self, logits):
        """log p, 1-p, p_m and log(1-p_m), each computed in a form that stays finite at large |x|."""
        log_eps = math.log(self.eps)
        # log max(p, eps) == max(log p, log eps): log-sigmoid avoids computing 1 - p for large negatives.
        log_p = F.logsigmoid(logits).clamp_min(log_eps)
        one_minus_p = torch.sigmoid(-logits)
        if self.clip > 0:
            q = (one_minus_p + self.clip).clamp(max=1.0)  # 1 - p_m, never below the margin
            log_q = torch.log(q.clamp_min(self.eps))
            p_m = (torch.sigmoid(logits) - self.clip).clamp_min(0.0)
        else:
            q = one_minus_p
            log_q = F.logsigmoid(-logits).clamp_min(log_eps)
            p_m = torch.sigmoid(logits)
        return log_p, one_minus_p, p_m, q, log_q

    def _focus(self, one_minus_p, p_m):
        w_pos = _safe_pow(one_minus_p, self.gamma_pos)
        w_neg = _safe_pow(p_m, self.gamma_neg)
        if self.detach_focal:
            w_pos, w_neg = w_pos.detach(), w_neg.detach()
        return w_pos, w_neg

    def elementwise(self, logits, y):
        log_p, one_minus_p, p_m, _, log_q = self._parts(logits)
        w_pos, w_neg = self._focus(one_minus_p, p_m)
        return -(y * w_pos * log_p + (1 - y) * w_neg * log_q)

    def extra_repr(self):
        return (f"{super().extra_repr()}, gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, "
                f"clip={self.clip}, eps={self.eps}, detach_focal={self.detach_focal}")


class RobustAsymmetricLoss(AsymmetricLoss):
    """RAL (Park et al., 2023): ASL with Taylor-expanded positive term and a Hill-like negative weight.

    positives: log p + e+ (1-p) + (e+p / 2)(1-p)^2, weighted (1-p)^g+
    negatives: [log(1-p_m) + e- (1-p_m)] (lamb - p) p^2 (lamb - (1-p_m)), weighted p_m^g-
    """

    def __init__(self, class_freq=None, class_weighted=False, reduction="sum", gamma_pos=0.0,
                 gamma_neg=4.0, clip=0.05, eps=1e-8, detach_focal=False, lamb=1.5, epsilon_pos=1.0,
                 epsilon_pos_pow=-2.5, epsilon_neg=0.0):
        super().__init__(class_freq, class_weighted, reduction, gamma_pos, gamma_neg, clip, eps,
                         detach_focal)
        self.lamb, self.epsilon_pos = float(lamb), float(epsilon_pos)
        self.epsilon_pos_pow, self.epsilon_neg = float(epsilon_pos_pow), float(epsilon_neg)

    def elementwise(self, logits, y):
        log_p, one_minus_p, p_m, q, log_q = self._parts(logits)
        p = torch.sigmoid(logits)
        pos = log_p + self.epsilon_pos * one_minus_p + 0.5 * self.epsilon_pos_pow * one_minus_p ** 2
        neg = (log_q + self.epsilon_neg * q) * (self.lamb - p) * p ** 2 * (self.lamb - q)
        w_pos, w_neg = self._focus(one_minus_p, p_m)
        return -(y * w_pos * pos + (1 - y) * w_neg * neg)

    def extra_repr(self):
        return (f"{super().extra_repr()}, lamb={self.lamb}, epsilon_pos={self.epsilon_pos}, "
                f"epsilon_pos_pow={self.epsilon_pos_pow}, epsilon_neg={self.epsilon_neg}")


# ---------------------------------------------------------------------------------------------------
# Registry: name -> factory(class_freq, **params). Factories fix what makes each named loss what it is
# (weighting, defaults); everything else is a keyword option.
_LOSSES: dict[str, Callable[..., nn.Module]] = {}


def register_loss(name: str):
    def deco(fn):
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        _LOSSES[name] = fn
        return fn
    return deco


def list_losses() -> list[str]:
    return sorted(_LOSSES)


@register_loss("bce")
def _bce(class_freq, reduction="mean"):
    return BCELoss(class_freq, class_weighted=False, reduction=reduction)


@register_loss("wbce")
def _wbce(class_freq, reduction="mean"):
    return BCELoss(class_freq, class_weighted=True, reduction=reduction)


@register_loss("asl")
def _asl(class_freq, reduction="sum", gamma_pos=1.0, gamma_neg=4.0, clip=0.05, eps=1e-8,
         detach_focal=True, class_weighted=False):
    return AsymmetricLoss(class_freq, class_weighted, reduction, gamma_pos, gamma_neg, clip, eps, detach_focal)


@register_loss("afl")
def _afl(class_freq, reduction="mean", gamma_pos=1.0, gamma_neg=4.0, clip=0.05, eps=1e-8,
         detach_focal=True):
    return AsymmetricLoss(class_freq, True, reduction, gamma_pos, gamma_neg, clip, eps, detach_focal)


@register_loss("ral")
def _ral(class_freq, reduction="sum", gamma_pos=0.0, gamma_neg=4.0, clip=0.05, eps=1e-8,
         detach_focal=False, lamb=1.5, epsilon_pos=1.0, epsilon_pos_pow=-2.5, epsilon_neg=0.0,
         class_weighted=False):
    return RobustAsymmetricLoss(class_freq, class_weighted, reduction, gamma_pos, gamma_neg, clip, eps,
                                detach_focal, lamb, epsilon_pos, epsilon_pos_pow, epsilon_neg)


def create_loss(name: str, class_counts: Sequence[int] | None = None, n_train: int | None = None, *,
                label_space=None, **params) -> nn.Module:
    """Build a registered loss. Counts (or a LabelSpace) are those of the training split actually used.

    Unweighted losses accept counts and ignore them, so a caller can always pass them.
    """
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(list_losses())}")
    if label_space is not None:
        if class_counts is not None or n_train is not None:
            raise ValueError("give either label_space= or class_counts=/n_train=, not both")
        class_counts, n_train = label_space.counts, label_space.n_train
    freq = None
    if class_counts is not None:
        freq = class_frequencies(class_counts, n_train)
    factory = _LOSSES[name]
    accepted = [p for p in inspect.signature(factory).parameters if p != "class_freq"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"loss {name!r} has no option(s) {unknown}; its options are {accepted}")
    return factory(freq, **params)


_ROWS = 4096


def class_aware_sampler_weights(targets: np.ndarray) -> np.ndarray:
    """Per-sample weights for class-aware balanced sampling (for torch's WeightedRandomSampler).

    Class-aware sampling draws a label uniformly, then a sample uniformly among that label's positives.
    A sample's probability of being drawn is then proportional to sum over its positive labels of
    1 / n_c, which is the weight returned here, so each label is drawn about equally often (exactly so
    without co-occurrence). Samples with no positive label (unknown targets, -1, count as not positive)
    are treated as one more class: together they are drawn as often as an average label, instead of
    never (weight 0) or swamping the rare labels (weight 1 each). Labels without positives are skipped.
    The weights sum to 1.
    """
    t = np.asarray(targets)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"targets must be a non-empty [N, L] array, got shape {t.shape}")
    pos = t > 0.5
    counts = pos.sum(axis=0)
    inv = np.divide(1.0, counts, out=np.zeros(counts.shape, dtype=np.float64), where=counts > 0)
    # By blocks of rows: a float64 copy of the whole [N, L] (75 MB for CXR-LT's training set) would leave
    # the cache, and each row's sum is the same dot product either way.
    w = np.empty(len(pos))
    for lo in range(0, len(pos), _ROWS):
        np.matmul(pos[lo:lo + _ROWS].astype(np.float64), inv, out=w[lo:lo + _ROWS])
    empty = ~pos.any(axis=1)
    if empty.any():
        w[empty] = 1.0 / empty.sum()
    total = w.sum()
    return w / total
