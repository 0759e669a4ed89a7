"""A content fingerprint of an image root that costs one `stat` per file when nothing changed.

The pipeline's first stages depend on the image root (MIMIC-CXR-JPG: 377,110 files). Declared as a DVC
dependency, DVC checks it file by file at every `dvc status` / `dvc repro` through its state database: about
a minute per 50,000 files here (bench/bench_dvc.py). Instead, the `images` stage (always run, it is cheap)
writes this fingerprint, and the stages that read images depend on that one small file:

- every regular file under the root (dot-files aside) is listed with its size and the md5 of its bytes;
- a file whose size, mtime and inode are those of the last run keeps its recorded md5 (the state file beside
  the fingerprint, as DVC's own state database does), so an unchanged root is one directory walk;
- the fingerprint holds the file count, the bytes and one digest over (path, size, md5) in path order, and
  nothing about times: a copy of the same images (new mtimes) hashes again but fingerprints the same, so
  nothing downstream reruns; one changed, added or removed image changes it, and the manifest and the cache
  are rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from cxrlt.provenance import file_md5

STATE_SUFFIX = ".state"


def walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(path relative to root, its stat) for every regular file under root, dot-files and folders aside."""
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir(follow_symlinks=True):
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=True):
                    yield os.path.relpath(e.path, root), e.stat(follow_symlinks=True)


def _read_state(path: Path) -> dict[str, tuple[int, int, int, str]]:
    """relpath -> (size, mtime_ns, inode, md5) of the last run; empty when missing or unreadable."""
    state = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                rel, size, mtime, ino, md5 = line.rstrip("\n").split("\t")
                state[json.loads(rel)] = (int(size), int(mtime), int(ino), md5)
    except (OSError, ValueError):
        return {}
    return state


def _write_state(path: Path, rows: dict[str, tuple[int, int, int, str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rel in sorted(rows):
            size, mtime, ino, md5 = rows[rel]
            f.write(f"{json.dumps(rel)}\t{size}\t{mtime}\t{ino}\t{md5}\n")   # a quoted name: tabs escaped
    os.replace(tmp, path)


def fingerprint_images(root: str | Path, out: str | Path, workers: int = 8, progress: bool = True) -> dict:
    """Write the fingerprint of `root` to `out` (JSON) and return it, with how many files were hashed."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root} is not a folder: set paths.images (params.yaml) to the folder "
                                "that holds the images (for MIMIC-CXR-JPG, the one with files/p10/...)")
    state_path = out.with_name(out.name + STATE_SUFFIX)
    old = _read_state(state_path)
    files = dict(walk(root))
    known, todo = {}, []
    for rel, st in files.items():
        prev = old.get(rel)
        if prev and prev[:3] == (st.st_size, st.st_mtime_ns, st.st_ino):
            known[rel] = prev
        else:
            todo.append(rel)
    # hashlib releases the GIL on large buffers, so threads overlap reading and hashing
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        digests = pool.map(lambda rel: file_md5(root / rel), todo)
        for rel, md5 in tqdm(zip(todo, digests), total=len(todo), desc="hash images", unit="file",
                             disable=not progress or not todo):
            st = files[rel]
            known[rel] = (st.st_size, st.st_mtime_ns, st.st_ino, md5)
    h = hashlib.sha256()
    for rel in sorted(known):
        h.update(f"{json.dumps(rel)}\0{known[rel][0]}\0{known[rel][3]}\n".encode())
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_state(state_path, known)
    result = {"files": len(known), "bytes": sum(v[0] for v in known.values()), "digest": h.hexdigest()}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return {**result, "hashed": len(todo)}
