"""An environment that holds only what some requirements install, made in seconds from this one.

`closure(requirements)` resolves the requirements (extras and markers evaluated) through the installed
distributions' own metadata to every distribution they pull in. `filtered_env(folder, requirements)` makes a
virtual environment whose site-packages sees only those distributions' files (symbolic links into this
environment's site-packages), so a program run with its Python finds exactly the modules an environment
built from the requirements would have: a missing requirement fails as it would in the built image, with
`ModuleNotFoundError`, and optional imports behave as they would there. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def requirement_lines(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith(("#", "-")):
            out.append(line)
    return out


def pinned_name(line: str) -> str:
    return canonicalize_name(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0])


def closure(requirements: list[str]) -> set[str]:
    """Canonical names of the installed distributions `requirements` pull in (markers evaluated here)."""
    seen: set[tuple[str, frozenset]] = set()
    names: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise RuntimeError(f"{req.name} is required but not installed in this environment") from None
        names.add(key[0])
        for raw in dist.requires or []:
            sub = Requirement(raw)
            envs = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append(sub)
    return names


def _owners(site: Path) -> dict[tuple[str, ...], set[str]]:
    """(top-level entry,) and (top-level, second-level) paths of site-packages -> distributions owning files."""
    owners: dict[tuple[str, ...], set[str]] = {}
    for dist in md.distributions(path=[str(site)]):
        name = canonicalize_name(dist.metadata["Name"])
        for f in dist.files or []:
            parts = Path(f).parts
            if not parts or parts[0] == "..":
                continue
            owners.setdefault(parts[:1], set()).add(name)
            if len(parts) > 1:
                owners.setdefault(parts[:2], set()).add(name)
    return owners


def filtered_env(folder: Path, requirements: list[str]) -> Path:
    """A virtual environment at `folder` that sees only the distributions `requirements` pull in: its python."""
    allowed = closure(requirements)
    site = Path(sysconfig.get_paths()["purelib"])
    owners = _owners(site)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    view = folder / "view"
    view.mkdir()
    for path, who in owners.items():
        if len(path) != 1 or not who & allowed:
            continue
        top = path[0]
        if who <= allowed:  # the whole entry belongs to allowed distributions
            (view / top).symlink_to(site / top)
            continue
        (view / top).mkdir()  # shared (a namespace such as nvidia/): link the allowed ones' entries below it
        for sub, sub_who in owners.items():
            if len(sub) == 2 and sub[0] == top and sub_who & allowed:
                (view / top / sub[1]).symlink_to(site / top / sub[1])
    purelib = Path(subprocess.run([str(folder / "bin" / "python"), "-c",
                                   "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "requirements-view.pth").write_text(f"{view}\n")
    return folder / "bin" / "python"
