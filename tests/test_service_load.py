"""The service under load and through a crash (a short version of bench/bench_serving.py): 32 concurrent
clients get answers or deliberate 503s with Retry-After, never a 500; memory stays flat; when the model
process is killed the service reports not-ready, comes back, and no stored study is lost."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from conftest import image_bytes, running_service, store_url

pytestmark = pytest.mark.slow
STUDY = [("a.png", image_bytes("PNG", seed=1), "image/png"), ("b.jpg", image_bytes("JPEG", seed=2), "image/jpeg")]


@pytest.fixture(scope="module")
def busy_service(served_tag, session_tmp):
    """A service with small admission limits, so that 32 clients overflow it on purpose."""
    from cxrlt.registry import store

    store.set_serving(served_tag, reason="tests: load")
    (session_tmp / "load").mkdir(exist_ok=True)
    db = store_url(session_tmp / "load" / "predictions.db")
    env = {"CXRLT_MAX_ACTIVE": "4", "CXRLT_MAX_WAITING": "8", "CXRLT_MAX_BATCH_SIZE": "4"}
    with running_service(session_tmp / "load" / "service.log", db, env=env) as url:
        yield url, db


def service_pids(url) -> list[int]:
    port = int(url.rsplit(":", 1)[1])
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port:
            root = psutil.Process(c.pid)
            while root.parent() and "bentoml" in " ".join(root.parent().cmdline()):
                root = root.parent()
            return [root.pid] + [p.pid for p in root.children(recursive=True)]
    raise AssertionError(f"no process listens on {url}")


def rss_mb(pids) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def burst(url, n=160, clients=32) -> tuple[Counter, list]:
    def one(_):
        try:
            r = requests.post(f"{url}/predict", files=[("images", f) for f in STUDY],
                              data={"views": ["frontal", "lateral"]}, timeout=60)
            return r.status_code, r.headers.get("retry-after")
        except requests.RequestException as e:
            return type(e).__name__, None

    with ThreadPoolExecutor(clients) as ex:
        out = list(ex.map(one, range(n)))
    return Counter(s for s, _ in out), [ra for s, ra in out if s == 503]


def test_32_clients_get_answers_or_503_never_500_and_memory_stays_flat(busy_service):
    url, _ = busy_service
    pids = service_pids(url)
    burst(url, 64)  # warm-up: allocator arenas, caches, the first batches
    sizes, statuses = [], Counter()
    for _ in range(3):
        counts, retry_after = burst(url)
        statuses += counts
        assert all(ra and ra.isdigit() and int(ra) >= 1 for ra in retry_after), retry_after[:5]
        sizes.append(rss_mb(pids))
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] >= 3 * 12, statuses  # at least the 4 + 8 places of each burst are served
    assert statuses[503] > 0, "32 clients against 4 + 8 places should be told to come back"
    assert sizes[-1] - sizes[0] < 40, f"resident memory grew over the bursts: {sizes} MB"


def test_model_process_killed_service_recovers_and_loses_no_stored_study(busy_service):
    from cxrlt.monitoring.store import open_store

    url, db = busy_service
    rows_before = open_store(db).count()
    model = [p for p in psutil.Process(service_pids(url)[0]).children(recursive=True)
             if "cxrlt_model" in " ".join(p.cmdline()) or "--service-name=cxrlt_model" in " ".join(p.cmdline())]
    if not model:  # the worker's command line names its service by index: take the one holding torch
        model = [p for p in psutil.Process(service_pids(url)[0]).children(recursive=True)
                 if any("torch" in m.path for m in p.memory_maps())]
    assert model, "cannot find the model worker process"
    readiness, stop = [], threading.Event()

    def probe():  # /readyz, polled throughout; no answer within 5 s counts as not ready
        while not stop.is_set():
            try:
                readiness.append(requests.get(f"{url}/readyz", timeout=5).status_code == 200)
            except requests.RequestException:
                readiness.append(False)
            time.sleep(0.2)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    time.sleep(0.5)
    answers, ready_again = Counter(), False
    os.kill(model[0].pid, signal.SIGKILL)
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            counts, _ = burst(url, n=4, clients=4)
            answers += counts
            if False in readiness and readiness[-1] and counts.get(200) == 4:
                ready_again = True
                break
            time.sleep(0.3)
    finally:
        stop.set()
        prober.join(10)
    not_ready = False in readiness
    assert not_ready, "readyz never reported the dead model"
    assert ready_again, f"the service did not come back within 90 s: {answers}"
    assert set(answers) <= {200, 503}, answers
    assert open_store(db).count() - rows_before == answers[200]  # every answered study is stored, nothing else
