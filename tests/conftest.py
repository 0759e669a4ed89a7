"""Shared fixtures: an isolated BentoML model store, a tiny registered model, a live service.

The environment is set when this file is imported, before anything imports bentoml or huggingface_hub:
both read their settings once, at import time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="cxrlt-tests-"))
os.environ["BENTOML_HOME"] = str(_SESSION_TMP / "bentoml")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
# the prediction store and the JSONL log it imports: the session's own, never the project's var/
os.environ["CXRLT_PREDICTION_DB"] = f"sqlite:///{_SESSION_TMP / 'var' / 'session-predictions.db'}"
os.environ["CXRLT_PREDICTION_LOG"] = str(_SESSION_TMP / "var" / "session-predictions.jsonl")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SERVICE_TOKEN = "test-token-7d1f"  # the session's service requires it (CXRLT_API_TOKEN), as a deployment would
AUTH = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
TINY_LABELS = {"Atelectasis": 400, "Cardiomegaly": 300, "Edema": 120, "Pneumothorax": 40, "Hernia": 8,
               "Tuberculosis": 3}


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for the whole session: flows run with the real engine."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def label_space():
    from cxrlt.labels import LabelSpace

    return LabelSpace.from_counts(TINY_LABELS, n_train=1000, synthetic=True)


def write_val_predictions(path: Path, names, n_studies: int = 60, seed: int = 0) -> Path:
    """A predictions_val.csv as evaluation writes it: dicom_id, study_id, one column per label."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_studies):
        p = rng.beta(2, 5, size=len(names))
        for k in range(1 + s % 2):  # studies of one or two images
            rows.append({"dicom_id": f"d{s:04d}_{k}", "study_id": f"s{s:04d}", **dict(zip(names, p))})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def tiny_artefact(session_tmp, label_space) -> Path:
    import torch

    from cxrlt.artefact.checkpoint import save_artefact
    from cxrlt.models import create_model

    torch.manual_seed(0)
    model = create_model("chexfusion_test", num_labels=len(label_space))
    out = save_artefact(session_tmp / "artefacts" / "tiny", model, model_name="chexfusion_test",
                        label_space=label_space, data={"image_size": 32}, variant="tiny", loss={"name": "asl"},
                        synthetic=True, metrics={"val": {"mAP": 0.5, "mAUC": 0.6, "mF1": 0.1}},
                        thresholds=[0.5, 0.45, 0.4, 0.3, 0.2, 0.1])
    (out / "eval").mkdir(exist_ok=True)
    write_val_predictions(out / "eval" / "predictions_val.csv", label_space.names)
    return out


@pytest.fixture(scope="session")
def served_tag(tiny_artefact) -> str:
    from cxrlt.registry import store

    # its own model name: registry tests that pick the best "cxrlt" model never see this fixture
    tag = store.register(tiny_artefact, name="cxrlt-fixture")
    store.set_serving(tag, reason="tests")
    return tag


@pytest.fixture
def serving(served_tag) -> str:
    """The tiny model, marked for serving again (other tests share the model store and may move the mark)."""
    from cxrlt.registry import store

    return store.set_serving(served_tag, reason="tests")


