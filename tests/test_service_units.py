"""The service's parts that need no server: admission control, the token check, the prediction log's
rotation and its tolerance of damaged lines."""

from __future__ import annotations

import asyncio
import json

import pytest

from service.admission import Admission, Overloaded
from service.auth import TokenAuth, bearer_ok


def run(coro):
    return asyncio.run(coro)


def test_admission_serves_in_order_then_refuses_beyond_the_queue():
    adm = Admission(max_active=2, max_waiting=3, budget_s=60)
    order, release = [], asyncio.Event

    async def main():
        gate = release()

        async def job(i):
            async with adm.slot():
                order.append(i)
                await gate.wait()

        tasks = [asyncio.create_task(job(i)) for i in range(5)]
        await asyncio.sleep(0.01)
        assert adm.active == 2 and adm.waiting == 3 and order == [0, 1]
        with pytest.raises(Overloaded) as e:  # the sixth finds the queue full: refused at once
            async with adm.slot():
                pass
        assert e.value.retry_after >= 1 and "capacity" in e.value.message
        gate.set()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3, 4] and adm.active == 0 and adm.waiting == 0
        assert adm.admitted == 5 and adm.refused == 1

    run(main())


def test_admission_cancelled_waiter_gives_its_place_back():
    adm = Admission(max_active=1, max_waiting=4, budget_s=60)

    async def main():
        hold = asyncio.Event()

        async def holder():
            async with adm.slot():
                await hold.wait()

        h = asyncio.create_task(holder())
        await asyncio.sleep(0.01)

        async def waiter():
            async with adm.slot():
                pass

        w = asyncio.create_task(waiter())
        await asyncio.sleep(0.01)
        assert adm.waiting == 1
        w.cancel()  # a client that disconnects while waiting
        await asyncio.sleep(0.01)
        assert adm.waiting == 0
        hold.set()
        await h
        assert adm.active == 0
        async with adm.slot():  # the slot is free again
            assert adm.active == 1

    run(main())


def test_admission_refuses_when_the_expected_wait_exceeds_the_budget():
    adm = Admission(max_active=1, max_waiting=100, budget_s=1.0)
    adm._service_s = 0.6  # measured: 0.6 s per study on one slot

    async def main():
        hold = asyncio.Event()

        async def holder():
            async with adm.slot():
                await hold.wait()

        tasks = [asyncio.create_task(holder()) for _ in range(2)]  # one active, one waiting (0.6 s)
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as e:  # a second waiter would wait 1.2 s > 1 s
            async with adm.slot():
                pass
        assert e.value.retry_after >= 2
        hold.set()
        await asyncio.gather(*tasks)

    run(main())


def test_bearer_token_check():
    assert bearer_ok("Bearer s3cret", "s3cret") and bearer_ok("bearer s3cret", "s3cret")
    for bad in (None, "", "s3cret", "Bearer", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "Bearer  x"):
        assert not bearer_ok(bad, "s3cret"), bad


def test_token_middleware_guards_every_route_but_health():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def call(path, header=None):
        sent = []

        async def send(msg):
            sent.append(msg)

        headers = [(b"authorization", header.encode())] if header else []
        run(TokenAuth(app, token="s3cret")({"type": "http", "path": path, "headers": headers}, None, send))
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    for path in ("/predict", "/model", "/info", "/docs", "/docs.json", "/metrics", "/status"):
        status, body = call(path)
        assert status == 401 and b"Bearer" in body and b"s3cret" not in body, path
        assert call(path, "Bearer s3cret")[0] == 200
    for path in ("/readyz", "/livez", "/healthz"):
        assert call(path)[0] == 200
    assert run_open(app) == 200


def run_open(app):
    sent = []

    async def send(msg):
        sent.append(msg)

    run(TokenAuth(app, token="")({"type": "http", "path": "/predict", "headers": []}, None, send))
    return sent[0]["status"]


def record(i=0, p=0.5):
    from cxrlt.monitoring.log import prediction_record

    return prediction_record(model_tag="cxrlt:x", probabilities={"A": p, "B": 1 - p}, views=["frontal"],
                             image_stats=[{"width": 10, "height": 10, "mean_intensity": 0.4, "std_intensity": 0.1}])


def test_prediction_log_rotates_and_reads_every_file(tmp_path):
    from cxrlt.monitoring.log import log_prediction, read_log, rotated_logs

    log = tmp_path / "p.jsonl"
    for i in range(7):  # a limit under one line: every write fills a file, which then rotates
        log_prediction(record(p=i / 10), log, max_bytes=1, keep=3)
    assert [f.name for f in rotated_logs(log)] == ["p.jsonl.3", "p.jsonl.2", "p.jsonl.1"]
    assert read_log(log)["p_A"].tolist() == [0.4, 0.5, 0.6]  # the newest 3, oldest first, whole lines
    line = len(log.with_name("p.jsonl.1").read_bytes())
    for i in range(7, 16):  # room for two to three lines per file
        log_prediction(record(p=i / 20), log, max_bytes=int(2.5 * line), keep=3)
    files = rotated_logs(log)  # 3 lines each: 7-9, 10-12, 13-15; the live file rotated after 15
    assert len(files) == 3 and all(json.loads(x) for f in files for x in f.read_text().splitlines())
    assert [round(v, 2) for v in read_log(log)["p_A"]] == [i / 20 for i in range(7, 16)]  # in order, none lost


def test_damaged_log_lines_never_break_reading(tmp_path):
    from cxrlt.monitoring.log import log_prediction, read_log

    log = tmp_path / "p.jsonl"
    log_prediction(record(p=0.25), log)
    good = log.read_text()
    bad = ['{"time": "t", "model_tag"', "not json", "[1, 2]", '{"time": 1}', "\udcff".encode("utf-8", "surrogatepass")
           .decode("utf-8", "replace"),
           json.dumps({"time": "t", "model_tag": "m", "n_images": 1, "probabilities": [0.1]}),
           json.dumps({"time": "t", "model_tag": "m", "n_images": 1, "probabilities": {"A": "NaN", "B": 0.5}}),
           json.dumps({"time": "t", "model_tag": "m", "n_images": 1, "probabilities": {"A": 7, "B": 0.5}}),
           json.dumps({"time": "t", "model_tag": "m", "n_images": "x", "probabilities": {"A": 0.1}})]
    with open(log, "ab") as f:
        f.write(b"\xff\xfe garbage bytes\n" + "\n".join(bad).encode() + b"\n" + good.encode())
    frame = read_log(log)
    assert len(frame) == 2 and frame["p_A"].tolist() == [0.25, 0.25]
