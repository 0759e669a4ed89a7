"""Models: a registry of named CheXFusion-shaped variants (timm's habits)."""

from . import chexfusion  # noqa: F401  (registers the variants)
from .chexfusion import CheXFusion, ModelConfig
from .registry import create_model, list_models, register_model

__all__ = ["CheXFusion", "ModelConfig", "create_model", "list_models", "register_model"]
