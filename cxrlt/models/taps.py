"""Pooled stage features, tapped from a backbone pass that runs anyway (forward hooks).

The input gate (`cxrlt.gate.ood`) scores an image by the average-pooled output of every backbone stage. A
`StageTap` collects those while the model's own forward pass runs, so the prediction and the gate share one
pass through the backbone instead of two.

Parts: a model lists its stage modules by part (`CheXFusion.stage_parts`): a part with route None sees every
image of the pass (one shared backbone, or the shared stem of a split view-specific backbone); a part with a
route code sees only the images routed to it (a view branch runs on its own images only). An image's features
are its shared parts' stages, then its own branch's stages, in stage order, as if it had run alone.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class StageTap:
    """Context manager: while open, every stage module of `parts` records its pooled output [n, C] per call."""

    def __init__(self, parts: Sequence[tuple[int | None, Sequence[nn.Module]]]):
        self.parts = [(route, list(mods)) for route, mods in parts]
        self.seen: dict[int, list[torch.Tensor]] = {}
        self._hooks: list = []

    def __enter__(self) -> "StageTap":
        self.seen = {}
        for _, mods in self.parts:
            for m in mods:
                self._hooks.append(m.register_forward_hook(self._keep))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _keep(self, module, inputs, out) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"stage features pool [N, C, H, W] feature maps; {type(module).__name__} gives {shape}")
        self.seen.setdefault(id(module), []).append(out.detach().float().mean((-2, -1)))

    def _stages(self, mods: Sequence[nn.Module]) -> torch.Tensor | None:
        got = [self.seen.get(id(m), []) for m in mods]
        if not any(got):
            return None
        if any(len(g) != 1 for g in got):
            raise RuntimeError("a tapped stage ran more or less than once in one backbone pass: tap one pass only")
        return torch.cat([g[0] for g in got], 1)

    def features(self, n: int, routes: torch.Tensor | None, last: torch.Tensor) -> torch.Tensor:
        """[n, F] float32 for the n images of the pass just run (`routes` [n]: each image's branch, None when
        nothing is routed; `last`: the pass's last feature maps, pooled alone when the model lists no stage)."""
        shared, branch = [], None
        for route, mods in self.parts:  # shared parts (the stem) come before the branches
            f = self._stages(mods)
            if f is None:
                continue
            if route is None:
                shared.append(f)
                continue
            sel = routes == route
            if int(sel.sum()) != f.shape[0]:
                raise RuntimeError(f"branch {route} ran on {f.shape[0]} images, {int(sel.sum())} are routed to it")
            branch = f.new_zeros(n, f.shape[1]) if branch is None else branch
            branch[sel] = f
        cols = shared + ([branch] if branch is not None else [])
        if not cols:
            return last.detach().float().mean((-2, -1))
        return torch.cat(cols, 1)