def tiny_demo_project(root: Path, params: dict) -> Path:
    """A 60-study demo, its manifest (val 20%) and a params.yaml in `root`: the small training projects of
    the resume and distributed tests."""
    import yaml

    from cxrlt.data.demo.generate import generate_demo
    from cxrlt.data.manifest import build_manifest

    generate_demo(root / "demo", n_studies=60, seed=3, progress=False)
    build_manifest(root / "demo/cxr-lt-2024", root / "demo/mimic-cxr-jpg", root / "manifest", val_fraction=0.2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(health: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until `health` answers 200; a process that exits or stays unready fails with its log's tail."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(health, timeout=10).status_code == 200:
                return
        except requests.RequestException:  # refused, or still starting (slow readyz)
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{proc.args[:4]} was not ready after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def server_process(cmd: list[str], health: str, log: Path, env: dict, timeout: float = 90):
    """Start a server (`cmd`, in the project root, with exactly `env`), wait until `health` answers 200,
    yield the process; stop it by its PID afterwards."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        _wait_ready(health, proc, log, timeout)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def prediction_db(session_tmp) -> str:
    """The session service's prediction store: a SQLite file (its URL)."""
    return store_url(session_tmp / "var" / "predictions.db")


def store_url(where: str | Path) -> str:
    """A SQLAlchemy URL as is; a path -> the SQLite file's URL."""
    return where if isinstance(where, str) and "://" in where else f"sqlite:///{Path(where).resolve()}"


@pytest.fixture(scope="session")
def service_url(served_tag, session_tmp, prediction_db):
    """`bentoml serve` of the real service on a free 127.0.0.1 port; stopped by its PID afterwards."""
    from cxrlt.registry import store

    store.set_serving(served_tag, reason="tests: service fixture")  # the service reads the mark at start
    with running_service(session_tmp / "service.log", prediction_db, token=SERVICE_TOKEN) as url:
        yield url


@contextlib.contextmanager
def running_service(log: Path, prediction_db: str | Path, token: str | None = None, env: dict | None = None):
    """Start `bentoml serve` (the model marked for serving) on a free port; yield its URL; stop it by PID.
    `prediction_db`: its prediction store (a SQLAlchemy URL, or a SQLite file's path); `token`: the service
    requires it (CXRLT_API_TOKEN); `env`: more settings."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CXRLT_PREDICTION_DB": store_url(prediction_db), "PYTHONPATH": str(ROOT), **(env or {})}
    env.pop("CXRLT_MODEL_TAG", None)
    env.pop("CXRLT_API_TOKEN", None)
    if token:
        env["CXRLT_API_TOKEN"] = token
    cmd = [sys.executable, "-m", "bentoml", "serve", "service.service:CXRService", "--host", "127.0.0.1",
           "--port", str(port)]
    with server_process(cmd, f"{url}/readyz", log, env, timeout=90):
        yield url


def image_bytes(fmt: str = "PNG", size=(96, 120), seed: int = 0, mode: str = "L") -> bytes:
    """A small synthetic radiograph-like image (portrait, over the input gate's minimum side) as PNG or JPEG."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    a = 100 + 60 * np.sin(x / (5 + seed)) * np.cos(y / 7) + rng.normal(0, 10, (size[1], size[0]))
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L")
    if mode != "L":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# --- a DVC project (git + DVC + demo data + dvc.yaml): the train-eval flow and dvc repro run in one
_BIN = Path(sys.executable).parent


def dvc_env() -> dict:
    """This environment's tools first on PATH, a git identity, no DVC analytics, one thread."""
    return {**os.environ, "PATH": f"{_BIN}{os.pathsep}{os.environ['PATH']}", "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
            "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}


def sh(repo: Path, *cmd, env=None, merged: bool = False) -> str:
    """Run a command; its stdout, or with `merged` stdout and stderr interleaved as written."""
    r = subprocess.run([str(c) for c in cmd], cwd=repo, env=env or dvc_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT if merged else subprocess.PIPE, text=True, timeout=900)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-5000:]}\n{(r.stderr or '')[-3000:]}"
    return r.stdout


def make_dvc_project(repo: Path, demo: Path, params: dict) -> Path:
    """A clone-like project: the code dvc.yaml depends on, the flows, dvc.yaml, params.yaml and the demo
    data, committed in git with DVC initialised and data/ tracked."""
    import yaml

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(demo, repo / "data" / "demo")
    for folder in ("cxrlt", "pipelines"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=ignore)
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    first = next(iter(params["variants"]))
    doc["artifacts"] = {first: {"path": f"models/{first}/weights.safetensors", "type": "model"}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("/models/\n/prepared/\n__pycache__/\n")
    sh(repo, "git", "init", "-q")
    sh(repo, _BIN / "dvc", "init", "-q")
    sh(repo, _BIN / "dvc", "add", "-q", "data")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "project")
    return repo


def drift_reports(folder: Path, shift: float, model_tag: str) -> Path:
    """Two drift reports in `folder` (a calm one, then one whose Edema predictions and mean intensity are
    shifted by `shift`) against 80 reference studies: the web app's Monitoring page has a history to show."""
    from cxrlt.monitoring.drift import drift_report

    rng = np.random.default_rng(0)
    ref = pd.DataFrame({"p_Edema": rng.beta(2, 5, 80), "p_Hernia": rng.beta(2, 5, 80),
                        "mean_intensity": rng.normal(120, 10, 80)})
    for s in (0.0, shift):
        cur = pd.DataFrame({"p_Edema": rng.beta(2 + s, 5, 40), "p_Hernia": rng.beta(2, 5, 40),
                            "mean_intensity": rng.normal(120 + 10 * s, 10, 40)})
        drift_report(cur, ref, folder, model_tag=model_tag, synthetic=True)
    return folder
