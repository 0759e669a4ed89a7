"""The text a label or a finding becomes before a text encoder sees it.

Three prompt forms: the bare name, a template ("a chest x-ray showing {name}"), or name + clinical
description ("Bulla: thin-walled air space ...") from `cxrlt/label_descriptions.yaml`. A text-query head is
trained on one form and must be scored with the same form: its learned projection has only seen that
kind of input (with MiniLM, template prompts of different findings are far more alike than descriptions:
mean pairwise cosine 0.69 vs 0.31). `finding_prompts` builds the trained form for findings given at
prediction time, and `ENSEMBLE_TEMPLATES` lets a caller average several phrasings, as CLIP practice does.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from importlib import resources
from typing import Mapping, Sequence

PROMPTS = ("name", "template", "description")
DEFAULT_TEMPLATE = "a chest x-ray showing {name}"
# Phrasings averaged by prompt ensembling (each with the finding's name in place of {name}).
ENSEMBLE_TEMPLATES = (DEFAULT_TEMPLATE, "chest radiograph with {name}", "{name} seen on a chest x-ray",
                      "findings consistent with {name}", "there is {name}")


@lru_cache(maxsize=1)
def _packaged_descriptions() -> tuple[tuple[str, str], ...]:
    import yaml

    text = resources.files("cxrlt").joinpath("label_descriptions.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError("cxrlt/label_descriptions.yaml must map label name -> one-line description")
    bad = [k for k, v in data.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ValueError(f"cxrlt/label_descriptions.yaml: empty or non-text descriptions for {bad}")
    return tuple((str(k), " ".join(v.split())) for k, v in data.items())


def load_descriptions() -> dict[str, str]:
    """The packaged label -> description mapping (a fresh copy; safe to modify)."""
    return dict(_packaged_descriptions())


def check_names(label_names: Sequence[str]) -> list[str]:
    if isinstance(label_names, str):
        raise TypeError(f"label_names must be a list of names, not the single string {label_names!r}")
    names = list(label_names)
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError("label_names must be a non-empty list of non-empty strings")
    return names


def build_prompts(label_names: Sequence[str], prompt: str = "description", template: str = DEFAULT_TEMPLATE, *,
                  descriptions: Mapping[str, str] | None = None, allow_missing: bool = False) -> list[str]:
    """The exact text encoded for each label. `descriptions` adds to / overrides the packaged ones."""
    names = check_names(label_names)
    if prompt not in PROMPTS:
        raise ValueError(f"unknown prompt kind {prompt!r}: use one of {', '.join(PROMPTS)}")
    if prompt == "name":
        return names
    if prompt == "template":
        return [template.format(name=n) for n in names]
    table = {**load_descriptions(), **(descriptions or {})}
    missing = [n for n in names if not str(table.get(n, "")).strip()]
    if missing and not allow_missing:
        raise KeyError(f"no description for {missing}: add them to cxrlt/label_descriptions.yaml, pass "
                       "descriptions={name: text}, use prompt='template', or allow_missing=True to fall back "
                       "to the template for these labels")
    if missing:
        warnings.warn(f"no description for {missing}; using the template {template!r} for them")
    # Name + description, not the description alone: measured with minilm, the description alone put
    # Bulla next to Pneumothorax, while "Bulla: <description>" puts it next to Emphysema.
    return [f"{n}: {' '.join(str(table[n]).split())}" if n not in missing else template.format(name=n)
            for n in names]


def parse_finding(text: str) -> tuple[str, str | None]:
    """"Name: description" -> (name, description); "Name" -> (name, None). Whitespace is collapsed."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a finding must be a non-empty text, got {text!r}")
    name, sep, desc = text.partition(":")
    name, desc = " ".join(name.split()), " ".join(desc.split())
    if not name:
        raise ValueError(f"finding {text!r} has a description but no name: write 'Name: description'")
    return name, (desc or None) if sep else None


def finding_prompts(findings: Sequence[str], prompt: str = "description", template: str = DEFAULT_TEMPLATE,
                    ensemble: bool = False) -> list[list[str]]:
    """Prompts for findings given at prediction time, in the form the head was trained on.

    Per finding, a list of prompts whose embeddings are to be averaged (one unless `ensemble`):
    - description-trained heads: "Name: description" when the finding carries a description or is a
      packaged label, else the recorded template (the fallback the head also saw for undescribed labels);
    - template- or name-trained heads: the name in that form (a given description is not used: the head
      never saw descriptions).
    `ensemble=True` adds the finding's name in every phrasing of ENSEMBLE_TEMPLATES.
    """
    parsed = [parse_finding(f) for f in check_names(findings)]
    packaged = load_descriptions()
    out = []
    for name, desc in parsed:
        if prompt == "description" and (desc or name in packaged):
            first = f"{name}: {desc or packaged[name]}"
        elif prompt == "name":
            first = name
        else:
            first = template.format(name=name)
        extra = [t.format(name=name) for t in ENSEMBLE_TEMPLATES] if ensemble else []
        out.append(list(dict.fromkeys([first, *extra])))
    return out
