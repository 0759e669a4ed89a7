"""An artefact folder's metadata, readable without torch: the registry, the model card and the web app
read it in processes that never load a model (cxrlt.artefact.checkpoint, which loads and saves weights, re-exports
these names)."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

WEIGHTS, META, METRICS, EVAL_DIR = "weights.safetensors", "artefact.json", "metrics.json", "eval"
# inside eval/: a deliberate evaluation on another data set than the model was trained with (`--other-data`),
# kept apart from the model's own
OTHER_DATA_DIR = "other-data"
# inside eval/: the thresholds of the finding sets that come with a guarantee (cxrlt.evaluation.guarantee)
GUARANTEE = "guarantee.json"
# written by the train-eval flow beside a trained artefact: the dvc.lock entries (or, outside DVC, the params
# file and commit) that produced it, and the command that rebuilds it
LINEAGE = "lineage.json"


class ArtefactError(RuntimeError):
    pass


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it replaces `path` whole when the block ends (and is removed
    if the block fails). A file that is a hard link into DVC's cache (`cache.type hardlink`, read-only) is thus
    replaced, never written through into the cache, and a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    """`Path.write_text`, by `replacing` the file."""
    with replacing(path) as tmp:
        tmp.write_text(text)


def read_meta(path: str | Path) -> dict:
    """artefact.json plus, when evaluated, `metrics`, `thresholds` and `guarantee` (the conformal finding
    sets' thresholds), `gate` (threshold, target false rejection rate, counts) when an OOD gate is stored, and
    `lineage` when the flow recorded one."""
    p = Path(path) / META
    if not p.exists():
        raise ArtefactError(f"{path} is not a model artefact (no {META}); train one with `cxrlt train`")
    meta = json.loads(p.read_text())
    if (Path(path) / METRICS).exists():
        meta["metrics"] = json.loads((Path(path) / METRICS).read_text())
    thr = Path(path) / EVAL_DIR / "thresholds.json"
    if thr.exists():
        t = json.loads(thr.read_text())
        meta["thresholds"], meta["threshold_split"] = t["thresholds"], t["split"]
    gate = Path(path) / EVAL_DIR / "gate.json"
    if gate.exists():  # the OOD gate's record without its arrays and histograms (cxrlt.gate.load_gate)
        rec = json.loads(gate.read_text())
        rec.pop("reference", None)
        if isinstance(rec.get("fallback"), dict):
            rec["fallback"] = {k: v for k, v in rec["fallback"].items() if k != "reference"}
        meta["gate"] = rec
    guarantee = Path(path) / EVAL_DIR / GUARANTEE
    if guarantee.exists():  # the findings-with-a-guarantee thresholds (cxrlt.evaluation.guarantee)
        meta["guarantee"] = json.loads(guarantee.read_text())
    if (Path(path) / LINEAGE).exists():
        meta["lineage"] = json.loads((Path(path) / LINEAGE).read_text())
    return meta


def trained_image_size(meta: dict, requested: int | None = None) -> int:
    """The image size the artefact was trained at; a caller asking for another one is refused."""
    trained = (meta.get("data") or {}).get("image_size")
    if trained is None:
        raise ValueError("the artefact records no training image size (data.image_size in artefact.json): "
                         "retrain it with `cxrlt train`, which records it")
    if requested is not None and int(requested) != int(trained):
        raise ValueError(f"the artefact was trained on {trained}px images but evaluation was asked for "
                         f"{requested}px: scores at another size describe a model that was never trained. Leave "
                         "the image size out (the artefact's own is used), or train a variant at that size")
    return int(trained)
