"""Where in a study's images a finding's evidence lies: Grad-CAM heatmaps (pure torch).

Method: Grad-CAM (Selvaraju et al., 2017) on the backbone's last feature map, for one finding's logit.
For each image of the study, the feature map A [C, h, w] that the view tokenizer receives is weighted by
the spatial mean of d logit / d A per channel; the positive part of that weighted sum, upsampled to the
model's input size, is the map.

Why Grad-CAM and not the query decoder's cross-attention: in a fusion model the decoder attends to
*fused* tokens, each of which has already mixed every view and position of the study in the fusion
transformer, so an attention weight on token t is not evidence at image position t; attention weights also
carry no sign (a token can be attended to because it argues against the finding) and ignore what the
value vectors and the output projection do with it. Grad-CAM follows the finding's logit back through
the head, the fusion and the tokenizer to each image's own feature map, so it works the same way for
single-image, fusion, view-specific and text-query models, without changing any of them.

A study is explained on its own (batch of one), so its maps never depend on other studies; slots without
an image are never run (the model's own contract). Gradients are switched on locally
(`torch.enable_grad()` inside `torch.inference_mode(False)`), so this runs in an inference service.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def feature_maps_of(model: nn.Module) -> nn.Module:
    """The module whose input is the backbone's last feature map [N, C, h, w] (every CheXFusion variant
    feeds it to `tokenizer`, whatever backbone or view routing sits before)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise TypeError(f"{type(model).__name__} has no `tokenizer`: Grad-CAM needs the backbone's feature map "
                        "as the input of a module")
    return tokenizer


def gradcam(model: nn.Module, images: torch.Tensor, view_mask: torch.Tensor, view_types: torch.Tensor,
            label_index: int | Sequence[int], label_embeddings: torch.Tensor | None = None,
            normalize: bool = True) -> torch.Tensor:
    """Grad-CAM of one study for one label (or several: one forward pass, one backward pass each).

    images [V, C, H, W], view_mask [V] bool, view_types [V] long (one study, as `Predictor.encode_study`
    gives it); label_index: the label's column in the logits (of `label_embeddings` when given).
    Returns float32 [V_real, H, W] in [0, 1] ([K, V_real, H, W] for K label indices), one map per real image
    in slot order: 0 = no evidence for the label, 1 = the strongest evidence anywhere in the study (a
    label's maps of one study share one scale, so an image with less evidence is darker). All zeros when
    nothing in the study raises the logit. A model that averages the logits of the image and its mirror
    (`tta_flip`) gets the mirror's map mirrored back and added. `normalize=False` leaves the maps unscaled
    (non-negative), to put several calls of one study on one scale with `normalise`.
    """
    if images.dim() != 4 or view_mask.dim() != 1:
        raise ValueError(f"one study: images [V, C, H, W] and view_mask [V]; got {tuple(images.shape)} "
                         f"and {tuple(view_mask.shape)}")
    single = isinstance(label_index, int)
    indices = [label_index] if single else [int(i) for i in label_index]
    model_was_training = model.training
    model.eval()
    captured: list[torch.Tensor] = []

    def capture(module, args):
        # a leaf that requires grad: the map's gradient exists even when the backbone is frozen, and
        # nothing before it (the backbone) is differentiated
        feats = args[0].detach().requires_grad_(True)
        captured.append(feats)
        return (feats, *args[1:])

    handle = feature_maps_of(model).register_forward_pre_hook(capture)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = images[None].clone()
            logits = model(x, view_mask[None].clone(), view_types[None].clone(), label_embeddings=label_embeddings)
            bad = [i for i in indices if not 0 <= i < logits.shape[1]]
            if bad:
                raise IndexError(f"label index {bad} out of range for {logits.shape[1]} logits")
            grads = [torch.autograd.grad(logits[0, i].float(), captured, retain_graph=k + 1 < len(indices))
                     for k, i in enumerate(indices)]
    finally:
        handle.remove()
        model.train(model_was_training)
    maps = torch.stack([_cam(captured, g, images.shape[-2:]) for g in grads])  # [K, N_real, H, W]
    if normalize:
        maps = torch.stack([normalise(m) for m in maps])
    return maps[0] if single else maps


def _cam(feats: list[torch.Tensor], grads: tuple[torch.Tensor, ...], size) -> torch.Tensor:
    cams = []
    for k, (a, g) in enumerate(zip(feats, grads)):
        weights = g.float().mean((2, 3), keepdim=True)              # [N, C, 1, 1]
        cam = (weights * a.detach().float()).sum(1)                 # [N, h, w]
        cams.append(cam.flip(-1) if k == 1 else cam)                # the tta_flip pass saw mirrored images
    cam = torch.stack(cams).sum(0).clamp_min(0)                      # [N_real, h, w]
    cam = F.interpolate(cam[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return cam.clamp_min(0).cpu()


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Non-negative maps (one study's) -> [0, 1] on one shared scale; all zeros stay zeros."""
    top = maps.max() if maps.numel() else maps.new_zeros(())
    return maps / top if top > 0 else torch.zeros_like(maps)


def to_uint8(heatmap: torch.Tensor):
    """A [H, W] map in [0, 1] -> uint8 numpy (0 = no evidence, 255 = most)."""
    import numpy as np

    return np.asarray((heatmap.clamp(0, 1) * 255).round().to(torch.uint8).numpy())


def heatmap_png(heatmap: torch.Tensor) -> bytes:
    """A [H, W] map in [0, 1] -> an 8-bit greyscale PNG of the same size."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(heatmap), mode="L").save(buf, format="PNG")
    return buf.getvalue()
