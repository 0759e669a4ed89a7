"""A resized copy of a manifest's images in a NEW folder, plus a manifest that points at it.

Decoding 2500x3000 JPEGs on every epoch is the cost that matters, so training reads a square cache.
The sources are opened read-only and never modified, moved or deleted (CheXFusion's loader deleted the
originals after caching; this one refuses any folder that could touch them). Re-running skips images
already cached at the right size, and a file is only ever visible complete (written, then renamed).

Every source goes through `cxrlt.data.images.read_image(src, size)` (PNG, JPEG or DICOM), the very function
the service decodes uploads with, so the cache holds the pixels the service would see. A cached file is a
JPEG under the source's own relative path and name (a .png or .dcm source keeps its name): the readers go by
content, not by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from PIL import Image

from cxrlt.data.image_info import ImageDecodeError
from cxrlt.data.images import read_image
from cxrlt.data.manifest_io import ManifestError, load_manifest
from cxrlt.data.parallel import default_workers, run_chunked

DEFAULT_SIZE = 1024      # CheXFusion's input side; the demo pipeline passes its own, much smaller size
QUALITY = 95
# Bump when read_image gives other pixels for the same file. Version 1 (the one reader, images.py) changed
# 16-bit PNGs (stretched min-max; PIL's convert had clipped them at 255) and added DICOM; JPEGs are unchanged.
READER = "cxrlt.data.images/1"
_UNCHANGED_BY_READER = (".jpg", ".jpeg")


def _is_cached(path: Path, size: int) -> bool:
    try:
        with Image.open(path) as im:           # reads the header only
            return im.size == (size, size) and im.mode == "L"
    except (OSError, ValueError):
        return False


def cache_pixels(src: str, size: int) -> Image.Image:
    """The size x size grayscale picture the cache saves for a source (before JPEG encoding): exactly what
    `read_image(file bytes, size)` gives the service for the same file, whatever its format."""
    return read_image(src, size)[0]


def _resize_chunk(jobs: list[tuple[str, str]], _root: str, size: int) -> list[str]:
    """Resize (source, destination) pairs; returns 'path: reason' for images that could not be read."""
    failed = []
    for src, dst in jobs:
        try:
            im = cache_pixels(src, size)       # read_image only ever reads the source
        except ImageDecodeError as e:
            failed.append(f"{src}: {e}")
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = dst + ".part"
        im.save(tmp, format="JPEG", quality=QUALITY)
        os.replace(tmp, dst)
    return failed


def _refuse_overlap(out: Path, source_root: Path, manifest_dir: Path) -> None:
    if out == source_root or source_root in out.parents:
        raise ManifestError(f"The cache folder '{out}' is the source image folder or inside it ('{source_root}').",
                            hint="choose a new folder outside the source images, e.g. data/cache/<size>; "
                                 "the sources are never written to.")
    if out == manifest_dir:
        raise ManifestError(f"The cache folder '{out}' is the manifest folder itself.",
                            hint="choose a new folder: the cache gets its own manifest that points at it.")


def prepare_cache(manifest_dir, out_dir, size: int = DEFAULT_SIZE, workers: int | None = None,
                  progress: bool = True) -> Path:
    """Write every image of the manifest at `manifest_dir`, resized to size x size grayscale, under `out_dir`
    (same relative paths), plus `out_dir/manifest.csv|json` whose image root is the cache. Returns `out_dir`;
    `load_manifest(out_dir)` then gives the cached data set."""
    if int(size) != size or size < 8:
        raise ValueError(f"size must be an integer of at least 8 pixels, got {size!r}")
    size = int(size)
    m = load_manifest(manifest_dir)
    out, src_root = Path(out_dir).resolve(), m.image_root.resolve()
    _refuse_overlap(out, src_root, Path(manifest_dir).resolve())
    jobs, real_dirs = [], {}
    same_reader = _cached_reader(out) == READER    # else non-JPEG images cached by an older reader are redone
    for rel in m.frame["path"].drop_duplicates():
        src, dst = src_root / rel, out / rel
        parent = str(dst.parent)
        if parent not in real_dirs:             # a folder linked into the sources would let us overwrite them
            real_dirs[parent] = Path(os.path.realpath(parent))
            if real_dirs[parent] == src_root or src_root in real_dirs[parent].parents:
                raise ManifestError(f"The cache folder '{parent}' is linked into the source images.",
                                    hint="choose a cache folder without links into the source images.")
        if not _is_cached(dst, size) or not (same_reader or rel.lower().endswith(_UNCHANGED_BY_READER)):
            jobs.append((str(src), str(dst)))
    out.mkdir(parents=True, exist_ok=True)
    results = run_chunked(_resize_chunk, jobs, out, size, workers or default_workers(), progress,
                          f"cache {size}px")
    failed = [f for chunk in results for f in chunk]
    if failed:
        raise ManifestError(f"{len(failed)} image(s) could not be read while caching:",
                            [(f, 1) for f in failed],
                            "replace or remove the damaged files (the listed paths), or rebuild the manifest "
                            "with check_images=True; already cached images are kept and skipped next time.")
    meta = dict(m.meta)
    meta["image_root"] = "."
    meta["cache"] = {"size": size, "quality": QUALITY, "format": "JPEG under the source's name", "reader": READER,
                     "resize": "bilinear to size x size (aspect not kept)",
                     "source_manifest_md5": _md5_text(Path(manifest_dir) / "manifest.csv")}
    shutil.copyfile(Path(manifest_dir) / "manifest.csv", out / "manifest.csv")
    (out / "manifest.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _cached_reader(out: Path) -> str | None:
    """The reader version a complete earlier run recorded in the cache's manifest.json (None if none)."""
    try:
        return json.loads((out / "manifest.json").read_text())["cache"].get("reader")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _md5_text(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()
