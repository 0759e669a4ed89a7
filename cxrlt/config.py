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


AMP_MODES = ("auto", "bf16", "fp16", "off")


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
    amp: str = "auto"              # auto (bf16 on GPUs with it, else fp16 + GradScaler; off on CPU) | bf16 | fp16 | off
    max_steps_per_epoch: int = 0   # 0 = whole epoch; >0 caps steps (smoke runs)
    threads: int = 0               # torch CPU threads; 0 = torch's default
    checkpoint_every_steps: int = 0  # resumable state every N steps too (0 = only at each epoch's end)
    deterministic: bool = False    # torch deterministic algorithms (bit-exact resume on GPU; slower)
    seeds: tuple[int, ...] = ()    # >1 seed: one variant per seed, named <variant>-seed<k>
    # speed (cxrlt.engine.performance): "auto" = on when training on CUDA, off on CPU
    channels_last: bool | str = "auto"     # NHWC model weights and image batches
    fused_adamw: bool | str = "auto"       # torch.optim.AdamW(fused=True)
    cudnn_benchmark: bool | str = "auto"   # cuDNN picks the fastest kernels (never with `deterministic`)
    pin_memory: bool | str = "auto"        # page-locked batches, copied to the GPU with non_blocking=True
    compile: bool | str = False    # torch.compile the model (true: inductor; or a backend name, e.g. eager)
    grad_accum_steps: int = 1      # micro-batches per optimizer step; batch_size stays the step's global batch
    activation_checkpointing: bool = False  # recompute backbone stages / fusion layers / head in backward
    persistent_workers: bool = True  # keep loader workers between epochs (num_workers > 0)
    prefetch_factor: int = 2       # batches each loader worker prepares ahead (num_workers > 0)
    gpu_augment: bool = False      # augment whole batches on the device (data.transforms.augment_batch)
    gpu_decode: bool | str = "auto"  # workers read JPEG bytes; batches decoded on the device (transforms.decode_views)
    # several processes (torchrun; cxrlt.engine.distributed)
    sync_batchnorm: bool = True    # BatchNorm statistics over the global batch (CUDA; not view-specific models)
    dist_timeout_s: int = 600      # a collective waiting this long ends the run instead of hanging

    def __post_init__(self):
        amp = {True: "auto", False: "off"}.get(self.amp, self.amp)  # amp: true/false of older parameter files
        if amp not in AMP_MODES:
            raise ValueError(f"train.amp is {self.amp!r}: use one of {', '.join(AMP_MODES)} (or true = auto, "
                             "false = off)")
        object.__setattr__(self, "amp", amp)
        for name in ("channels_last", "fused_adamw", "cudnn_benchmark", "pin_memory", "gpu_decode"):
            if getattr(self, name) not in (True, False, "auto"):
                raise ValueError(f"train.{name} is {getattr(self, name)!r}: use auto, true or false")
        if not isinstance(self.compile, (bool, str)) or self.compile == "":
            raise ValueError(f"train.compile is {self.compile!r}: use false, true (inductor) or a torch.compile "
                             "backend name")
        for name, low in (("grad_accum_steps", 1), ("prefetch_factor", 1), ("batch_size", 1), ("dist_timeout_s", 1)):
            if int(getattr(self, name)) < low:
                raise ValueError(f"train.{name} is {getattr(self, name)}: it must be at least {low}")


@dataclass(frozen=True)
class EvalConfig:
    split: str = "val"             # where thresholds and the drift reference come from: only `val`
    tta_flip: bool = False         # mean of image and its horizontal flip
    batch_size: int = 32
    bootstrap: int = 0             # bootstrap resamples for confidence intervals (0 = none)
    gate_frr: float = 0.01         # OOD gate: share of genuine (validation-like) images it may refuse
    gate_max_train: int = 4000     # OOD gate: training images it is fitted on (seeded sample; cxrlt.gate)
    # findings with a guarantee (cxrlt.evaluation.guarantee): the finding set's mean per-study recall, the
    # confirmed findings' mean precision, and the confidence of both over the calibration (validation) draw
    guarantee_recall: float = 0.9
    guarantee_precision: float = 0.8
    guarantee_confidence: float = 0.95

    def __post_init__(self):
        # thresholds tuned on dev or test would be fitted to the very images they are then scored on
        if self.split != "val":
            raise ValueError(f"eval.split is {self.split!r}: thresholds are tuned on the validation split only "
                             "(tuning on dev/test leaks their labels into their scores). Set eval.split: val; "
                             "the tuned thresholds are then applied unchanged to dev and test.")
        for name in ("guarantee_recall", "guarantee_precision", "guarantee_confidence"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"eval.{name} is {getattr(self, name)}: give a level between 0 and 1 (e.g. 0.9)")
        if not 0 < self.gate_frr < 1:
            raise ValueError(f"eval.gate_frr is {self.gate_frr}: it is the share of genuine images the OOD gate "
                             "may refuse, between 0 and 1 (e.g. 0.01)")


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
    seed_group: str = ""           # the variant name before seed expansion ("" = this variant's name)
    # label groups (head / medium / tail) whose labels never reach the loss: a positive control, a model
    # known to be worse on them, that a comparison must be able to detect
    masked_groups: tuple[str, ...] = ()

    def __post_init__(self):
        bad = sorted(set(self.masked_groups) - {"head", "medium", "tail"})
        if bad:
            raise ValueError(f"variant {self.name!r}: masked_groups {bad} are not label groups; use head, medium "
                             "or tail")

    @property
    def group(self) -> str:
        return self.seed_group or self.name


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
            members = self.seed_members(name)
            if members:
                raise KeyError(f"variant {name!r} is trained once per seed, as {', '.join(members)}: name one of "
                               "those (each is its own artefact); the train-eval flow trains them all, DVC's "
                               "foreach only plain names") from None
            known = ", ".join(self.variants) or "(none)"
            raise KeyError(f"unknown variant {name!r}; params.yaml defines: {known}") from None

    def seed_members(self, group: str) -> list[str]:
        """The per-seed variants a seeded variant was expanded into ([] for any other name)."""
        return [n for n, v in self.variants.items() if v.seed_group == group and n != group]

    def select(self, names=None) -> list[str]:
        """Variant names to run: all, or those named, where a seeded variant's name stands for all its seeds."""
        if not names:
            return list(self.variants)
        out = []
        for n in names:
            out += [n] if n in self.variants else (self.seed_members(n) or [self.variant(n).name])
        return list(dict.fromkeys(out))


