"""The model registry, on the BentoML model store (bentoml is imported lazily: the library never needs it
at import time).

Every registered model is a copy of an artefact folder (weights, artefact.json with config, labels,
thresholds, metrics, data version, git commit, plus evaluation outputs), under one model name, with
BentoML labels for the variant and metadata for the headline metrics, and a MODEL_CARD.md written at
registration (cxrlt.registry.model_card).

Stages: a model is a `candidate` when registered, `production` while it is the one its name serves, and
`archived` once another replaced it (or by hand). Each model name has exactly one production model and
a serving history (every promotion, rollback and manual change: what, when, why, replacing what);
rollback walks back through that history one model at a time, or to any earlier served model.
The history and stages live inside the stored models' folders (cxrlt.registry.history says why there),
so `bentoml models export` / `import` carry them. The service serves the production model marked most
recently, whatever its name (one service, one model), as `serving_tag()` answers.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cxrlt.registry import history as rh
from cxrlt.registry.history import STAGES

MODEL_NAME = "cxrlt"
SELECT_METRIC = ("val", "mAP")  # the best model is the one with the highest validation mAP
CARD = "MODEL_CARD.md"  # written into every stored model's folder at registration


class RegistryError(RuntimeError):
    pass


def bentoml_home() -> Path:
    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")


def _store_dir() -> Path:
    return bentoml_home() / "models"  # BentoML's model store: <BENTOML_HOME>/models


def register(artefact_dir: str | Path, name: str = MODEL_NAME) -> str:
    """Copy an evaluated artefact into the model store; returns its tag (name:version)."""
    import bentoml

    from cxrlt.artefact.meta import read_meta
    from cxrlt.registry.model_card import render_model_card

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
        (Path(bm.path) / CARD).write_text(render_model_card(meta, str(bm.tag)))
        rh.write_record(bm.path, {"stage": "candidate", "registered": rh.now(), "history": []})
    return str(bm.tag)


def list_registered(name: str = MODEL_NAME) -> list[dict]:
    """Registered models, newest first, with their headline metrics, stage, and whether each is the one
    the service serves."""
    serving = serving_tag(required=False)
    recs = _records(name)
    production = _production(recs)
    rows = []
    for m in _models(name):
        info = m.info
        rows.append({"tag": str(m.tag), "variant": info.labels.get("variant", ""), "model": info.labels.get("model", ""),
                     "loss": info.labels.get("loss", ""), "val_mAP": info.metadata.get("val_mAP"),
                     "val_mAUC": info.metadata.get("val_mAUC"), "created": info.creation_time.isoformat(timespec="seconds"),
                     "synthetic": info.labels.get("synthetic") == "true", "serving": str(m.tag) == serving,
                     "data_version": (info.metadata.get("data_version") or {}).get("manifest_md5"),
                     "stage": _stage(str(m.tag), recs, production)})
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


# ------------------------------------------------------------------------------- the store's records

def _models(name: str) -> list:
    import bentoml

    try:
        return bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        return []


def _get(tag: str):
    import bentoml

    try:
        return bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        raise RegistryError(f"no registered model {tag!r}; see `cxrlt registry list`") from None
    except bentoml.exceptions.BentoMLException as e:  # e.g. a version prefix that matches several models
        raise RegistryError(f"{tag!r}: {e}; give the full tag (see `cxrlt registry list`)") from None


def _records(name: str) -> dict[str, tuple[Path, dict]]:
    """{tag: (model folder, record)} for the models of `name`, after migrating an old serving file."""
    _migrate_legacy()
    return {str(m.tag): (Path(m.path), rh.read_record(m.path)) for m in _models(name)}


def _history_of(recs: dict) -> list[dict]:
    return rh.newest_history({t: r for t, (_, r) in recs.items()})


def _production(recs: dict) -> str | None:
    """The last model the name's history served, if it is in this store."""
    hist = _history_of(recs)
    return hist[-1]["tag"] if hist and hist[-1]["tag"] in recs else None


