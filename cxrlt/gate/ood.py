"""Out-of-distribution score on the model's own features: is this image like the chest radiographs the model
was trained on?

Input: two gates, the second deciding only what the first refuses (input "model+matched", `calibrate`).
  model    the model's own normalised input. The prediction's backbone pass returns these features beside the
           logits (`CheXFusion.forward_with_features`, `Predictor.predict_gated`), so an image the first gate
           accepts crosses the backbone once.
  matched  the image at the model's size with its grey levels matched to the training images' histogram:
           every pixel's mid-rank in its own image (0..1) mapped through `reference`, the mean quantile
           function of the training images. A mid-rank does not change under any increasing map of the grey
           levels, so this score is the same for the same radiograph exported at another bit depth, window,
           gamma or contrast; matching (rather than plain equalisation) keeps flat regions as flat as the
           training images have them. A backbone pass of its own, run only for images over the first threshold.
An image is refused when both scores are over their thresholds, so genuine images are refused at most at the
matched gate's rate, and what the model-input gate refuses (noise, photographs, other body parts) is refused
unless the matched gate accepts it. Why two (bench/bench_gate.py on the demo): the model-input gate alone
refused 49-100% of the same radiographs re-exported with another window, gamma, contrast or bit depth; fitting
it on re-graded copies of the training images instead let half the noise images and 85% of the knees through;
the matched gate alone costs every image a second backbone pass. A negative (polarity inverted) image is NOT
made equal to its positive; a DICOM MONOCHROME1 file is inverted by the reader before it gets here. Gates of
earlier versions (gate.json format 1) are matched gates alone and still work, at a second pass per image;
`cxrlt gate` refits them.

Features. `CheXFusion.image_features`: the average-pooled output of every backbone stage, stem to last,
concatenated, one vector per image (through the image's own branch of a view-specific backbone). Early stages
see grey-level texture and edges, late ones anatomy; on the demo the last stage alone let about half of the
synthetic knee radiographs through, all stages none (bench/bench_gate.py).

Score. A Mahalanobis distance (Lee et al., NeurIPS 2018, with the views as classes): features standardised by
the training images' mean and standard deviation (floored at a hundredth of the median, so a unit that barely
moves in training cannot dominate); one centre per view (frontal, lateral) among the training images whose
view is known and one covariance of the residuals from those centres, shrunk with Ledoit-Wolf (tens to
thousands of features from a few thousand images); score = the distance to the NEAREST centre, so an image of
unknown view is measured against both.

Threshold. A rank of the VALIDATION images' scores (never seen by the fit), placed so that a new genuine
image is refused with probability at most `frr` (see `fit_gate`); each gate has its own. Stored per model
artefact as eval/gate.json (format 2: what it is, its `input`, threshold, counts, the reference of a matched
gate, the `fallback` gate's record) and eval/gate.safetensors (centres and whitening matrices).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cxrlt.artefact.meta import replacing, write_text

from cxrlt.data.images import to_grayscale
from cxrlt.data.transforms import IMAGENET_MEAN, IMAGENET_STD, image_to_tensor

GATE_JSON, GATE_TENSORS = "gate.json", "gate.safetensors"
FEATURE = "stages_avgpool"
FORMAT = 2                     # 1: gates of earlier versions, all on histogram-matched images (input "matched")
MODEL_INPUT, MATCHED = "model", "matched"
CASCADE = "model+matched"      # what `calibrate` fits by default: a "model" gate with a "matched" fallback
QUANTILES = np.linspace(0.0, 1.0, 257)
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


class GateError(RuntimeError):
    """A gate that cannot be fitted or read; the message says what to do."""


def feature_name(model, input: str = MODEL_INPUT) -> str:
    """What `features` computes for this model from this input (stored with the gate, checked on loading)."""
    name = FEATURE if model.stage_modules() else "last_stage_avgpool"
    return name + "_histmatched" if input == MATCHED else name


# ------------------------------------------------------------------ the gate's input
def grey_at(img: Image.Image, size: int) -> np.ndarray:
    """uint8 [size, size]: grey, resized exactly as `image_to_tensor` resizes for the model."""
    img = to_grayscale(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def image_quantiles(a: np.ndarray) -> np.ndarray:
    """The grey levels at `QUANTILES` of one image (its quantile function, 257 points)."""
    return np.quantile(a, QUANTILES)


def mid_ranks(a: np.ndarray) -> np.ndarray:
    """Each pixel's mid-rank in its image, 0..1 (ties share the middle of their ranks)."""
    h = np.bincount(a.ravel(), minlength=256).astype(np.float64)
    c = np.cumsum(h)
    return ((c - h / 2) / c[-1])[a]


