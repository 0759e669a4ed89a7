"""Models: a registry of named CheXFusion-shaped variants (timm's habits)."""

from cxrlt.models import chexfusion  # noqa: F401  (registers the variants)
from cxrlt.models.chexfusion import CheXFusion, ModelConfig
from cxrlt.models.registry import create_model, list_models, register_model

__all__ = ["CheXFusion", "ModelConfig", "create_model", "list_models", "register_model"]
