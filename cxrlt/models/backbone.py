"""timm backbones as feature extractors, with pretrained weights only from local files or caches.

No machine running this project may download weights: `pretrained` is "" (random initialisation),
a path to a local weights file (.safetensors/.pth), or "cache" (the user's timm / Hugging Face cache,
used with HF_HUB_OFFLINE=1 so a miss fails at once instead of retrying for a minute).
The source actually used is returned so the artefact records it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn


class PretrainedWeightsError(RuntimeError):
    pass


def create_backbone(name: str, pretrained: str = "") -> tuple[nn.Module, str]:
    """Return (timm model without classifier or pooling, description of the weights used)."""
    import timm

    kwargs = dict(num_classes=0, global_pool="")
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs), "random"
    if pretrained == "cache":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            return timm.create_model(name, pretrained=True, **kwargs), f"cache:{name}"
        except Exception as e:  # timm raises several kinds for a cache miss
            raise PretrainedWeightsError(
                f"no cached pretrained weights for {name!r} ({e.__class__.__name__}). Download them on a "
                "machine with internet into your timm/HF cache, or pass a local weights file as "
                "`pretrained: path/to/weights.safetensors`, or use `pretrained: ''` for random init."
            ) from None
    path = Path(pretrained)
    if not path.is_file():
        raise PretrainedWeightsError(
            f"pretrained weights file {pretrained!r} does not exist; give a local .safetensors/.pth file, "
            "'cache' for the timm cache, or '' for random initialisation")
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    return model, f"file:{path.name}"
