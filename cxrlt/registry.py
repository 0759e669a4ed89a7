"""The model registry, on the BentoML model store (bentoml is imported lazily: the library never needs it
at import time).

Every registered model is a copy of an artefact folder (weights, artefact.json with config, labels,
thresholds, metrics, data version, git commit, plus evaluation outputs), under one model name, with
BentoML labels for the variant and metadata for the headline metrics. Which model is *served* is a
pointer with history kept beside the store (`<BENTOML_HOME>/cxrlt-serving.json`), so the mark can be
moved to the best model and moved back to an earlier one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .checkpoint import read_meta

MODEL_NAME = "cxrlt"
SELECT_METRIC = ("val", "mAP")  # the best model is the one with the highest validation mAP


class RegistryError(RuntimeError):
    pass


def bentoml_home() -> Path:
    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")


def _pointer() -> Path:
    return bentoml_home() / "cxrlt-serving.json"


def register(artefact_dir: str | Path, name: str = MODEL_NAME) -> str:
    """Copy an evaluated artefact into the model store; returns its tag (name:version)."""
    import bentoml

    meta = read_meta(artefact_dir)
    if not meta.get("metrics"):
        raise RegistryError(f"{artefact_dir} has no metrics yet: run `cxrlt evaluate` before registering")
    val = meta["metrics"].get(SELECT_METRIC[0], {})
    labels = {"variant": str(meta.get("variant", "")), "model": str(meta["model"]),
              "loss": str(meta.get("loss", {}).get("name", "")), "synthetic": str(bool(meta.get("synthetic"))).lower(),
              "git_commit": str(meta.get("git_commit", "unknown"))[:12]}
    metadata = {"val_mAP": val.get("mAP"), "val_mAUC": val.get("mAUC"), "val_mF1": val.get("mF1"),
                "metrics": meta["metrics"], "data_version": meta.get("data_version"),
                "git_commit": meta.get("git_commit"), "pretrained_source": meta.get("pretrained_source")}
    with bentoml.models.create(name=name, labels=labels, metadata=_clean(metadata)) as bm:
        shutil.copytree(artefact_dir, bm.path, dirs_exist_ok=True)
    return str(bm.tag)


def list_registered(name: str = MODEL_NAME) -> list[dict]:
    """Registered models, newest first, with their headline metrics and whether each is served."""
    import bentoml

    serving = serving_tag(required=False)
    rows = []
    for m in bentoml.models.list(name):
        info = m.info
        rows.append({"tag": str(m.tag), "variant": info.labels.get("variant", ""), "model": info.labels.get("model", ""),
                     "loss": info.labels.get("loss", ""), "val_mAP": info.metadata.get("val_mAP"),
                     "val_mAUC": info.metadata.get("val_mAUC"), "created": info.creation_time.isoformat(timespec="seconds"),
                     "synthetic": info.labels.get("synthetic") == "true", "serving": str(m.tag) == serving,
                     "data_version": (info.metadata.get("data_version") or {}).get("manifest_md5")})
    return sorted(rows, key=lambda r: r["created"], reverse=True)


def best_tag(name: str = MODEL_NAME, data_version: str | None = None) -> str:
    """Highest validation mAP; with `data_version` (a manifest md5) only among models validated on that
    data, since validation mAPs of different data sets are not comparable."""
    rows = [r for r in list_registered(name) if r["val_mAP"] is not None
            and (data_version is None or r["data_version"] == data_version)]
    if not rows:
        raise RegistryError("no registered model has a validation mAP" + (f" on data {data_version}" if data_version
                            else "") + ": train and register one first (`make demo` or "
                            "`prefect deployment run 'train-eval/demo'`)")
    return max(rows, key=lambda r: (r["val_mAP"], r["created"]))["tag"]


def _history() -> list[dict]:
    p = _pointer()
    return json.loads(p.read_text())["history"] if p.exists() else []


def set_serving(tag: str, reason: str = "manual") -> str:
    """Mark `tag` as the model to serve (appends to the pointer's history)."""
    import bentoml

    try:
        tag = str(bentoml.models.get(tag).tag)
    except bentoml.exceptions.NotFound:
        raise RegistryError(f"no registered model {tag!r}; see `cxrlt registry list`") from None
    hist = _history()
    hist.append({"tag": tag, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reason": reason})
    p = _pointer()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"history": hist}, indent=2))
    tmp.replace(p)  # atomic: a reader never sees a half-written pointer
    return tag


def promote_best(name: str = MODEL_NAME, data_version: str | None = None) -> str:
    """Serve the registered model with the best validation mAP among models validated on one data set
    (no-op if it is already served). Without `data_version`: the served model's data set, or the only one
    registered; several data sets and nothing served is refused, since their mAPs are not comparable."""
    if data_version is None:
        rows = [r for r in list_registered(name) if r["val_mAP"] is not None]
        served = next((r for r in rows if r["serving"]), None)
        versions = sorted({str(r["data_version"]) for r in rows})
        if served is not None:
            data_version = served["data_version"]
        elif len(versions) > 1:
            raise RegistryError(f"{name} models were validated on {len(versions)} different data sets "
                                f"({', '.join(v[:8] for v in versions)}), whose validation mAPs are not comparable: "
                                "name the data set (`cxrlt registry promote --manifest <its manifest folder>`) "
                                "or the model (`cxrlt registry promote <tag>`)")
    best = best_tag(name, data_version)
    if serving_tag(required=False) != best:
        set_serving(best, reason=f"best validation mAP among {name} models")
    return best


def rollback() -> str:
    """Move the serving mark back to the previously served model."""
    hist = _history()
    if len(hist) < 2:
        raise RegistryError("no earlier served model to roll back to")
    prev = hist[-2]["tag"]
    return set_serving(prev, reason=f"rollback from {hist[-1]['tag']}")


def serving_tag(required: bool = True) -> str | None:
    hist = _history()
    if hist:
        return hist[-1]["tag"]
    if required:
        raise RegistryError("no model is marked for serving: run `cxrlt registry promote` (or `make demo`)")
    return None


def model_path(tag: str) -> Path:
    import bentoml

    try:
        return Path(bentoml.models.get(tag).path)
    except bentoml.exceptions.NotFound:
        raise RegistryError(f"no registered model {tag!r}; see `cxrlt registry list`") from None


def _clean(o):
    """BentoML metadata accepts plain scalars, lists and dicts only."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items() if v is not None}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if hasattr(o, "item"):
        return o.item()
    return o
