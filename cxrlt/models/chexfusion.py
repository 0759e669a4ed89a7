"""CheXFusion-shaped networks: a timm backbone per view -> tokens -> fusion over a study's views ->
query-decoder head -> one logit per label. One class covers stage 1 (single image, `max_views=1`,
no fusion layers) and stage 2 (up to 4 views, fusion transformer).

Forward contract (public): `model(images [B,V,C,H,W], view_mask [B,V] bool, view_types [B,V] long | None)
-> logits [B, L]`. Only real images go through the backbone, so neither other studies of the batch nor
the content of masked slots can change a study's output (in eval mode).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from cxrlt.models.backbone import create_backbone
from cxrlt.models.fusion import StudyFusion, ViewTokenizer
from cxrlt.models.heads import QueryHead
from cxrlt.models.registry import register_model
from cxrlt.models.taps import StageTap
from cxrlt.models.views import BRANCHES, LATERAL, MODES, UNKNOWN, ViewBackbones, ViewClassifier


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "convnext_small.fb_in22k_ft_in1k"
    pretrained: str = ""            # "" random init, "cache", or a local weights file
    num_labels: int = 40
    max_views: int = 4
    d_model: int = 768
    token_stride: int = 2           # 2: 3x3 stride-2 token reduction (stage 2); 1: 1x1 projection
    fusion_layers: int = 2
    heads: int = 8
    ff_dim: int = 2048
    dropout: float = 0.1
    decoder_ff: int = 2048
    query: str = "learned"          # learned | text
    slot_embedding: bool = True
    view_embedding: bool = True
    tta_flip: bool = False          # average logits of the image and its horizontal flip at eval
    view_backbones: str = "shared"  # shared (one backbone, as CheXFusion) | separate | split (views.py)
    split_stage: int = 2            # split: stem + this many stages shared, later stages per view
    view_classifier_size: int = 64  # side of the downsampled image that routes unknown views


class CheXFusion(nn.Module):
    def __init__(self, cfg: ModelConfig, label_embeddings: torch.Tensor | None = None):
        super().__init__()
        self.config = cfg
        self.backbone, self.pretrained_source = create_backbone(cfg.backbone, cfg.pretrained)
        self.num_features = self.backbone.num_features  # width from the backbone, never a literal
        self.tokenizer = ViewTokenizer(self.num_features, cfg.d_model, cfg.token_stride)
        self.fusion = StudyFusion(cfg.d_model, cfg.max_views, cfg.fusion_layers, cfg.heads, cfg.ff_dim,
                                  cfg.dropout, cfg.slot_embedding, cfg.view_embedding)
        self.head = QueryHead(cfg.d_model, cfg.num_labels, cfg.heads, cfg.decoder_ff, cfg.dropout,
                              cfg.query, label_embeddings)

    @property
    def pretrained_cfg(self) -> dict:
        return dict(getattr(self.backbone, "pretrained_cfg", {}) or {})

    def encode_views(self, images: torch.Tensor, view_mask: torch.Tensor, routes: torch.Tensor | None = None,
                     pool: bool = False):
        """[B, V, C, H, W] -> per-view tokens [B, V, T, d]; empty slots stay zero and never run.
        `routes` [B, V] picks the branch of a view-specific backbone (see `route`). `pool`: -> (tokens, the
        pooled stage features of each real image from the same pass [B, V, F], zero in empty slots)."""
        b, v = view_mask.shape
        flat_mask = view_mask.reshape(-1)
        real = images.reshape(b * v, *images.shape[2:])[flat_mask]
        real_routes = None if routes is None else routes.reshape(-1)[flat_mask]
        feats, pooled = self.backbone_pass(real, real_routes, pool)
        tokens = self.tokenizer(feats)  # [N_real, T, d]
        out = tokens.new_zeros(b * v, *tokens.shape[1:])
        out[flat_mask] = tokens
        out = out.view(b, v, *tokens.shape[1:])
        if not pool:
            return out
        slots = pooled.new_zeros(b * v, pooled.shape[1])
        slots[flat_mask] = pooled
        return out, slots.view(b, v, -1)

    def backbone_pass(self, x: torch.Tensor, routes: torch.Tensor | None = None, pool: bool = False):
        """ONE backbone run over images [N, C, H, W] (routes [N] for a view-specific backbone) -> (last feature
        maps, pooled stage features [N, F] float32 tapped from that run (`StageTap`) when `pool`, else None)."""
        run = (lambda: self.backbone.forward_features(x)) if routes is None else (
            lambda: self.backbone.forward_features(x, routes))
        if not pool:
            return run(), None
        with StageTap(self.stage_parts()) as tap:
            last = run()
        return last, tap.features(x.shape[0], routes, last)

    def route(self, images: torch.Tensor, view_mask: torch.Tensor, view_types: torch.Tensor):
        """Backbone branch per slot; None: one shared backbone, nothing to route."""
        return None

    def stage_parts(self) -> list[tuple[int | None, list[nn.Module]]]:
        """The modules whose outputs the stage features pool, by part: (None, stages) for what every image
        runs (one backbone, or the shared stem of a split one), (route code, stages) for a view branch. The
        stages are those timm lists in `feature_info` (pass-through placeholders skipped)."""
        bb = self.backbone
        if isinstance(bb, ViewBackbones):
            parts = ([(None, bb.stem)] if bb.stem is not None else []) + [
                (code, bb.branches[name]) for code, name in enumerate(BRANCHES)]
        else:
            parts = [(None, bb)]
        out = []
        for route, part in parts:
            mods = [part.get_submodule(f["module"]) for f in getattr(part, "feature_info", None) or []]
            out.append((route, [m for m in mods if not isinstance(m, nn.Identity)]))
        return out

    def stage_modules(self) -> list[nn.Module]:
        """Every module of `stage_parts`, shared stem first."""
        return [m for _, mods in self.stage_parts() for m in mods]

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, view_types: torch.Tensor | None = None) -> torch.Tensor:
        """[N, C, H, W] (+ view codes [N], default unknown) -> [N, F] float32: the average-pooled output of
        every backbone stage (`stage_parts`, stem to last), concatenated; the last stage's alone for a
        backbone that lists none. Each image goes through the branch `forward` would route it to and never
        depends on the others (in eval mode: BatchNorm running statistics). The same features as
        `forward_with_features` returns beside the logits; this runs the backbone alone (the input gate's
        calibration and callers that only gate)."""
        n = images.shape[0]
        mask = torch.ones(n, 1, dtype=torch.bool, device=images.device)
        types = (torch.full((n, 1), UNKNOWN, dtype=torch.long, device=images.device) if view_types is None
                 else view_types.reshape(n, 1).long().to(images.device))
        routes = self.route(images[:, None], mask, types)
        return self.backbone_pass(images, None if routes is None else routes.reshape(-1), pool=True)[1]

    def forward_once(self, images, view_mask, view_types, label_embeddings=None, routes=None, pool=False):
        tokens = self.encode_views(images, view_mask, routes, pool)
        tokens, pooled = tokens if pool else (tokens, None)
        fused, pad = self.fusion(tokens, view_mask, view_types)
        logits = self.head(fused, pad, label_embeddings)
        return (logits, pooled) if pool else logits

    def forward(self, images: torch.Tensor, view_mask: torch.Tensor | None = None,
                view_types: torch.Tensor | None = None, label_embeddings: torch.Tensor | None = None):
        return self._run(images, view_mask, view_types, label_embeddings, pool=False)

    def forward_with_features(self, images: torch.Tensor, view_mask: torch.Tensor | None = None,
                              view_types: torch.Tensor | None = None, label_embeddings: torch.Tensor | None = None):
        """`forward`, and from the SAME backbone pass the pooled stage features of every image (those of
        `image_features`): -> (logits [B, L], features [B, V, F] float32, zero in empty slots). With
        `tta_flip` the features are the unflipped image's. Used by the input gate at prediction time."""
        return self._run(images, view_mask, view_types, label_embeddings, pool=True)

    def _run(self, images, view_mask, view_types, label_embeddings, pool: bool):
        if images.dim() == 4:  # [B, C, H, W]: one image per study
            images = images[:, None]
        b, v = images.shape[:2]
        if v > self.config.max_views:
            raise ValueError(f"{v} view slots but this model takes at most {self.config.max_views}")
        if view_mask is None:
            view_mask = torch.ones(b, v, dtype=torch.bool, device=images.device)
        view_mask = view_mask.bool()
        if not bool(view_mask.any(1).all()):
            raise ValueError("every study needs at least one image (a view_mask row is all False)")
        if view_types is None:
            view_types = torch.full((b, v), 2, dtype=torch.long, device=images.device)
        # routed once: the flipped copy of an image goes through the same branch as the image
        routes = self.route(images, view_mask, view_types)
        out = self.forward_once(images, view_mask, view_types, label_embeddings, routes, pool)
        logits, pooled = out if pool else (out, None)
        if self.config.tta_flip and not self.training:
            flipped = self.forward_once(images.flip(-1), view_mask, view_types, label_embeddings, routes)
            logits = (logits + flipped) / 2
        return (logits, pooled) if pool else logits


