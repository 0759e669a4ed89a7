"""The images, built and run: the Dockerfile's `service` and `stack` targets built with buildah on a local
Debian base (mmdebstrap), then the service and the web app started from them on 127.0.0.1.

Needs root with buildah and mmdebstrap (`make test` installs them as root); otherwise skipped with the reason.
The base and the build layers are cached between runs (buildah's storage, pip's downloads in a build cache),
so a rerun after a code change rebuilds only the code layers. Sizes and build times are printed and written to
var/bench/container-images.json.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

import buildah
from conftest import SERVICE_TOKEN, _wait_ready, free_port, image_bytes
from dicom_factory import ENCODABLE, make_dicom

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(buildah.missing_tools() is not None, reason=buildah.missing_tools() or "")]

ROOT = Path(__file__).resolve().parents[1]
APP_UID = 10001  # the Dockerfile's user
GPU_SKIP = ("the GPU image (--build-arg BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04 --build-arg "
            "CUDA_EXTRAS=keep) is not built here: no image registry is reachable for NVIDIA's base and no GPU "
            "is present to run it (README, Containers)")


@pytest.fixture(scope="module")
def images():
    """Both targets on the local Debian base: {target: image}; sizes and build times recorded."""
    base, base_s = buildah.debian_base()
    figures = {"base": {"image": base, "seconds": round(base_s, 1), "bytes": buildah.image_size(base)}}
    out = {}
    for target in ("service", "stack"):
        ref, seconds, _ = buildah.build(target, f"localhost/cxrlt-{target}:test", base)
        size = buildah.image_size(ref)
        out[target] = ref
        figures[target] = {"image": ref, "seconds": round(seconds, 1), "bytes": size}
        print(f"\n[image] {target}: {size / 1e9:.2f} GB, built in {seconds:.0f} s")
    print(f"[image] base {base}: {figures['base']['bytes'] / 1e6:.0f} MB, made in {base_s:.0f} s")
    # this project's images of earlier runs that these replaced (untagged, by the Dockerfile's title label):
    # not kept around; any other image on the machine is left alone
    old = buildah.buildah("images", "--quiet", "--filter", "dangling=true", "--filter",
                          "label=org.opencontainers.image.title=cxrlt", check=False).stdout.split()
    if old:
        buildah.buildah("rmi", *old, check=False)
    result = ROOT / "var" / "bench" / "container-images.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps({"measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  "cpus": os.cpu_count(), **figures}, indent=2) + "\n")
    return out


def chown_tree(root: Path, uid: int) -> None:
    os.chown(root, uid, uid)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), uid, uid, follow_symlinks=False)


@pytest.fixture
def store_dirs(tmp_path, serving):
    """A copy of the session's model store (BENTOML_HOME, with the tiny model marked for serving) and an
    empty folder for the prediction store, owned by the image's user as the volumes of compose.yaml are
    (BentoML writes its metrics folder into its home)."""
    home = tmp_path / "bentoml"
    shutil.copytree(os.environ["BENTOML_HOME"], home, symlinks=True,
                    ignore=shutil.ignore_patterns("prometheus_multiproc_dir", "tmp", "bentos"))
    var = tmp_path / "var"
    (var / "predictions").mkdir(parents=True)
    for p in (home, var):
        chown_tree(p, APP_UID)
    return home, var


def start_service(image: str, name: str, bentoml_home: Path, var: Path, log: Path, env: dict | None = None):
    port = free_port()
    box = buildah.Container(image, name)
    box.start(["bentoml", "serve", "service.service:CXRService", "--host", "127.0.0.1", "--port", str(port)],
              log, env={"CXRLT_API_TOKEN": SERVICE_TOKEN, **(env or {})},
              volumes={bentoml_home: "/home/app/bentoml", var: "/home/app/var"})
    try:
        _wait_ready(f"http://127.0.0.1:{port}/readyz", box.proc, log, timeout=180)
    except BaseException:
        box.stop()
        raise
    return box, f"http://127.0.0.1:{port}"


def stored_predictions(var: Path) -> int:
    """Rows in the prediction store the service wrote into the mounted folder: the SQLite store where the
    service has one, else the lines of the JSONL log."""
    db = var / "predictions" / "predictions.db"
    store_exists = (ROOT / "cxrlt" / "monitoring" / "store.py").exists()
    if store_exists:
        assert db.exists(), sorted(p.name for p in (var / "predictions").iterdir())
        with sqlite3.connect(db) as con:
            tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
            assert "predictions" in tables, tables
            return con.execute("select count(*) from predictions").fetchone()[0]
    log = var / "predictions" / "predictions.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_image_configuration(images):
    service = buildah.image_config(images["service"])["OCIv1"]["config"]
    assert service["User"] == f"{APP_UID}:{APP_UID}"
    assert service["Cmd"][:3] == ["bentoml", "serve", "service.service:CXRService"]
    env = dict(e.split("=", 1) for e in service["Env"])
    assert env["BENTOML_HOME"] == "/home/app/bentoml" and "CXRLT_API_TOKEN" not in env
    assert not any("/run/secrets" in v or "PIP_CERT" in k for k, v in env.items())  # the CA was a build secret
    health = buildah.image_config(images["service"])["Docker"]["config"]["Healthcheck"]["Test"]
    assert "/readyz" in " ".join(health)
    stack = buildah.image_config(images["stack"])["OCIv1"]["config"]
    assert stack["User"] == f"{APP_UID}:{APP_UID}" and stack["Entrypoint"] == ["cxrlt-stack"]


def test_cpu_image_has_no_gpu_only_packages_and_runs_torch(images, tmp_path):
    """The CPU image: torch and torchvision import and compute without the packages of docker/cuda-extras.txt."""
    code = ("import importlib.metadata as m, torch, torchvision.ops, timm;"
            "from cxrlt.models import create_model;"
            "net = create_model('chexfusion_test', num_labels=3).eval();"
            "x = torch.rand(1, 2, 3, 32, 32); v = torch.ones(1, 2, dtype=torch.bool);"
            "y = net(x, v);"
            "names = {d.metadata['Name'].lower() for d in m.distributions()};"
            "print('LOGITS', tuple(y.shape), torch.cuda.is_available(), sorted(names & {EXTRAS}))")
    extras = [ln.strip() for ln in (ROOT / "docker" / "cuda-extras.txt").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    log = tmp_path / "torch.log"
    with buildah.Container(images["service"], "cxrlt-test-torch") as box:
        box.start(["python", "-c", code.replace("{EXTRAS}", repr(set(extras)))], log)
        box.proc.wait(timeout=300)
    out = log.read_text()
    assert "LOGITS (1, 3) False []" in out, out[-3000:]


def test_service_image_serves_the_mounted_model(images, store_dirs, tmp_path, served_tag, label_space):
    bentoml_home, var = store_dirs
    box, url = start_service(images["service"], "cxrlt-test-service", bentoml_home, var, tmp_path / "svc.log")
    with box:
        # runs as the image's user, not root: every process of the service
        uids = {buildah.proc_uid(p) for p in box.processes()} - {None}
        assert uids == {APP_UID}, uids
        assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
        study = [("images", ("f.png", image_bytes("PNG", seed=1), "image/png")),
                 ("images", ("l.jpg", image_bytes("JPEG", seed=2), "image/jpeg"))]
        views = {"views": ["frontal", "lateral"]}
        assert requests.post(f"{url}/predict", files=study, data=views, timeout=60).status_code == 401
        bad = {"Authorization": "Bearer not-the-token"}
        assert requests.post(f"{url}/predict", files=study, data=views, headers=bad, timeout=60).status_code == 401
        auth = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
        r = requests.post(f"{url}/predict", files=study, data=views, headers=auth, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_tag"] == served_tag and list(body["probabilities"]) == list(label_space.names)
        # the container's answer is the host library's prediction for the same images
        from cxrlt.data.images import read_image
        from cxrlt.inference import Predictor
        from cxrlt.registry.store import model_path

        predictor = Predictor.from_path(model_path(served_tag))
        imgs = [read_image(image_bytes("PNG", seed=1), size=predictor.image_size)[0],
                read_image(image_bytes("JPEG", seed=2), size=predictor.image_size)[0]]
        ref = predictor.predict([imgs], [["frontal", "lateral"]])[0]
        np.testing.assert_allclose([body["probabilities"][n] for n in label_space.names], ref, atol=2e-5)

        syntax = "jpeg2000" if "jpeg2000" in ENCODABLE else "explicit"
        dcm = make_dicom(size=(160, 128), syntax=syntax)
        r = requests.post(f"{url}/predict", files=[("images", ("s.dcm", dcm, "application/dicom"))],
                          data={"views": ["frontal"]}, headers=auth, timeout=120)
        assert r.status_code == 200, f"{syntax} DICOM: {r.text}"
        assert r.json()["n_images"] == 1
        deadline = time.monotonic() + 20
        while stored_predictions(var) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert stored_predictions(var) == 2  # both answered studies, in the mounted volume
    assert not [p for p in box.processes()]


def test_web_app_image_sends_a_study_through_the_client_to_the_service_image(images, store_dirs, tmp_path,
                                                                              served_tag):
    """The stack image's web app and the service image, each from its image; one study sent by the web app's
    own client (ui/client.py) to the containerised service."""
    bentoml_home, var = store_dirs
    svc, url = start_service(images["service"], "cxrlt-test-service-ui", bentoml_home, var, tmp_path / "svc.log")
    with svc:
        port = free_port()
        ui = buildah.Container(images["stack"], "cxrlt-test-ui")
        with ui:
            ui.start(["cxrlt-stack", "ui"], tmp_path / "ui.log",
                     env={"UI_HOST": "127.0.0.1", "UI_PORT": str(port), "CXRLT_SERVICE_URL": url,
                          "CXRLT_API_TOKEN": SERVICE_TOKEN},
                     volumes={bentoml_home: "/home/app/bentoml", var: "/home/app/var"})
            _wait_ready(f"http://127.0.0.1:{port}/_stcore/health", ui.proc, tmp_path / "ui.log", timeout=120)
            assert {buildah.proc_uid(p) for p in ui.processes()} - {None} == {APP_UID}
            page = requests.get(f"http://127.0.0.1:{port}/", timeout=10)
            assert page.status_code == 200 and "<div id=\"root\">" in page.text

            sys.path.insert(0, str(ROOT / "ui"))
            try:
                import client
            finally:
                sys.path.remove(str(ROOT / "ui"))
            os.environ["CXRLT_SERVICE_URL"], os.environ["CXRLT_API_TOKEN"] = url, SERVICE_TOKEN
            try:
                info = client.model_info()
                answer = client.predict([("f.png", image_bytes("PNG", seed=5))], ["frontal"])
            finally:
                os.environ.pop("CXRLT_SERVICE_URL")
                os.environ.pop("CXRLT_API_TOKEN")
            assert info["model_tag"] == served_tag
            assert answer["model_tag"] == served_tag and answer["n_images"] == 1
            assert set(answer["probabilities"]) == set(info["labels"])


def test_prefect_server_and_service_images_on_postgresql(images, store_dirs, tmp_path, served_tag):
    """compose.yaml's wiring with a real PostgreSQL (Debian's package, tests/pg_server.py): the stack image's
    Prefect server on the `prefect` database (asyncpg) and its worker registering train-eval, the service
    image recording into the `predictions` database (psycopg)."""
    import pg_server

    try:
        pg = pg_server.postgres_server(tmp_path / "pg.log", database="prefect")
        prefect_url = pg.__enter__()
    except pg_server.PostgresUnavailable as e:
        pytest.skip(str(e))
    try:
        import psycopg
        from sqlalchemy.engine import make_url

        u = make_url(prefect_url)
        with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname="postgres", autocommit=True) as c:
            c.execute('CREATE DATABASE "predictions"')
        port = free_port()
        log = tmp_path / "prefect.log"
        with buildah.Container(images["stack"], "cxrlt-test-prefect") as box:
            box.start(["cxrlt-stack", "prefect-server"], log,
                      env={"PREFECT_SERVER_HOST": "127.0.0.1", "PREFECT_SERVER_PORT": str(port),
                           "PREFECT_API_DATABASE_CONNECTION_URL": str(u.set(drivername="postgresql+asyncpg")),
                           "PREFECT_SERVER_UI_V2_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
            _wait_ready(f"http://127.0.0.1:{port}/api/health", box.proc, log, timeout=180)
            api = f"http://127.0.0.1:{port}/api"
            flows = requests.post(f"{api}/flows/", json={"name": "container-check"}, timeout=30)
            assert flows.status_code in (200, 201), flows.text
            # the worker role (as compose.yaml runs it, on this project mounted at /project) registers the
            # deployments it runs
            with buildah.Container(images["stack"], "cxrlt-test-worker") as worker:
                wlog = tmp_path / "worker.log"
                worker.start(["cxrlt-stack", "worker"], wlog,
                             env={"PREFECT_API_URL": api, "CXRLT_PROJECT_DIR": "/project", "PYTHONPATH": "/project"},
                             volumes={ROOT: "/project:ro"})
                deadline = time.monotonic() + 180
                flows_served: set[str] = set()
                while not {"train-eval", "drift-report"} <= flows_served:
                    assert worker.proc.poll() is None, wlog.read_text()[-3000:]
                    assert time.monotonic() < deadline, f"{flows_served}:\n{wlog.read_text()[-3000:]}"
                    time.sleep(1)
                    deployments = requests.post(f"{api}/deployments/filter", json={}, timeout=10).json()
                    flow_names = {f["id"]: f["name"]
                                  for f in requests.post(f"{api}/flows/filter", json={}, timeout=10).json()}
                    flows_served = {flow_names.get(d["flow_id"]) for d in deployments}
                assert requests.get(f"{api}/deployments/name/train-eval/demo", timeout=10).status_code == 200
        with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname="prefect") as c:
            names = {r[0] for r in c.execute("select name from flow").fetchall()}
        assert {"container-check", "train-eval", "drift-report"} <= names

        bentoml_home, var = store_dirs
        db = str(u.set(database="predictions"))
        svc, url = start_service(images["service"], "cxrlt-test-service-pg", bentoml_home, var,
                                 tmp_path / "svc.log", env={"CXRLT_PREDICTION_DB": db})
        with svc:
            auth = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
            r = requests.post(f"{url}/predict", files=[("images", ("f.png", image_bytes("PNG", seed=3),
                                                                   "image/png"))],
                              data={"views": ["frontal"]}, headers=auth, timeout=120)
            assert r.status_code == 200, r.text
        with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname="predictions") as c:
            rows = c.execute("select model_tag from predictions").fetchall()
        assert rows == [(served_tag,)]
        assert not (var / "predictions" / "predictions.db").exists()  # nothing went to the SQLite default
    finally:
        pg.__exit__(None, None, None)


def test_gpu_image():
    pytest.skip(GPU_SKIP)