def _stage(tag: str, recs: dict, production: str | None) -> str:
    if tag == production:
        return "production"
    stage = recs[tag][1]["stage"]
    # a record still saying production belongs to a model replaced in another store (imported): archived
    return "archived" if stage == "production" else stage


def _migrate_legacy() -> None:
    """Move the old serving file (`<BENTOML_HOME>/cxrlt-serving.json`, one history for all names) into the
    models' records once, so existing stores keep their served model and its history."""
    pointer = bentoml_home() / rh.LEGACY_POINTER
    if not pointer.exists():
        return
    with rh.store_lock(_store_dir()):
        if not pointer.exists():  # another process migrated it while this one waited
            return
        for name, old in rh.legacy_entries(pointer).items():
            recs = {str(m.tag): (Path(m.path), rh.read_record(m.path)) for m in _models(name)}
            newer = _history_of(recs)
            if newer and newer[0]["previous"] is None:
                newer[0] = {**newer[0], "previous": old[-1]["tag"]}
            hist = old + newer
            for tag in {e["tag"] for e in hist} & set(recs):
                path, rec = recs[tag]
                rh.write_record(path, {**rec, "stage": "production" if tag == hist[-1]["tag"] else "archived",
                                       "history": hist})
        pointer.replace(pointer.with_name(pointer.name + ".migrated"))


def _append(tag: str, action: str, reason: str) -> str:
    """Serve `tag`: one history entry, written with the full history into the new production model's record
    and into the one it replaces (now archived)."""
    m = _get(tag)
    tag = str(m.tag)
    with rh.store_lock(_store_dir()):
        recs = _records(m.tag.name)
        hist = _history_of(recs)
        previous = hist[-1]["tag"] if hist else None
        hist = hist + [rh.entry(tag, action, reason, previous)]
        path, rec = recs[tag]
        rh.write_record(path, {**rec, "stage": "production", "history": hist})  # first: it holds the truth
        if previous and previous != tag and previous in recs:
            path, rec = recs[previous]
            rh.write_record(path, {**rec, "stage": "archived", "history": hist})
    return tag


# ------------------------------------------------------------------------------------ serving, stages

def set_serving(tag: str, reason: str = "manual", action: str = "manual") -> str:
    """Serve `tag` (its name's production model from now on; the one it replaces is archived)."""
    return _append(tag, action, reason)


def promote_best(name: str = MODEL_NAME, data_version: str | None = None) -> str:
    """Serve the registered model with the best validation mAP among models validated on one data set
    (no-op if it is already served). Without `data_version`: the served model's data set, or the only one
    registered; several data sets and nothing served is refused, since their mAPs are not comparable.
    `last_event(name)` then says what replaced what, and why."""
    if data_version is None:
        rows = [r for r in list_registered(name) if r["val_mAP"] is not None]
        served = (next((r for r in rows if r.get("stage") == "production"), None)
                  or next((r for r in rows if r["serving"]), None))
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
        set_serving(best, reason=f"best validation mAP among {name} models"
                    + (f" validated on data {data_version[:8]}" if data_version else ""), action="promote")
    return best


def rollback(to: str | None = None, name: str = MODEL_NAME) -> str:
    """Serve the model served before the current one (again: the one before that), or `to`, any model
    this name served earlier. Returns the tag now served."""
    with rh.store_lock(_store_dir()):
        if to is not None:
            name = to.split(":", 1)[0]
        recs = _records(name)
        hist = _history_of(recs)
        stack = rh.served_stack(hist)
        current = stack[-1] if stack else None
        if to is None:
            if not stack:
                raise RegistryError(f"no {name} model has been served yet, so there is nothing to roll back to: "
                                    "serve one with `cxrlt registry promote`")
            if len(stack) < 2:
                raise RegistryError(f"nothing earlier to roll back to: {current} is the only {name} model left "
                                    "to serve in its history (see `cxrlt registry history`)")
            target = stack[-2]
        else:
            served_once = {e["tag"] for e in hist}
            target = to if to in served_once else str(_get(to).tag)
            if target == current:
                raise RegistryError(f"{target} is already the served {name} model")
            if target not in served_once:
                raise RegistryError(f"{target} was never served, so it is not an earlier model to roll back to: "
                                    f"serve it with `cxrlt registry promote {target}`")
        if target not in recs:
            raise RegistryError(f"{target} was served earlier but is not in this model store: import it "
                                "(`bentoml models import <its .bentomodel file>`) or roll back to another "
                                "(`cxrlt registry rollback --to <tag>`; see `cxrlt registry history`)")
        return _append(target, "rollback", f"rollback from {current}")