def match_reference(a: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Grey levels (float, 0..255) whose histogram is the reference's, in the order of `a`'s pixels."""
    return np.interp(mid_ranks(a), QUANTILES, reference)


def gate_tensor(img: Image.Image, size: int, reference: np.ndarray | None, invert: bool = False) -> torch.Tensor:
    """A PIL image -> the gate's normalised input [3, size, size]: the model's own input (`image_to_tensor`)
    when `reference` is None, else the histogram-matched image (gates of input "matched"). `invert`: its
    negative, for the hint."""
    a = grey_at(img, size)
    if invert:
        a = 255 - a
    if reference is None:
        return image_to_tensor(Image.fromarray(a, mode="L"), size)
    x = torch.from_numpy(match_reference(a, reference).astype(np.float32) / 255.0)
    return (x.unsqueeze(0).expand(3, -1, -1) - _MEAN) / _STD


@torch.no_grad()
def features(model, images: Sequence[Image.Image], view_codes: Sequence[int] | None, size: int,
             reference: np.ndarray | None = None, device="cpu", batch_size: int = 64,
             invert: bool = False) -> np.ndarray:
    """Pooled backbone features [N, F] of the images' gate inputs (the model's input; histogram-matched when
    `reference` is given), each image on its own (model in eval). A backbone pass of its own: the prediction
    gets the same features from its pass (`CheXFusion.forward_with_features`, `Predictor.predict_gated`)."""
    if model.training:
        raise GateError("the model is in training mode; call model.eval() first (BatchNorm statistics)")
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([gate_tensor(im, size, reference, invert) for im in images[i:i + batch_size]])
        vt = None if view_codes is None else torch.as_tensor(list(view_codes[i:i + batch_size]), dtype=torch.long)
        out.append(model.image_features(x.to(device), None if vt is None else vt.to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


# ------------------------------------------------------------------ the statistics
@dataclass
class OODGate:
    centres: np.ndarray          # [G, F] view centres in raw feature units
    whiten: np.ndarray           # [F, F]: score = || (x - centre) @ whiten ||, nearest centre
    groups: tuple[str, ...]      # the view of each centre
    reference: np.ndarray | None  # input "matched": [257] mean quantile function of the training images
    threshold: float             # scores above it are refused
    frr: float                   # target false-rejection rate of genuine images
    image_size: int
    feature: str = FEATURE
    input: str = MODEL_INPUT     # "model": the prediction's own input and pass; "matched": histogram-matched
    n_train: int = 0
    n_val: int = 0
    val_frr: float = 0.0         # the share of validation images above the threshold (< frr)
    shrinkage: float = 0.0
    extra: dict = field(default_factory=dict)
    fallback: "OODGate | None" = None  # input "model": the matched gate that decides the images this one refuses

    @property
    def decider(self) -> "OODGate":
        """The gate whose verdict stands for an image this one refuses (its fallback, else itself)."""
        return self.fallback if self.fallback is not None else self

    def score(self, feats) -> np.ndarray:
        """Features [N, F] -> Mahalanobis distance to the nearest view centre [N] (float64)."""
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.centres.shape[1]:
            raise GateError(f"features of shape {x.shape} do not match the gate's {self.centres.shape[1]} features")
        z = np.stack([(x - c) @ self.whiten for c in self.centres])    # [G, N, F]
        d = np.sqrt(np.einsum("gnf,gnf->gn", z, z)).min(0)
        return np.where(np.isfinite(d), d, np.inf)

    def describe(self) -> dict:
        """The JSON record: everything but the two matrices."""
        rec = {k: getattr(self, k) for k in ("threshold", "frr", "image_size", "feature", "input", "n_train",
                                              "n_val", "val_frr", "shrinkage", "extra")}
        image = "the histogram-matched image" if self.input == MATCHED else "the model's input (the prediction's pass)"
        out = {"format": FORMAT, **rec, "groups": list(self.groups), "n_features": int(self.centres.shape[1]),
               "score": "Mahalanobis distance to the nearest view centre (Ledoit-Wolf shrunk covariance) of "
                        f"the pooled backbone features of {image}"}
        if self.fallback is not None:
            out["fallback"] = {k: v for k, v in self.fallback.describe().items() if k != "format"}
            out["verdict"] = ("refused only when this score AND the fallback's (histogram-matched image, a backbone "
                              "pass of its own, run only for images over this threshold) are over their thresholds")
        if self.reference is not None:
            out["reference"] = [round(float(v), 3) for v in self.reference]
        return out

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {f"{prefix}centres": torch.from_numpy(self.centres.astype(np.float32)).contiguous(),
               f"{prefix}whiten": torch.from_numpy(self.whiten.astype(np.float32)).contiguous()}
        return {**out, **(self.fallback.tensors("fallback.") if self.fallback is not None else {})}

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # replaced whole, never written in place: `cxrlt gate` refits the gate of a model whose eval/ may be
        # hard-linked into DVC's cache (cxrlt.artefact.meta.replacing)
        with replacing(folder / GATE_TENSORS) as tmp:
            save_file(self.tensors(), str(tmp))
        write_text(folder / GATE_JSON, json.dumps(self.describe(), indent=2))
        return folder / GATE_JSON

    @classmethod
    def load(cls, folder: str | Path) -> "OODGate | None":
        """The gate stored in `folder` (an artefact's eval/), or None when there is none."""
        folder = Path(folder)
        if not (folder / GATE_JSON).exists():
            return None
        rec = json.loads((folder / GATE_JSON).read_text())
        if rec.get("format") not in (1, FORMAT) or not (folder / GATE_TENSORS).exists():
            raise GateError(f"{folder / GATE_JSON}: unreadable gate (format {rec.get('format')}, or "
                            f"{GATE_TENSORS} missing); recalibrate it with `cxrlt gate`")
        return cls.from_record(rec, load_file(str(folder / GATE_TENSORS)), folder / GATE_JSON)

    @classmethod
    def from_record(cls, rec: dict, t: dict, where, prefix: str = "") -> "OODGate":
        # format 1 (earlier versions) has no `input`: every such gate was fitted on histogram-matched images
        input = rec.get("input", MATCHED) if rec.get("format", FORMAT) == FORMAT else MATCHED
        if input not in (MODEL_INPUT, MATCHED) or (input == MATCHED and not rec.get("reference")):
            raise GateError(f"{where}: unknown gate input {input!r} (or no reference histogram); recalibrate it "
                            "with `cxrlt gate`")
        keep = {k: rec[k] for k in ("threshold", "frr", "image_size", "feature", "n_train", "n_val", "val_frr",
                                    "shrinkage", "extra") if k in rec}
        ref = np.asarray(rec["reference"], dtype=np.float64) if input == MATCHED else None
        fallback = cls.from_record(rec["fallback"], t, where, "fallback.") if rec.get("fallback") else None
        return cls(t[prefix + "centres"].double().numpy(), t[prefix + "whiten"].double().numpy(),
                   tuple(rec["groups"]), ref, input=input, fallback=fallback, **keep)


def conformal_rank(n_val: int, frr: float) -> int:
    """k: the threshold is the (k+1)-th largest of n validation scores, k + 1 = floor(frr (n + 1)). For a new
    image exchangeable with the validation images, P(score > threshold) = (k + 1) / (n + 1) <= frr (averaged
    over validation draws; the rate given one draw is Beta(k + 1, n - k) distributed)."""
    k = math.floor(frr * (n_val + 1)) - 1
    if k < 0:
        raise GateError(f"an frr of {frr} needs at least {math.ceil(1 / frr) - 1} validation images to place the "
                        f"threshold (there are {n_val}); use a larger frr or more validation data")
    return k


def fit_gate(train_features, train_groups, val_features, reference=None, frr: float = 0.01, image_size: int = 0,
             min_group: int = 10, feature: str = FEATURE) -> OODGate:
    """Fit centres and shrunk covariance on training features, the threshold on validation features.

    train_groups: a view name per training image ("frontal", "lateral", "unknown"). Centres are fitted for the
    named views with at least `min_group` images (not "unknown"); with none, one centre for all. `reference`:
    the histogram the features' images were matched to (input "matched"), None for the model's own input.
    """
    from sklearn.covariance import LedoitWolf

    if not 0 < frr < 1:
        raise ValueError(f"frr is the share of genuine images refused, between 0 and 1 (e.g. 0.01); got {frr}")
    x = np.asarray(train_features, dtype=np.float64)
    v = np.asarray(val_features, dtype=np.float64)
    groups = np.asarray([str(g) for g in train_groups])
    if len(x) < 20 or len(v) < 20:
        raise GateError(f"{len(x)} training and {len(v)} validation images: the gate needs at least 20 of each")
    k = conformal_rank(len(v), frr)
    mu, sd = x.mean(0), x.std(0)
    sd = np.maximum(sd, 0.01 * max(float(np.median(sd)), 1e-12))
    z = (x - mu) / sd
    names = [str(g) for g in sorted(set(groups)) if g != "unknown" and (groups == g).sum() >= min_group]
    member = np.stack([groups == g for g in names]) if names else np.ones((1, len(x)), bool)
    names = names or ["all"]
    centres = np.stack([z[m].mean(0) for m in member])
    used = member.any(0)
    resid = z[used] - centres[member[:, used].argmax(0)]
    lw = LedoitWolf(assume_centered=True).fit(resid)
    evals, evecs = np.linalg.eigh(lw.covariance_)
    wz = evecs / np.sqrt(np.maximum(evals, 1e-12))          # whitening of standardised features
    gate = OODGate(centres=mu + centres * sd, whiten=wz / sd[:, None], groups=tuple(names),
                   reference=None if reference is None else np.asarray(reference, dtype=np.float64),
                   threshold=0.0, frr=float(frr), image_size=int(image_size), feature=feature,
                   input=MODEL_INPUT if reference is None else MATCHED, n_train=int(used.sum()), n_val=len(v),
                   shrinkage=float(lw.shrinkage_))
    val_scores = gate.score(v)
    gate.threshold = float(np.sort(val_scores)[len(v) - 1 - k])
    gate.val_frr = float((val_scores > gate.threshold).mean())
    return gate
