"""One prediction store for many replicas: a real PostgreSQL (Debian's package, tests/pg_server.py) and two
`bentoml serve` replicas writing to it, 32 concurrent clients spread over both, one replica killed with
SIGKILL. Everything listens on 127.0.0.1; every process is stopped by its PID."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
from conftest import ROOT, _wait_ready, free_port, image_bytes

from cxrlt.monitoring.log import log_prediction, prediction_record

pytestmark = pytest.mark.slow
CLIENTS = 32
PER_CLIENT = 2
IDENTIFIERS = ("JohnDoe", "patient-", "study-", ".png", ".jpg", "MRN")


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    from pg_server import PostgresUnavailable, postgres_server

    log = tmp_path_factory.mktemp("pg") / "postgres.log"
    try:
        cm = postgres_server(log)
        url = cm.__enter__()
    except PostgresUnavailable as e:
        pytest.skip(str(e))
    try:
        yield url
    finally:
        cm.__exit__(None, None, None)


@contextlib.contextmanager
def replicas(n: int, db: str, legacy_log, folder, timeout: float = 150):
    """`n` service replicas started together, each on its own free loopback port, all recording into `db`
    (and importing the same earlier JSONL log at start); yields [(url, Popen)]; stops them by PID."""
    env = {**os.environ, "CXRLT_PREDICTION_DB": db, "CXRLT_PREDICTION_LOG": str(legacy_log),
           "PYTHONPATH": str(ROOT), "CXRLT_MAX_ACTIVE": "16", "CXRLT_MAX_WAITING": "64"}
    env.pop("CXRLT_MODEL_TAG", None)
    env.pop("CXRLT_API_TOKEN", None)
    started = []
    try:
        for i in range(n):
            port = free_port()
            log = folder / f"replica-{i}.log"
            with open(log, "wb") as fh:
                proc = subprocess_popen([sys.executable, "-m", "bentoml", "serve", "service.service:CXRService",
                                         "--host", "127.0.0.1", "--port", str(port)], env, fh)
            started.append((f"http://127.0.0.1:{port}", proc, log))
        for url, proc, log in started:
            _wait_ready(f"{url}/readyz", proc, log, timeout)
        yield [(url, proc) for url, proc, _ in started]
    finally:
        for _, proc, _ in started:
            stop_tree(proc, signal.SIGTERM)


def subprocess_popen(cmd, env, out):
    import subprocess

    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop_tree(proc, sig) -> None:
    """Signal a replica's process and the workers it started (by PID), then reap it."""
    try:
        tree = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    try:
        proc.wait(timeout=30)
    except Exception:
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
    deadline = time.monotonic() + 15  # the workers too (a SIGKILLed parent does not stop them)
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                              for p in tree):
        time.sleep(0.2)


def post(url: str, i: int) -> int:
    study = [(f"patient-JohnDoe-{i:04d}.png", image_bytes("PNG", seed=i % 7), "image/png"),
             (f"study-{i:04d}-MRN889.jpg", image_bytes("JPEG", seed=i % 5 + 1), "image/jpeg")]
    try:
        r = requests.post(f"{url}/predict", files=[("images", f) for f in study],
                          data={"views": ["frontal", "lateral"]}, timeout=60)
        return r.status_code
    except requests.RequestException:
        return -1


def send(urls: list[str], n: int, clients: int) -> dict[str, Counter]:
    """`n` studies from `clients` concurrent clients, spread over `urls` in turn; status counts per URL."""
    jobs = [(urls[i % len(urls)], i) for i in range(n)]
    with ThreadPoolExecutor(clients) as ex:
        codes = list(ex.map(lambda job: post(*job), jobs))
    out = {u: Counter() for u in urls}
    for (u, _), c in zip(jobs, codes):
        out[u][c] += 1
    return out