class ViewSpecificCheXFusion(CheXFusion):
    """CheXFusion with frontal and lateral backbone branches (`view_backbones` separate | split).

    Known views pick their branch; unknown ones (code 2) follow `view_classifier`, which learns from
    `auxiliary_loss` (the training loop adds it to the task loss). The fusion still receives the
    original view codes, so its view embedding can tell a predicted view from a recorded one.
    """

    def __init__(self, cfg: ModelConfig, label_embeddings: torch.Tensor | None = None):
        super().__init__(cfg, label_embeddings)
        self.backbone = ViewBackbones(self.backbone, cfg.view_backbones, cfg.split_stage)
        # outside `backbone`, so freezing the backbone in stage 2 leaves the classifier trainable
        self.view_classifier = ViewClassifier(cfg.view_classifier_size)

    def predict_views(self, images: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
        """[B, V, C, H, W], [B, V] -> predicted view code per slot [B, V]; empty slots get 2 (unknown)."""
        view_mask = view_mask.bool()
        out = torch.full(view_mask.shape, UNKNOWN, dtype=torch.long, device=images.device)
        if bool(view_mask.any()):
            with torch.no_grad():  # routing is a hard choice; the classifier learns from auxiliary_loss
                out[view_mask] = self.view_classifier(images[view_mask]).argmax(-1)
        return out

    def route(self, images, view_mask, view_types):
        bad = view_mask & ((view_types < 0) | (view_types > UNKNOWN))
        if bool(bad.any()):
            raise ValueError(f"view_types must be 0 (frontal), 1 (lateral) or {UNKNOWN} (unknown); "
                             f"got {sorted(set(view_types[bad].tolist()))}")
        unknown = view_mask & (view_types == UNKNOWN)
        routes = view_types.clamp(max=LATERAL)  # empty slots: any branch, they never run
        if bool(unknown.any()):
            routes = torch.where(unknown, self.predict_views(images, unknown), routes)
        return routes

    def auxiliary_loss(self, images: torch.Tensor, view_mask: torch.Tensor, view_types: torch.Tensor):
        """Cross-entropy of the view classifier on the real images whose view is known; 0 if none.

        No weight is applied: the classifier's parameters are its own, and Adam-type optimisers are
        invariant to a constant scale of a parameter group's gradient.
        """
        known = view_mask.bool() & (view_types >= 0) & (view_types < UNKNOWN)
        if not bool(known.any()):
            return images.new_zeros((), dtype=torch.float32)
        logits = self.view_classifier(images[known])
        return F.cross_entropy(logits.float(), view_types[known])


def build_chexfusion(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> CheXFusion:
    overrides = dict(overrides)
    label_embeddings = overrides.pop("label_embeddings", None)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; allowed: {sorted(names)}")
    cfg = ModelConfig(**{**defaults, **overrides})
    if cfg.view_backbones not in MODES:
        raise ValueError(f"view_backbones must be one of {MODES}, not {cfg.view_backbones!r}")
    cls = CheXFusion if cfg.view_backbones == "shared" else ViewSpecificCheXFusion
    return cls(cfg, label_embeddings)


# --- variants: the published configuration, and small ones for CPUs and tests -----------------------

@register_model
def chexfusion_convnext_small(**kw):
    """CheXFusion stage 2 as published: convnext_small, 4 views, 16x16 tokens per view, 2 fusion layers."""
    return build_chexfusion({}, kw)


@register_model
def chexfusion_convnext_small_separate(**kw):
    """Published stage 2 with a frontal and a lateral convnext_small (view-specific backbones)."""
    return build_chexfusion(dict(view_backbones="separate"), kw)


@register_model
def chexfusion_convnext_small_split(**kw):
    """Published stage 2, stem + stages 0-1 shared, stages 2-3 (most of the weights) per view."""
    return build_chexfusion(dict(view_backbones="split", split_stage=2), kw)


@register_model
def chexfusion_convnext_small_stage1(**kw):
    """CheXFusion stage 1: single image, 32x32 tokens, no fusion layers."""
    return build_chexfusion(dict(max_views=1, token_stride=1, fusion_layers=0), kw)


# regnetx_002 trains at ~120 images/s at 96 px on 2 CPU cores (bench/), resnet18 at ~40
_SMALL = dict(backbone="regnetx_002", d_model=128, heads=4, ff_dim=256, decoder_ff=256, token_stride=1)


@register_model
def chexfusion_regnetx002(**kw):
    """A CPU-sized fusion model (regnetx_002, d 128) for small images such as the demo's."""
    return build_chexfusion(_SMALL, kw)


@register_model
def chexfusion_regnetx002_separate(**kw):
    """chexfusion_regnetx002 with a frontal and a lateral backbone."""
    return build_chexfusion(dict(_SMALL, view_backbones="separate"), kw)


@register_model
def chexfusion_regnetx002_split(**kw):
    """chexfusion_regnetx002 with stem + s1-s2 shared and s3-s4 per view."""
    return build_chexfusion(dict(_SMALL, view_backbones="split", split_stage=2), kw)


@register_model
def single_regnetx002(**kw):
    """Single-image counterpart of chexfusion_regnetx002 (stage-1 shape)."""
    return build_chexfusion(dict(_SMALL, max_views=1, fusion_layers=0), kw)


_TEST = dict(backbone="test_resnet", d_model=32, heads=2, ff_dim=64, decoder_ff=64, token_stride=1,
             fusion_layers=1, num_labels=40)


@register_model
def chexfusion_test(**kw):
    """Tiny fusion model that builds in milliseconds (tests, smoke runs)."""
    return build_chexfusion(_TEST, kw)


@register_model
def single_test(**kw):
    """Tiny single-image model that builds in milliseconds."""
    return build_chexfusion(dict(_TEST, max_views=1, fusion_layers=0), kw)


# named *_test (not chexfusion_test_*) so that every `list_models("*_test")` loop covers them
@register_model
def chexfusion_separate_test(**kw):
    """Tiny fusion model with a frontal and a lateral backbone."""
    return build_chexfusion(dict(_TEST, view_backbones="separate"), kw)


@register_model
def chexfusion_split_test(**kw):
    """Tiny fusion model with a shared stem and view-specific late stages (test_resnet has no stages)."""
    return build_chexfusion(dict(_TEST, backbone="test_convnext", view_backbones="split", split_stage=2), kw)
