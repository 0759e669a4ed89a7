"""Where an artefact came from: the git commit of the code and the DVC version of the data."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD's commit, with '-dirty' when tracked files differ from it; 'unknown' outside a repository."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
        commit = run("rev-parse", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no")
        return commit + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def file_md5(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_version(manifest_dir: str | Path, dvc_file: str | Path = "data.dvc") -> dict:
    """The data's identity: the DVC hash of data/ (from data.dvc) when present, and the manifest's md5."""
    out = {"manifest_md5": None, "dvc_md5": None}
    manifest = Path(manifest_dir) / "manifest.csv"
    if manifest.exists():
        out["manifest_md5"] = file_md5(manifest)
    dvc_file = Path(dvc_file)
    if dvc_file.exists():
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
        out["dvc_md5"] = outs[0].get("md5")
    return out
