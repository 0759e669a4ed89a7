"""One study's way through the entry service, shared by every route that scores an uploaded study
(/predict, /score_text): admission slot, form, counts and views, decoding in the process pool, the input
gate's rules, one place in the continuous batcher's next model call, the gate's out-of-distribution
verdicts. Routes add their own form fields and what the model process should do besides scoring.

Errors: `UploadError` (4xx, 422 with the gate's report), `Overloaded` and `ModelUnavailable` (503 with
Retry-After); `error_response` turns any of them, or a genuine fault (500, logged by class name only, never
input data), into the JSON answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import anyio
import bentoml
from fastapi.responses import JSONResponse

from cxrlt.gate import GateCheck

from service.admission import Overloaded
from service.uploads import Study, UploadError, build_study, check_request, read_form

logger = logging.getLogger("cxrlt.service")


class ModelUnavailable(Exception):
    def __init__(self, retry_after: int, message: str):
        super().__init__(message)
        self.retry_after, self.message = retry_after, message


class ModelFailed(Exception):
    """The model process could not do what this study asked (its message says what, never input data)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def error(status: int, message: str, gate: dict | None = None, retry_after: int | None = None) -> JSONResponse:
    body = {"error": message, **({"gate": gate} if gate else {})}
    return JSONResponse(body, status_code=status,
                        headers={"Retry-After": str(retry_after)} if retry_after else None)


def error_response(e: Exception, what: str = "score the study") -> JSONResponse:
    if isinstance(e, UploadError):
        return error(e.status, e.message, e.gate)
    if isinstance(e, ModelFailed):
        return error(e.status, e.message)
    if isinstance(e, (Overloaded, ModelUnavailable)):
        return error(503, e.message, retry_after=e.retry_after)
    logger.error("the model failed to %s: %s", what, e.__class__.__name__)
    return error(500, f"the model failed to {what}; see the service log")


def _connection_lost(e: Exception) -> bool:
    """A call that never reached the model or lost its connection: safe to repeat (scoring is pure).

    BentoML's client to a dependency (1.4.30+, `_bentoml_impl.client.proxy2.SessionManager`) replaces its
    aiohttp session every 100 requests by closing the old one under the requests still in flight on it: they
    fail with ServerDisconnectedError or "Session is closed" (BentoML issues #5540 and #5544), which a burst
    of 32 clients hits every few seconds. The model process restarting looks the same."""
    import aiohttp
    import httpx

    return (isinstance(e, (aiohttp.ClientConnectionError, httpx.TransportError, ConnectionError))
            or (isinstance(e, RuntimeError) and "session is closed" in str(e).lower()))


async def call_model(model, studies: list[dict], attempts: int = 3) -> list[dict]:
    """One call of the model service for a batch of studies (service/batching.py makes the batches). A lost
    connection is retried (see `_connection_lost`), then answered as 503 (the model process is restarting)."""
    for attempt in range(attempts):
        try:
            return await model.to_async.predict_studies(studies)
        except Exception as e:
            if _connection_lost(e):
                if attempt + 1 < attempts:
                    await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                logger.warning("model service unreachable (%s): answering 503", e.__class__.__name__)
                raise ModelUnavailable(5, "the model is restarting: retry in a few seconds") from None
            if int(getattr(e, "error_code", 500)) == 503:
                raise ModelUnavailable(2, "the model is busy: retry shortly") from None
            raise


async def score_study(request, extra: tuple[str, ...] = (),
                      job: Callable[[dict], dict] | None = None) -> tuple[Study, dict, list[float]]:
    """-> (the checked study, the model's body for it, timestamps: arrival, admitted, read, decoded, scored).

    extra: form fields this route accepts besides `images` and `views`; job(their values, as lists) -> what
    the model process should do besides scoring (merged into the study's item, see CXRModel.predict_studies),
    raising UploadError for bad values: it runs before decoding, so bad options cost no decoding. A study
    refused by the gate's out-of-distribution check raises UploadError 422 with the gate's report."""
    svc = bentoml.get_current_service()
    times = [time.perf_counter()]
    async with svc.admission.slot():
        times.append(time.perf_counter())
        blobs, views, fields = await read_form(request, svc.max_images, extra)
        times.append(time.perf_counter())
        check_request(blobs, views, svc.max_images)
        options = job(fields) if job else {}
        decoded = await svc.decoders.decode(blobs, svc.image_size)
        study = await anyio.to_thread.run_sync(build_study, decoded, views)  # gate rules: numpy at model size
        del blobs  # the uploads are not needed past decoding: keep memory bounded under load
        times.append(time.perf_counter())
        body = await svc.batcher.submit({"images": study.images, "views": study.views, **options})
        times.append(time.perf_counter())
    study.gates = [g + [GateCheck(**o)] for g, o in zip(study.gates, body.pop("ood"))]
    refused = [i for i, g in enumerate(study.gates, 1) if not g.passed]
    if refused:
        raise UploadError(422, f"image {refused[0]} was refused by the input gate: "
                               f"{study.gates[refused[0] - 1].reason}", study.gate_report())
    return study, body, times


def server_timing(times: list[float]) -> str:
    """Where the time went, for operators and bench/bench_serving.py (the Server-Timing header)."""
    return ", ".join(f"{n};dur={1000 * (b - a):.1f}" for n, a, b in
                     zip(("queue", "read", "decode", "model"), times, times[1:]))
