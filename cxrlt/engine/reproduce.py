"""Published configurations, reproduced: the `reproduce:` section of an experiments/*.yaml file, the check of
a data folder against it, the plan (what runs, the disk its cache needs, the GPU hours), the overrides of a
run (its data folder; `--smoke` scales the very same file down), and the table of obtained against
published numbers.

The file's other sections (data, train, eval, variants, stage2_variants) are an ordinary parameters file:
the run reads them like any other experiment. `reproduce.sources` says where every setting comes from (the
paper, the authors' code or configuration, or "our choice: why"); `reproduce.published` holds the numbers
to set beside ours, with their source.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from cxrlt.config import Config, load_config

EXPERIMENTS = Path("experiments")
IMAGES_DIR = "mimic-cxr-jpg"
# the settings whose source every published configuration must state (issue: "every setting the source states")
REQUIRED_SOURCES = ("backbone", "data.image_size", "train.epochs", "stage2.epochs", "train.batch_size", "train.lr",
                    "loss", "train.augment", "views", "stage1", "stage2")
GPU_BENCH = Path("bench/results/gpu.json")     # bench/gpu.sh's figures, once measured on a GPU
STAGE2_VIEWS = 4                               # CheXFusion's slots per study (what bench/gpu.sh's stage 2 times)
# A reproduction's run folder links its DVC cache, not copies it (DVC's advice for large data); DVC takes the
# first type the file system supports.
RUN_CACHE_TYPES = "reflink,hardlink,symlink"


@dataclass(frozen=True)
class Reproduction:
    name: str
    path: Path
    title: str
    labels_dir: str                  # the label files' folder inside --data (e.g. cxr-lt-2024)
    serve: str                       # the variant whose numbers are set beside the published ones
    report_split: str                # the split ours are measured on
    sources: dict
    published: dict
    smoke: dict = field(default_factory=dict)


def available() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if "reproduce" in (yaml.safe_load(p.read_text()) or {}))


def load_reproduction(name: str) -> Reproduction:
    """experiments/<name>.yaml (or a path) with its `reproduce:` section checked."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else EXPERIMENTS / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no published configuration {name!r}: choose one of {available() or 'none'} "
                                f"(files in {EXPERIMENTS}/ with a `reproduce:` section), or give a .yaml path")
    raw = yaml.safe_load(path.read_text()) or {}
    r = raw.get("reproduce")
    if not isinstance(r, dict):
        raise ValueError(f"{path} has no `reproduce:` section (title, sources, published): it is an ordinary "
                         "parameters file; run it with the train-eval flow")
    missing = [k for k in ("title", "labels_dir", "serve", "sources", "published") if k not in r]
    if missing:
        raise ValueError(f"{path}: reproduce.{missing[0]} is missing (needs {', '.join(missing)})")
    unsourced = [k for k in REQUIRED_SOURCES if not str(r["sources"].get(k, "")).strip()]
    if unsourced:
        raise ValueError(f"{path}: reproduce.sources does not say where {unsourced} come from: name the paper, the "
                         "code or configuration, or write 'our choice: why'")
    pub = r["published"]
    if not pub.get("source") or not pub.get("metrics"):
        raise ValueError(f"{path}: reproduce.published needs `source` and `metrics` (the numbers to compare with)")
    cfg = load_config(path)
    if r["serve"] not in cfg.variants:
        raise ValueError(f"{path}: reproduce.serve {r['serve']!r} is not one of its variants {list(cfg.variants)}")
    return Reproduction(name=path.stem, path=path, title=str(r["title"]), labels_dir=str(r["labels_dir"]),
                        serve=str(r["serve"]), report_split=str(r.get("report_split", "test")),
                        sources=dict(r["sources"]), published=dict(pub), smoke=dict(r.get("smoke") or {}))


def run_overrides(spec: Reproduction, data_dir, smoke: bool = False) -> dict:
    """Dotted overrides of one run: the data folder's paths and, with `smoke`, the file's `smoke:` scaling
    (its `set`, each model swapped for its small counterpart, model_args that name weights or backbones
    dropped), nothing else: every other setting is the file's."""
    data = Path(data_dir)
    labels_dir = spec.smoke.get("labels_dir", spec.labels_dir) if smoke else spec.labels_dir
    out = {"paths.labels": str(data / labels_dir), "paths.images": str(data / IMAGES_DIR)}
    if not smoke:
        return out
    if not spec.smoke:
        raise ValueError(f"{spec.path} has no reproduce.smoke section: it cannot be scaled down for a smoke run")
    out.update(spec.smoke.get("set") or {})
    raw = yaml.safe_load(spec.path.read_text())
    swap, drop = spec.smoke.get("models") or {}, set(spec.smoke.get("drop_model_args") or ("pretrained", "backbone"))
    train_sets = {k.split(".", 1)[1]: v for k, v in out.items() if k.startswith("train.")}
    for section in ("variants", "stage2_variants"):
        for name, v in (raw.get(section) or {}).items():
            for key in set(v.get("train") or {}) & set(train_sets):   # a variant's own setting would win
                out[f"{section}.{name}.train.{key}"] = train_sets[key]
            if v.get("model") in swap:
                out[f"{section}.{name}.model"] = swap[v["model"]]
            if v.get("model_args"):
                out[f"{section}.{name}.model_args"] = {k: a for k, a in v["model_args"].items() if k not in drop}
    return out


