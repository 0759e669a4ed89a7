"""View-specific image encoders: frontal and lateral images through different backbone weights.

CheXFusion runs one backbone over every view. Frontal (PA/AP) and lateral radiographs look very
different, so here a study's frontal images go through a frontal branch and its lateral images through
a lateral branch:

  separate  two full copies of the timm backbone;
  split     one shared stem (timm's `stem` plus the first `split_stage` stages) feeding view-specific
            later stages, so low-level filters are learnt from every image and only the semantic
            stages specialise (and cost parameters, not compute: each image still runs one path).

Images whose view is unknown (view code 2, about 4% of CXR-LT) are routed by a small `ViewClassifier`
trained on the images whose view is known.
"""

from __future__ import annotations

import copy
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from cxrlt.views import VIEW_CODES

FRONTAL, LATERAL, UNKNOWN = VIEW_CODES["frontal"], VIEW_CODES["lateral"], VIEW_CODES["unknown"]
BRANCHES = ("frontal", "lateral")  # branch i serves view code i
MODES = ("shared", "separate", "split")


def stage_paths(backbone: nn.Module) -> list[str]:
    """Dotted names of a timm backbone's stages, in order, after its `stem`.

    Covers the models whose `forward_features` is stem -> stages -> tail: `stages` containers
    (ConvNeXt, ByobNet/RepVGG, NFNet, MaxViT/CoAtNet, MambaOut) and RegNet's `s1..sN`.
    """
    name = type(backbone).__name__
    stages = getattr(backbone, "stages", None)
    if isinstance(stages, (nn.Sequential, nn.ModuleList)) and len(stages):
        paths = [f"stages.{i}" for i in range(len(stages))]
    else:
        paths = [n for n, _ in backbone.named_children() if re.fullmatch(r"s\d+", n)]
    if not isinstance(getattr(backbone, "stem", None), nn.Module) or not paths:
        raise ValueError(
            f"view_backbones='split' needs a timm backbone with a `stem` and `stages` (convnext, regnet, "
            f"byobnet, nfnet, maxvit, ...); {name} has no such layout (resnet, efficientnet and vit do "
            "not). Use view_backbones='separate' for it, or a backbone with stages.")
    if list(backbone.named_parameters(recurse=False)) or list(backbone.named_buffers(recurse=False)):
        # weights held by the model itself (e.g. a position embedding) belong to no stage
        raise ValueError(f"view_backbones='split': {name} holds parameters outside its stem and stages")
    return paths