def serving_tag(required: bool = True, name: str | None = None) -> str | None:
    """The production model of `name`; without a name, the one the service serves: the production model
    marked most recently, of any name."""
    import bentoml

    names = [name] if name else sorted({m.tag.name for m in _safe_list_all(bentoml)})
    marked = []
    for n in names:
        recs = _records(n)
        prod = _production(recs)
        if prod:
            marked.append((_history_of(recs)[-1]["time"], prod))
    if marked:
        return max(marked)[1]
    if required:
        raise RegistryError(f"no {name + ' ' if name else ''}model is marked for serving: run "
                            "`cxrlt registry promote` (or `make demo`)")
    return None


def _safe_list_all(bentoml) -> list:
    try:
        return bentoml.models.list()
    except FileNotFoundError:  # a store folder that does not exist yet
        return []


def history(name: str = MODEL_NAME) -> list[dict]:
    """The serving history of `name`, oldest first: {tag, time, action, reason, previous}."""
    return [dict(e) for e in _history_of(_records(name))]


def last_event(name: str = MODEL_NAME) -> dict | None:
    hist = history(name)
    return hist[-1] if hist else None


def set_stage(tag: str, stage: str) -> None:
    """candidate / archived by hand; production serves the model (set_serving). The production model
    leaves production only when another one is served."""
    if stage not in STAGES:
        raise RegistryError(f"unknown stage {stage!r}: use one of {', '.join(STAGES)}")
    m = _get(tag)
    tag = str(m.tag)
    if stage == "production":
        set_serving(tag, reason="stage set to production by hand")
        return
    with rh.store_lock(_store_dir()):
        recs = _records(m.tag.name)
        if tag == _production(recs):
            raise RegistryError(f"{tag} is the production (served) model of {m.tag.name}: serve another one "
                                "(`cxrlt registry promote` or `rollback`), which archives this one")
        path, rec = recs[tag]
        rh.write_record(path, {**rec, "stage": stage})


def stage_of(tag: str) -> str:
    m = _get(tag)
    recs = _records(m.tag.name)
    return _stage(str(m.tag), recs, _production(recs))


# ------------------------------------------------------------------------------------------ describe

def model_card(tag: str) -> str:
    """The model card (markdown) stored with the model; rendered from its artefact for models registered
    before cards were written."""
    path = model_path(tag)
    if (path / CARD).exists():
        return (path / CARD).read_text()
    from cxrlt.artefact.meta import read_meta
    from cxrlt.registry.model_card import render_model_card

    return render_model_card(read_meta(path), str(_get(tag).tag))


def describe(tag: str) -> dict:
    """A JSON-able summary of one registered model, for the UI and the flows."""
    m = _get(tag)
    info, tag = m.info, str(m.tag)
    recs = _records(m.tag.name)
    return {"tag": tag, "name": m.tag.name, "variant": info.labels.get("variant", ""),
            "model": info.labels.get("model", ""), "loss": info.labels.get("loss", ""),
            "stage": _stage(tag, recs, _production(recs)), "serving": tag == serving_tag(required=False),
            "created": info.creation_time.isoformat(timespec="seconds"),
            "data_version": info.metadata.get("data_version"), "git_commit": info.metadata.get("git_commit"),
            "synthetic": info.labels.get("synthetic") == "true", "metrics": info.metadata.get("metrics", {})}


def model_path(tag: str) -> Path:
    return Path(_get(tag).path)


def _clean(o):
    """BentoML metadata accepts plain scalars, lists and dicts only."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items() if v is not None}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if hasattr(o, "item"):
        return o.item()
    return o