def _build(cls, values: Mapping[str, Any] | None, where: str):
    """Instantiate a dataclass from a mapping, refusing unknown keys with a clear message."""
    values = dict(values or {})
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(names)}")
    for f in fields(cls):
        if f.name in values and str(f.type).startswith("tuple[") and values[f.name] is not None:
            values[f.name] = tuple(values[f.name])
    return cls(**values)


def config_from_dict(d: Mapping[str, Any]) -> Config:
    d = dict(d or {})
    data = _build(DataConfig, d.get("data"), "data")
    train = _build(TrainConfig, d.get("train"), "train")
    evalc = _build(EvalConfig, d.get("eval"), "eval")
    variants: dict[str, VariantConfig] = {}
    stage1, stage2 = d.get("variants") or {}, d.get("stage2_variants") or {}
    for name in set(stage1) & set(stage2):
        raise ValueError(f"variant {name!r} is in both `variants` and `stage2_variants`")
    seeds_of: dict[str, tuple[int, ...]] = {}
    for name, v in [*stage1.items(), *stage2.items()]:
        v = dict(v or {})
        if name in stage2 and not v.get("init_from"):
            raise ValueError(f"stage-2 variant {name!r} needs `init_from:` (the stage-1 variant it starts from)")
        if v.get("init_from") and v["init_from"] not in stage1 and name in stage2:
            raise ValueError(f"stage-2 variant {name!r}: init_from {v['init_from']!r} is not in `variants`")
        if "model" not in v:
            raise ValueError(f"variant {name!r} in params.yaml needs a `model:` (see `cxrlt models`)")
        if "seed_group" in v:
            raise ValueError(f"variant {name!r}: seed_group is set by `seeds:`, not in params.yaml; remove it")
        overrides = dict(v.pop("train", None) or {})
        if "seeds" in v:  # `seeds:` beside `model:` is the same setting as `train: {seeds: ...}`
            if "seeds" in overrides:
                raise ValueError(f"variant {name!r} sets seeds twice (`seeds:` and `train.seeds`); keep one")
            overrides["seeds"] = v.pop("seeds")
        tr = _build(TrainConfig, {**dataclasses.asdict(train), **overrides}, f"variants.{name}.train")
        base = _build(VariantConfig, {**v, "name": name, "train": tr}, f"variants.{name}")
        seeds_of[name] = _seeds(base, seeds_of.get(base.init_from) if name in stage2 else None)
        for variant in _expand_seeds(base, seeds_of[name], seeds_of.get(base.init_from, ()) if name in stage2 else ()):
            if variant.name in variants or (variant.name != name and variant.name in {*stage1, *stage2}):
                raise ValueError(f"seeded variant {name!r} expands to {variant.name!r}, a name already defined; "
                                 "rename one of them")
            variants[variant.name] = variant
    return Config(data=data, train=train, eval=evalc, variants=variants)


def _seeds(v: VariantConfig, stage1_seeds: tuple[int, ...] | None) -> tuple[int, ...]:
    """The seeds a variant trains with; a stage-2 variant without its own takes its stage 1's, so that each
    seed's fusion model starts from the same seed's backbone."""
    seeds = tuple(int(s) for s in v.train.seeds)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"variant {v.name!r}: seeds {list(seeds)} repeat a seed; list each seed once")
    if not seeds and stage1_seeds and len(stage1_seeds) > 1:
        return stage1_seeds
    if stage1_seeds and len(stage1_seeds) > 1 and not set(seeds) <= set(stage1_seeds):
        raise ValueError(f"stage-2 variant {v.name!r} has seeds {list(seeds)} but its stage 1 {v.init_from!r} is "
                         f"trained only with {list(stage1_seeds)}: each seed starts from the same-seed stage-1 "
                         "artefact, so use a subset of those seeds (or leave seeds out to take them all)")
    return seeds


def _expand_seeds(v: VariantConfig, seeds: tuple[int, ...], stage1_seeds: tuple[int, ...]) -> list[VariantConfig]:
    """One variant per seed, `<name>-seed<k>` with train.seed = k; one seed (or none) keeps the plain name
    so paths and DVC stages of unseeded parameter files do not change."""
    seeded_stage1 = len(stage1_seeds) > 1
    def one(name: str, seed: int) -> VariantConfig:
        init = f"{v.init_from}-seed{seed}" if seeded_stage1 else v.init_from
        tr = dataclasses.replace(v.train, seed=seed, seeds=())
        return dataclasses.replace(v, name=name, train=tr, init_from=init, seed_group=v.name)
    if len(seeds) > 1:
        return [one(f"{v.name}-seed{k}", k) for k in seeds]
    return [one(v.name, seeds[0] if seeds else v.train.seed)]


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