def _replace(module: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    holder = module.get_submodule(parent) if parent else module
    if isinstance(holder, (nn.Sequential, nn.ModuleList)):
        holder[int(leaf)] = new
    else:
        setattr(holder, leaf, new)


class ViewBackbones(nn.Module):
    """Frontal and lateral backbone branches built from one timm backbone (the template).

    Parameter names inside every part equal the template's, so one single-backbone state dict (a
    stage-1 artefact's) loads strictly into each part: see `load_shared_state`.
    """

    def __init__(self, template: nn.Module, mode: str, split_stage: int = 2):
        super().__init__()
        if mode not in ("separate", "split"):
            raise ValueError(f"ViewBackbones mode must be 'separate' or 'split', not {mode!r}")
        self.mode = mode
        self.num_features = template.num_features
        self.pretrained_cfg = dict(getattr(template, "pretrained_cfg", {}) or {})
        self.stem: nn.Module | None = None
        self.early_paths: list[str] = []
        if mode == "split":
            paths = stage_paths(template)
            if not 0 <= split_stage < len(paths):
                raise ValueError(f"split_stage must be in [0, {len(paths) - 1}] for {type(template).__name__} "
                                 f"({len(paths)} stages; at least one stage must stay view-specific), "
                                 f"got {split_stage}")
            self.early_paths = ["stem"] + paths[:split_stage]
            # shared part: the template with everything after the split point removed
            stem = copy.deepcopy(template)
            keep = {"stem"} | {p.split(".")[0] for p in paths}  # `stages`, or RegNet's s1..sN
            for name, _ in list(template.named_children()):
                if name not in keep:
                    _replace(stem, name, nn.Identity())
            for p in paths[split_stage:]:
                _replace(stem, p, nn.Identity())
            self.stem = stem
            # late part: the template with the shared modules made pass-through, so its own
            # forward_features (stem -> stages -> tail) runs only the view-specific modules
            for p in self.early_paths:
                _replace(template, p, nn.Identity())
        # template (pretrained weights included) -> both branches start identical
        self.branches = nn.ModuleDict({BRANCHES[0]: template, BRANCHES[1]: copy.deepcopy(template)})

    def shared_features(self, x: torch.Tensor) -> torch.Tensor:
        """The shared stem's output (split), or the input itself (separate)."""
        if self.stem is None:
            return x
        for p in self.early_paths:
            x = self.stem.get_submodule(p)(x)
        return x

    def forward_features(self, x: torch.Tensor, routes: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, C, H, W], routes [N] (0 frontal, 1 lateral) -> feature maps [N, num_features, h, w].

        `routes=None` sends every image through the frontal branch (same cost; for timing only).
        Each image runs only its own branch, so its features never depend on the other images.
        """
        if routes is None:
            routes = torch.full(x.shape[:1], FRONTAL, dtype=torch.long, device=x.device)
        if routes.shape != x.shape[:1]:
            raise ValueError(f"routes {tuple(routes.shape)} must have one entry per image ({x.shape[0]})")
        if bool(((routes != FRONTAL) & (routes != LATERAL)).any()):
            raise ValueError("routes must be 0 (frontal) or 1 (lateral); resolve unknown views first")
        h = self.shared_features(x)
        out = None
        for code, name in enumerate(BRANCHES):
            sel = routes == code
            if not bool(sel.any()):
                continue  # a branch with no image in the batch does not run
            f = self.branches[name].forward_features(h[sel])
            if out is None:
                out = f.new_zeros(x.shape[0], *f.shape[1:])
            out[sel] = f
        return out

    def path_modules(self, view: int) -> list[nn.Module]:
        """The modules an image of view code `view` passes through (shared stem first, if any)."""
        return ([self.stem] if self.stem is not None else []) + [self.branches[BRANCHES[view]]]

    def load_shared_state(self, state: dict[str, torch.Tensor]) -> None:
        """Start every part from one single-backbone state dict (e.g. a stage-1 artefact's).

        Each part is loaded strictly with the keys it holds; every key of `state` must land somewhere,
        so a mismatch raises instead of leaving weights silently at their initial values.
        """
        parts = ([self.stem] if self.stem is not None else []) + list(self.branches.values())
        used: set[str] = set()
        for part in parts:
            keys = set(part.state_dict())
            missing = sorted(keys - set(state))
            if missing:
                raise ValueError(f"backbone weights lack {len(missing)} key(s) of a branch, e.g. {missing[:3]}")
            part.load_state_dict({k: state[k] for k in keys}, strict=True)
            used |= keys
        unused = sorted(set(state) - used)
        if unused:
            raise ValueError(f"{len(unused)} backbone weight(s) fit no branch, e.g. {unused[:3]}")


class ViewClassifier(nn.Module):
    """Frontal (0) vs lateral (1) from the image downsampled to `size` x `size` grayscale.

    Why a tiny CNN on the image rather than a linear head on pooled shared-stem features: it works the
    same for `separate` (which has no shared stem) and `split`; it keeps training when the backbone is
    frozen and does not drift when the stem is fine-tuned; and the view is a coarse, global property
    (lung fields side by side vs. one profile with the spine at the back) that 64 px show well, where a
    stem's early features are local and pooling them throws away exactly that layout. The last map is
    pooled to 4x4, not to 1x1, to keep the layout. No batch norm: a prediction depends on its image only.
    """

    def __init__(self, size: int = 64, width: int = 16):
        super().__init__()
        if size < 16:
            raise ValueError(f"view_classifier_size must be at least 16 px, got {size}")
        self.size = size
        layers, c_in = [], 1
        for c in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(1, c), nn.GELU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.grid = 4
        self.fc = nn.Linear(c_in * self.grid * self.grid, len(BRANCHES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W] (the model's normalised input) -> logits [N, 2]."""
        x = images.float().mean(1, keepdim=True)  # the channels are one grayscale image
        x = F.adaptive_avg_pool2d(x, self.size)
        x = F.adaptive_avg_pool2d(self.features(x), self.grid)
        return self.fc(x.flatten(1))


@torch.inference_mode()
def view_classifier_accuracy(model: nn.Module, dataset, batch_size: int = 64, num_workers: int = 0) -> float:
    """Share of real images with a known view (frontal/lateral) in `dataset` whose view the model's
    classifier predicts correctly; NaN when the dataset has no such image."""
    from torch.utils.data import DataLoader

    if not hasattr(model, "predict_views"):
        raise ValueError(f"{type(model).__name__} with view_backbones='shared' has no view classifier")
    device = next(model.parameters()).device
    correct = total = 0
    for b in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        images, mask, types = (b[k].to(device) for k in ("images", "view_mask", "view_types"))
        known = mask.bool() & (types != UNKNOWN)
        if not bool(known.any()):
            continue
        pred = model.predict_views(images, mask)
        correct += int((pred[known] == types[known]).sum())
        total += int(known.sum())
    return correct / total if total else math.nan
