"""Model artefacts that rebuild themselves (nanoGPT's habit): one folder holding

  weights.safetensors   the state dict (safe to load: no pickle)            } written by training
  artefact.json         model name + config, label space, loss, training    }
                        config, data version, git commit, pretrained source }
  dvclive/              loss and validation mAP per epoch (DVCLive files;   }
                        cxrlt.engine.read_history reads them)               }
  metrics.json          summary metrics per split                           } written by evaluation
  eval/                 thresholds.json, per_label_<split>.csv,             } (a separate DVC stage,
                        predictions_<split>.csv,                            }  so separate files)
                        gate.json + gate.safetensors (OOD gate, cxrlt.gate) }
`cxrlt.artefact.meta.read_meta` merges both halves, so callers see one record.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cxrlt.artefact.meta import EVAL_DIR, META, METRICS, WEIGHTS, ArtefactError, read_meta, write_text
from cxrlt.labels import LabelSpace
from cxrlt.models import create_model

FORMAT = 1
__all__ = ["Artefact", "load_artefact", "resolve_device", "save_artefact", "write_evaluation"]


def resolve_device(name: str = "auto") -> torch.device:
    """The device a model runs on: "auto" is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Artefact:
    path: Path
    model: torch.nn.Module
    meta: dict

    @property
    def label_space(self) -> LabelSpace:
        return LabelSpace.from_dict(self.meta["label_space"])

    @property
    def thresholds(self) -> np.ndarray:
        t = self.meta.get("thresholds")
        return np.full(len(self.label_space), 0.5) if t is None else np.asarray(t, dtype=float)


def save_artefact(out_dir: str | Path, model: torch.nn.Module, *, model_name: str, label_space: LabelSpace,
                  **meta: Any) -> Path:
    """Write weights + artefact.json. `meta` may hold variant, loss, train, data_version, git_commit, ..."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    record = {"format": FORMAT, "model": model_name, "model_config": asdict(model.config),
              "label_space": label_space.to_dict(), "pretrained_source": getattr(model, "pretrained_source", None),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **meta}
    (out / META).write_text(json.dumps(record, indent=2, default=_jsonable))
    return out


def write_evaluation(path: str | Path, metrics: dict, thresholds, threshold_split: str) -> None:
    path = Path(path)
    (path / EVAL_DIR).mkdir(parents=True, exist_ok=True)
    write_text(path / EVAL_DIR / "thresholds.json", json.dumps(
        {"split": threshold_split, "thresholds": [float(t) for t in thresholds]}, indent=2))
    write_text(path / METRICS, json.dumps(metrics, indent=2, default=_jsonable))


def load_artefact(path: str | Path, device: str | torch.device = "cpu", **model_overrides) -> Artefact:
    """Rebuild the model from its recorded config and load the weights strictly.

    Pretrained-weight loading is switched off: the artefact's own weights replace them anyway.
    """
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format") != FORMAT:
        raise ArtefactError(f"{path}: artefact format {meta.get('format')} is not supported (expected {FORMAT})")
    state = load_file(str(path / WEIGHTS))
    cfg = {**meta["model_config"], "pretrained": "", **model_overrides}
    if "head.label_embeddings" in state:
        cfg["label_embeddings"] = state["head.label_embeddings"]
    model = create_model(meta["model"], **cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtefactError(f"{path}: weights do not match model {meta['model']!r} "
                            f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return Artefact(path, model.to(device).eval(), meta)


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")