def data_problems(spec: Reproduction, data_dir, task: str, labels_dir: str | None = None) -> list[str]:
    """What the data folder lacks for this configuration, every item at once (empty: ready)."""
    from cxrlt.data.manifest import label_files

    data = Path(data_dir)
    if not data.is_dir():
        return [f"the data folder {data} does not exist: give the folder that holds {spec.labels_dir}/ (the label "
                f"files) and {IMAGES_DIR}/files/ (MIMIC-CXR-JPG)"]
    labels, images = data / (labels_dir or spec.labels_dir), data / IMAGES_DIR
    problems = []
    for src in label_files(task):
        if not src.optional and not (labels / src.file).is_file():
            problems.append(f"{labels / src.file}: missing (the {src.split} split's label file of CXR-LT {task})")
    if not (images / "files").is_dir():
        problems.append(f"{images / 'files'}: missing (the MIMIC-CXR-JPG 2.0.0 image tree, files/p10/...)")
    return problems


def _rows(labels: Path, task: str) -> tuple[list[Path], pd.DataFrame]:
    from cxrlt.data.manifest import label_files

    files = [labels / s.file for s in label_files(task) if s.role == "rows" and (labels / s.file).is_file()]
    cols = ["subject_id", "study_id", "fpath", "path"]
    frames = [pd.read_csv(f, usecols=lambda c: c in cols, dtype=str).assign(split=f.name) for f in files]
    return files, pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def cache_bytes_per_image(paths: list[Path], size: int, sample: int = 32, seed: int = 0) -> float | None:
    """Mean bytes of one cached image at `size`, measured by encoding a random sample of the sources exactly as
    `cxrlt prepare` does; None when none can be read."""
    from cxrlt.data.prepare import QUALITY, cache_pixels

    chosen = random.Random(seed).sample(paths, min(sample, len(paths)))
    sizes = []
    for p in chosen:
        try:
            buf = io.BytesIO()
            cache_pixels(str(p), size).save(buf, format="JPEG", quality=QUALITY)
            sizes.append(buf.tell())
        except Exception:  # an unreadable sample is not counted; prepare reports damaged files by name
            continue
    return sum(sizes) / len(sizes) if sizes else None


def dvc_cache_type(root: Path = Path(".")) -> str:
    """The project's DVC cache link type (.dvc/config.local over .dvc/config; DVC's default reflink,copy)."""
    import configparser

    for name in ("config.local", "config"):
        c = configparser.ConfigParser()
        try:
            c.read(root / ".dvc" / name)
        except configparser.Error:
            continue
        if c.has_option("cache", "type"):
            return c.get("cache", "type").strip()
    return "reflink,copy"


def run_cache_type(run_dir: Path) -> str:
    """The DVC cache link type of a run folder: what it was given when made, else what it will get."""
    return dvc_cache_type(run_dir) if (run_dir / ".dvc").is_dir() else RUN_CACHE_TYPES


def dvc_share(cache_bytes: int | None, cache_type: str) -> str:
    """What DVC keeps beside the resized cache when the run goes through `dvc repro` with `cache_type`."""
    links = [t.strip() for t in cache_type.split(",")]
    if links[0] in ("hardlink", "symlink") or links[:2] == ["reflink", "hardlink"]:
        return (f"DVC (cache.type {cache_type}) links the cache's files into its own cache: no second copy "
                "(reflinks where the file system makes them, else hard links)")
    extra = "" if cache_bytes is None else f" (+{cache_bytes / 1e9:.2f} GB)"
    return (f"through `dvc repro` (cache.type {cache_type}) DVC keeps a second copy{extra} unless the file system "
            "makes reflinks (XFS, Btrfs, APFS); `dvc config cache.type hardlink,symlink` links instead")


def gpu_hours(cfg: Config, n_train_images: int, n_train_studies: int, gpus: int = 1,
              bench: Path = GPU_BENCH) -> tuple[float | None, str]:
    """Training GPU hours from the project's own GPU bench (bench/gpu.sh, stored in bench/results/gpu.json):
    stage-1 epochs x training images / images per s, plus stage-2 epochs x studies x 4 views / images per s,
    over `gpus` (assuming linear scaling). (None, why) while no figure exists for this image size."""
    if not bench.is_file():
        return None, f"unmeasured: no GPU bench figures yet ({bench}; run bench/gpu.sh on a GPU node)"
    b = json.loads(bench.read_text())
    size = cfg.data.image_size
    if b.get("tiny") or int(b.get("image_size", -1)) != size:
        return None, f"unmeasured at {size} px: the GPU bench measured {b.get('image_size')} px"
    s1, s2 = ((b.get(k) or {}).get("images_per_s") for k in ("stage1", "stage2"))
    if not s1 or not s2:
        return None, "unmeasured: the GPU bench's stage 1 / stage 2 figures are missing"
    secs = 0.0
    for v in cfg.variants.values():
        secs += v.train.epochs * (n_train_studies * STAGE2_VIEWS / s2 if v.init_from else n_train_images / s1)
    return secs / 3600 / max(1, gpus), f"from bench on {b.get('device', '?')} ({s1:.0f} / {s2:.0f} images/s)"