def test_two_replicas_share_one_postgres_store(postgres, served_tag, label_space, tmp_path):
    from cxrlt.monitoring.drift import run_drift
    from cxrlt.monitoring.store import open_store
    from cxrlt.registry import store as registry

    registry.set_serving(served_tag, reason="tests: two replicas")
    legacy = tmp_path / "predictions.jsonl"  # what an earlier version logged: both replicas import it, once
    probs = {n: 0.2 for n in label_space.names}  # the served tiny model's labels
    for _ in range(5):
        log_prediction(prediction_record(model_tag=served_tag, probabilities=probs, views=["frontal"],
                                         image_stats=[{"width": 96, "height": 120, "mean_intensity": 0.4,
                                                       "std_intensity": 0.1}], synthetic_model=True), legacy)
    t0 = time.monotonic()
    with replicas(2, postgres, legacy, tmp_path) as running:
        (url_a, proc_a), (url_b, _) = running
        started = time.monotonic() - t0
        pg = open_store(postgres)
        assert pg.count() == 5, "the earlier log must be imported exactly once by two replicas starting together"
        counts = send([url_a, url_b], CLIENTS * PER_CLIENT, CLIENTS)
        ok = {u: c[200] for u, c in counts.items()}
        assert all(set(c) <= {200, 503} for c in counts.values()), counts
        assert ok[url_a] > 0 and ok[url_b] > 0, counts  # both replicas answered
        assert pg.count() == 5 + sum(ok.values()), (pg.count(), counts)  # one row per 200, nothing else
        for url in (url_a, url_b):  # each replica counts what it recorded, and no failure
            status = requests.get(f"{url}/status", timeout=10).json()["prediction_store"]
            assert status["store"] == postgres and status["failed"] == 0 and status["recorded"] == ok[url], status

        rows = pg.records()
        text = json.dumps(rows)
        assert not [s for s in IDENTIFIERS if s in text], "a row carries an identifier"
        assert all(set(r) == {"time", "model_tag", "synthetic_model", "n_images", "views", "probabilities",
                              "image_stats"} for r in rows)
        summary = run_drift(out_dir=tmp_path / "drift", tag=served_tag, db=postgres)  # what `cxrlt drift` runs
        assert summary["n_current"] == 5 + sum(ok.values())  # both replicas' rows (and the imported ones)

        stop_tree(proc_a, signal.SIGKILL)  # a replica dies hard after its answers
        assert proc_a.returncode == -signal.SIGKILL
        assert pg.count() == 5 + sum(ok.values()), "rows of the killed replica were lost"
        after = send([url_b], 8, 4)[url_b]
        assert set(after) <= {200, 503}, after
        assert pg.count() == 5 + sum(ok.values()) + after[200]
        assert run_drift(out_dir=tmp_path / "drift", tag=served_tag, db=postgres)["n_current"] == pg.count()
    print(f"\ntwo replicas on PostgreSQL: started in {started:.0f} s; 200 answers {ok} of "
          f"{CLIENTS * PER_CLIENT} ({dict(counts[url_a] + counts[url_b])}); rows 5 imported + "
          f"{sum(ok.values())} + {after[200]} after replica A's SIGKILL = {pg.count()}; "
          f"total {time.monotonic() - t0:.0f} s")


def _write(args):
    from cxrlt.monitoring.store import open_store

    db, n = args
    st = open_store(db)  # the parent's engine (and its open connection) must not be used in the child
    probs = {"Edema": 0.5}
    for _ in range(n):
        st.record(prediction_record(model_tag="cxrlt:fork", probabilities=probs, views=["frontal"], image_stats=[]))
    return os.getpid()


def test_forked_writers_share_nothing_but_the_database(postgres):
    import multiprocessing as mp

    from cxrlt.monitoring.store import open_store

    st = open_store(postgres)
    before = st.count("cxrlt:fork")
    st.record(prediction_record(model_tag="cxrlt:fork", probabilities={"Edema": 0.1}, views=["frontal"],
                                image_stats=[]))  # the parent holds a pooled connection when it forks
    with mp.get_context("fork").Pool(4) as pool:
        pids = pool.map(_write, [(postgres, 25)] * 8)
    assert len(set(pids)) >= 2 and st.count("cxrlt:fork") == before + 1 + 8 * 25
