"""Named model variants, as in timm: `@register_model` functions over one config, `create_model(name)`."""

from __future__ import annotations

import fnmatch
from typing import Callable

_MODELS: dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    """Register a model factory under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **overrides):
    """Build a registered model; keyword overrides replace fields of its `ModelConfig`."""
    try:
        factory = _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    return factory(**overrides)