def plan(spec: Reproduction, overrides: dict, gpus: int = 1, cache_type: str = RUN_CACHE_TYPES) -> dict:
    """What the run will do and what it needs, from the label files and a sample of the images."""
    cfg = load_config(spec.path, {k: v for k, v in overrides.items() if not k.startswith("paths.")})
    files, rows = _rows(Path(overrides["paths.labels"]), cfg.data.task)
    path_col = "fpath" if "fpath" in rows else "path"
    images = Path(overrides["paths.images"])
    train = rows[rows["split"] == files[0].name] if files else rows
    per_image = cache_bytes_per_image([images / p for p in rows[path_col].dropna().tolist()], cfg.data.image_size)
    n_images = len(rows)
    hours, how = gpu_hours(cfg, int(len(train) * (1 - cfg.data.val_fraction)),
                           int(train["study_id"].nunique() * (1 - cfg.data.val_fraction)) if len(train) else 0, gpus)
    return {"title": spec.title, "file": str(spec.path), "variants": [
                {"name": n, "model": v.model, "loss": v.loss, "epochs": v.train.epochs, "init_from": v.init_from or None}
                for n, v in cfg.variants.items()],
            "image_size": cfg.data.image_size, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
            "n_images": n_images, "n_studies": int(rows["study_id"].nunique()) if n_images else 0,
            "cache_bytes": None if per_image is None else int(per_image * n_images),
            "cache_note": "measured on a sample of your images, encoded as `cxrlt prepare` does",
            "dvc_note": dvc_share(None if per_image is None else int(per_image * n_images), cache_type),
            "gpu_hours": hours, "gpu_note": how, "gpus": gpus}


def render_plan(p: dict) -> str:
    gb = "unknown (no image could be read)" if p["cache_bytes"] is None else f"{p['cache_bytes'] / 1e9:.2f} GB"
    hours = p["gpu_note"] if p["gpu_hours"] is None else f"{p['gpu_hours']:.1f} GPU hours on {p['gpus']} GPU(s), {p['gpu_note']}"
    lines = [f"{p['title']} ({p['file']})",
             f"  data: {p['n_images']} images in {p['n_studies']} studies; image size {p['image_size']} px, batch "
             f"{p['batch_size']}, lr {p['lr']}"]
    lines += [f"  train {v['name']}: {v['model']}, loss {v['loss']}, {v['epochs']} epochs"
              + (f", from {v['init_from']}" if v["init_from"] else "") for v in p["variants"]]
    lines += [f"  disk for the resized cache: {gb} ({p['cache_note']}); {p['dvc_note']}", f"  compute: {hours}"]
    return "\n".join(lines)


def published_table(spec: Reproduction, results: dict) -> str:
    """Markdown: each published metric beside ours (the served variant, from the comparison report's
    results.json), with our 95% interval and the difference."""
    rec = next((v for v in results.get("variants", []) if v["variant"] == spec.serve), None)
    if rec is None:
        raise ValueError(f"the report has no variant {spec.serve!r} to compare with the published numbers")
    pub = spec.published
    lines = [f"## {spec.title}: obtained vs published", "",
             f"Published: {pub['source']} (split `{pub.get('split', 'test')}`). Obtained: variant `{spec.serve}` on "
             f"split `{results.get('split')}` of `{results.get('manifest')}` ({results.get('n_images')} images), "
             "95% intervals over resampled patients.", "",
             "| metric | published | obtained [95% CI] | obtained − published |", "|---|---|---|---|"]
    for key, value in pub["metrics"].items():
        got = rec.get(key)
        if got is None or (isinstance(got, float) and math.isnan(got)):
            lines.append(f"| {key} | {value:.4f} | not measured | - |")
            continue
        lo, hi, note = rec.get(f"{key}_ci_low"), rec.get(f"{key}_ci_high"), rec.get(f"{key}_ci_note")
        has = lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi))
        ci = (f" [{lo:.4f}, {hi:.4f}]" + (" (unreliable: see the report)" if note else "") if has else
              " (no interval: too few positives, see the report)" if note else "")
        lines.append(f"| {key} | {value:.4f} | {got:.4f}{ci} | {got - value:+.4f} |")
    if results.get("synthetic"):
        lines += ["", "Obtained on SYNTHETIC demo data (a smoke run): the comparison only shows the pipeline works."]
    return "\n".join(lines) + "\n"
