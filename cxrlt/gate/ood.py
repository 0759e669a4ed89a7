"""Out-of-distribution score on the model's own features: is this image like the chest radiographs the model
was trained on?

Input. The image at the model's size with its grey levels matched to the training images' histogram: every
pixel's mid-rank in its own image (0..1) is mapped through `reference`, the mean quantile function of the
training images. A mid-rank does not change under any increasing map of the grey levels, so the score is
the same for the same radiograph exported at another bit depth, window, gamma or contrast; matching (rather
than plain equalisation) keeps flat regions as flat as the training images have them, instead of stretching
their noise. A negative (polarity inverted) image is NOT made equal to its positive; a DICOM MONOCHROME1 file
is inverted by the reader before it gets here. The model's own input is not normalised this way, which is why
the gate runs its own backbone pass rather than sharing the prediction's.

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
image is refused with probability at most `frr` (see `fit_gate`). Stored per model artefact as eval/gate.json
(what it is, threshold, counts, the reference) and eval/gate.safetensors (centres and whitening matrix).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cxrlt.artefact.meta import replacing, write_text

from cxrlt.data.images import to_grayscale
from cxrlt.data.transforms import IMAGENET_MEAN, IMAGENET_STD

GATE_JSON, GATE_TENSORS = "gate.json", "gate.safetensors"
FEATURE = "stages_avgpool_histmatched"
FORMAT = 1
QUANTILES = np.linspace(0.0, 1.0, 257)
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


class GateError(RuntimeError):
    """A gate that cannot be fitted or read; the message says what to do."""


def feature_name(model) -> str:
    """What `features` computes for this model (stored with the gate and checked when it is loaded)."""
    return FEATURE if model.stage_modules() else "last_stage_avgpool_histmatched"


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


def gate_tensor(img: Image.Image, size: int, reference: np.ndarray, invert: bool = False) -> torch.Tensor:
    """A PIL image -> the gate's normalised input [3, size, size] (`invert`: its negative, for the hint)."""
    a = grey_at(img, size)
    if invert:
        a = 255 - a
    x = torch.from_numpy(match_reference(a, reference).astype(np.float32) / 255.0)
    return (x.unsqueeze(0).expand(3, -1, -1) - _MEAN) / _STD


@torch.no_grad()
def features(model, images: Sequence[Image.Image], view_codes: Sequence[int] | None, size: int,
             reference: np.ndarray, device="cpu", batch_size: int = 64, invert: bool = False) -> np.ndarray:
    """Pooled backbone features [N, F] of the images' gate inputs, each image on its own (model in eval)."""
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
    reference: np.ndarray        # [257] mean quantile function of the training images (grey levels)
    threshold: float             # scores above it are refused
    frr: float                   # target false-rejection rate of genuine images
    image_size: int
    feature: str = FEATURE
    n_train: int = 0
    n_val: int = 0
    val_frr: float = 0.0         # the share of validation images above the threshold (< frr)
    shrinkage: float = 0.0
    extra: dict = field(default_factory=dict)

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
        rec = {k: v for k, v in asdict(self).items() if k not in ("centres", "whiten", "reference")}
        return {"format": FORMAT, **rec, "groups": list(self.groups), "n_features": int(self.centres.shape[1]),
                "score": "Mahalanobis distance to the nearest view centre (Ledoit-Wolf shrunk covariance) of "
                         "the pooled backbone features of the histogram-matched image",
                "reference": [round(float(v), 3) for v in self.reference]}

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # replaced whole, never written in place: `cxrlt gate` refits the gate of a model whose eval/ may be
        # hard-linked into DVC's cache (cxrlt.artefact.meta.replacing)
        with replacing(folder / GATE_TENSORS) as tmp:
            save_file({"centres": torch.from_numpy(self.centres.astype(np.float32)).contiguous(),
                       "whiten": torch.from_numpy(self.whiten.astype(np.float32)).contiguous()}, str(tmp))
        write_text(folder / GATE_JSON, json.dumps(self.describe(), indent=2))
        return folder / GATE_JSON

    @classmethod
    def load(cls, folder: str | Path) -> "OODGate | None":
        """The gate stored in `folder` (an artefact's eval/), or None when there is none."""
        folder = Path(folder)
        if not (folder / GATE_JSON).exists():
            return None
        rec = json.loads((folder / GATE_JSON).read_text())
        if rec.get("format") != FORMAT or not (folder / GATE_TENSORS).exists():
            raise GateError(f"{folder / GATE_JSON}: unreadable gate (format {rec.get('format')}, or "
                            f"{GATE_TENSORS} missing); recalibrate it with `cxrlt gate`")
        t = load_file(str(folder / GATE_TENSORS))
        keep = {k: rec[k] for k in ("threshold", "frr", "image_size", "feature", "n_train", "n_val", "val_frr",
                                    "shrinkage", "extra") if k in rec}
        return cls(t["centres"].double().numpy(), t["whiten"].double().numpy(), tuple(rec["groups"]),
                   np.asarray(rec["reference"], dtype=np.float64), **keep)


def conformal_rank(n_val: int, frr: float) -> int:
    """k: the threshold is the (k+1)-th largest of n validation scores, k + 1 = floor(frr (n + 1)). For a new
    image exchangeable with the validation images, P(score > threshold) = (k + 1) / (n + 1) <= frr (averaged
    over validation draws; the rate given one draw is Beta(k + 1, n - k) distributed)."""
    k = math.floor(frr * (n_val + 1)) - 1
    if k < 0:
        raise GateError(f"an frr of {frr} needs at least {math.ceil(1 / frr) - 1} validation images to place the "
                        f"threshold (there are {n_val}); use a larger frr or more validation data")
    return k


def fit_gate(train_features, train_groups, val_features, reference, frr: float = 0.01, image_size: int = 0,
             min_group: int = 10, feature: str = FEATURE) -> OODGate:
    """Fit centres and shrunk covariance on training features, the threshold on validation features.

    train_groups: a view name per training image ("frontal", "lateral", "unknown"). Centres are fitted for the
    named views with at least `min_group` images (not "unknown"); with none, one centre for all.
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
                   reference=np.asarray(reference, dtype=np.float64), threshold=0.0, frr=float(frr),
                   image_size=int(image_size), feature=feature, n_train=int(used.sum()), n_val=len(v),
                   shrinkage=float(lw.shrinkage_))
    val_scores = gate.score(v)
    gate.threshold = float(np.sort(val_scores)[len(v) - 1 - k])
    gate.val_frr = float((val_scores > gate.threshold).mean())
    return gate
