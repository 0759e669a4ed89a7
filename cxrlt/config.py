"""Configuration: frozen dataclasses loaded from params.yaml (the DVC parameters) plus overrides.

params.yaml's sections mirror these classes: `data`, `train`, `eval`, and `variants`, a mapping of
variant name -> {model: <registered model name>, loss: <loss name>, model_args: {...}, loss_args: {...},
train: {...overrides}}. `stage2_variants` has the same form plus `init_from: <a variant of
variants>`: CheXFusion's stage 2, which starts from a trained stage-1 backbone (frozen by default).
They are separate sections so DVC can make each stage-2 training depend on its stage-1 artefact. A *variant* is what the pipeline trains and registers; a *model* is an
architecture in `cxrlt.models` (timm's vocabulary).
Other sections (`paths`, `demo`) are read by the callers (dvc.yaml, Makefile, pipelines).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 128          # square side the model sees (CheXFusion: 1024)
    val_fraction: float = 0.1      # share of training PATIENTS held out for model selection
    seed: int = 0
    task: str = "task1"
    zero_shot: tuple[str, ...] = ()  # labels held out of training (scored from text only)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 16           # studies per step
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    num_workers: int = 0
    balanced_sampling: bool = False  # class-aware sampling (CheXFusion)
    augment: bool = True
    device: str = "auto"           # auto -> cuda when available
    amp: bool = False              # mixed precision on cuda
    max_steps_per_epoch: int = 0   # 0 = whole epoch; >0 caps steps (smoke runs)
    threads: int = 0               # torch CPU threads; 0 = torch's default


@dataclass(frozen=True)
class EvalConfig:
    split: str = "val"             # where metrics, thresholds and drift reference come from
    tta_flip: bool = False         # mean of image and its horizontal flip
    batch_size: int = 32
    bootstrap: int = 0             # bootstrap resamples for confidence intervals (0 = none)


@dataclass(frozen=True)
class VariantConfig:
    name: str
    model: str
    loss: str = "asl"
    model_args: Mapping[str, Any] = field(default_factory=dict)
    loss_args: Mapping[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    text_encoder: Mapping[str, Any] = field(default_factory=dict)  # for `model_args: {query: text}`:
    #   cxrlt.models.text.TextEncoderSpec fields (name, pooling, prompt, template, folder); default MiniLM
    init_from: str = ""            # stage 2: a variant name (models/<name>), artefact folder or registry tag
    freeze_backbone: bool = True   # with init_from: keep the stage-1 backbone fixed, as CheXFusion does


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    variants: Mapping[str, VariantConfig] = field(default_factory=dict)

    def variant(self, name: str) -> VariantConfig:
        try:
            return self.variants[name]
        except KeyError:
            known = ", ".join(self.variants) or "(none)"
            raise KeyError(f"unknown variant {name!r}; params.yaml defines: {known}") from None


def _build(cls, values: Mapping[str, Any] | None, where: str):
    """Instantiate a dataclass from a mapping, refusing unknown keys with a clear message."""
    values = dict(values or {})
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(names)}")
    for f in fields(cls):
        if f.name in values and f.type in ("tuple[str, ...]",) and values[f.name] is not None:
            values[f.name] = tuple(values[f.name])
    return cls(**values)


def config_from_dict(d: Mapping[str, Any]) -> Config:
    d = dict(d or {})
    data = _build(DataConfig, d.get("data"), "data")
    train = _build(TrainConfig, d.get("train"), "train")
    evalc = _build(EvalConfig, d.get("eval"), "eval")
    variants = {}
    stage1, stage2 = d.get("variants") or {}, d.get("stage2_variants") or {}
    for name in set(stage1) & set(stage2):
        raise ValueError(f"variant {name!r} is in both `variants` and `stage2_variants`")
    for name, v in [*stage1.items(), *stage2.items()]:
        v = dict(v or {})
        if name in stage2 and not v.get("init_from"):
            raise ValueError(f"stage-2 variant {name!r} needs `init_from:` (the stage-1 variant it starts from)")
        if v.get("init_from") and v["init_from"] not in stage1 and name in stage2:
            raise ValueError(f"stage-2 variant {name!r}: init_from {v['init_from']!r} is not in `variants`")
        if "model" not in v:
            raise ValueError(f"variant {name!r} in params.yaml needs a `model:` (see `cxrlt models`)")
        tr = _build(TrainConfig, {**dataclasses.asdict(train), **(v.pop("train", None) or {})},
                    f"variants.{name}.train")
        variants[name] = _build(VariantConfig, {**v, "name": name, "train": tr}, f"variants.{name}")
    return Config(data=data, train=train, eval=evalc, variants=variants)


def load_config(path: str | Path = "params.yaml", overrides: Mapping[str, Any] | None = None) -> Config:
    """Read params.yaml and apply dotted overrides such as {"train.epochs": 1, "data.image_size": 64}."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no parameters file at {path}; run from the project root or pass --params")
    d = yaml.safe_load(path.read_text()) or {}
    for key, value in (overrides or {}).items():
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict(d)


def to_dict(obj) -> Any:
    """Dataclasses -> plain JSON/YAML-serialisable structures."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
