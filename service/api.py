"""The entry service's HTTP routes, as a FastAPI app mounted by BentoML (so /docs lists them with their
fields and answers). The handlers stay thin: admission (service/admission.py), upload checks and the
gate's rules (service/uploads.py), one call to the model service, the prediction log.

Answers: 200 a prediction; 4xx `{"error": ...}` for input the client can fix (422 when the input gate
refuses an image, with `gate` saying which checks ran and why); 503 with Retry-After when the service is
full or the model process is restarting; 500 only for a genuine fault, logged without any input data.
"""

from __future__ import annotations

import asyncio
import logging
import time

import anyio
import bentoml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from cxrlt.gate import GateCheck

from service.admission import Overloaded
from service.uploads import UploadError, build_study, check_request, keep_uploads_in_memory, read_form

logger = logging.getLogger("cxrlt.service")


class GateCheckBody(BaseModel):
    name: str = Field(description="format, size, aspect, colour, flat, modality, body_part or ood")
    ran: bool
    passed: bool | None = Field(description="null when the check could not run (message says why)")
    code: str | None = Field(None, description="the refusal's machine code")
    message: str = ""
    value: object = Field(None, description="what was measured")
    limit: object = Field(None, description="the bound it was held to")


class GateVerdict(BaseModel):
    passed: bool
    code: str | None
    reason: str | None
    ran: list[str]
    not_run: list[str]
    checks: list[GateCheckBody]


class GateImage(BaseModel):
    format: str = Field(description="PNG, JPEG or DICOM")
    width: int
    height: int
    chroma: float = Field(description="colourfulness 0..1 of the source (radiographs are grey)")
    view: str | None = Field(None, description="the view used: frontal, lateral or unknown")
    view_source: str | None = Field(None, description="client, header (DICOM ViewPosition) or none")
    modality: str | None = None
    body_part: str | None = None
    photometric: str | None = None
    bits_stored: int | None = None
    transfer_syntax: str | None = None
    gate: GateVerdict


class GateReport(BaseModel):
    passed: bool
    checks: list[str] = Field(description="the checks that ran on every image of the study")
    images: list[GateImage]


class Prediction(BaseModel):
    model_tag: str
    synthetic_model: bool = Field(description="true when the model was trained on synthetic data")
    probabilities: dict[str, float] = Field(description="label -> probability, in the model's label order")
    thresholds: dict[str, float] = Field(description="label -> decision threshold tuned on validation")
    findings: list[str] = Field(description="labels at or over their threshold, most probable first")
    n_images: int
    views: list[str]
    latency_ms: float = Field(description="time spent in the model service")
    gate: GateReport


class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong and what to do")
    gate: GateReport | None = None


PREDICT_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                   "description": "1 to max_images files of one study: PNG, JPEG or DICOM Part 10"},
        "views": {"type": "array", "items": {"type": "string", "enum": ["frontal", "lateral", "unknown"]},
                  "description": "one per image, in upload order (or one JSON / comma list); DICOM files "
                                 "without a view take it from ViewPosition"}}}}}}}
ERRORS = {400: "malformed upload (the error says what to fix)", 401: "missing or wrong access token",
          411: "no Content-Length", 413: "upload or image too large", 415: "not multipart/form-data",
          422: "refused by the input gate: not an adult chest radiograph (see `gate`)",
          503: "the service is full or the model is restarting: retry after Retry-After seconds"}

app = FastAPI(title="cxrlt", version="1", docs_url=None, redoc_url=None, openapi_url=None)
keep_uploads_in_memory()


def _error(status: int, message: str, gate: dict | None = None, retry_after: int | None = None) -> JSONResponse:
    body = {"error": message, **({"gate": gate} if gate else {})}
    return JSONResponse(body, status_code=status,
                        headers={"Retry-After": str(retry_after)} if retry_after else None)


class ModelUnavailable(Exception):
    def __init__(self, retry_after: int, message: str):
        super().__init__(message)
        self.retry_after, self.message = retry_after, message


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


@app.post("/predict", response_model=Prediction, openapi_extra=PREDICT_FORM,
          responses={k: {"model": ErrorBody, "description": v} for k, v in ERRORS.items()},
          summary="Score one study (1 to max_images radiographs)")
async def predict(request: Request):
    """Findings of one study. Images are checked by the input gate (format, size, aspect, colour, DICOM
    modality and body part, and the model's out-of-distribution score); the answer says which checks ran."""
    svc = bentoml.get_current_service()
    times = [time.perf_counter()]
    try:
        async with svc.admission.slot():
            times.append(time.perf_counter())
            blobs, views = await read_form(request, svc.max_images)
            times.append(time.perf_counter())
            check_request(blobs, views, svc.max_images)
            decoded = await svc.decoders.decode(blobs, svc.image_size)
            study = await anyio.to_thread.run_sync(build_study, decoded, views)  # gate rules: numpy at model size
            del blobs  # the uploads are not needed past decoding: keep memory bounded under load
            times.append(time.perf_counter())
            body = await svc.batcher.submit({"images": study.images, "views": study.views})
            times.append(time.perf_counter())
    except UploadError as e:
        return _error(e.status, e.message, e.gate)
    except (Overloaded, ModelUnavailable) as e:
        return _error(503, e.message, retry_after=e.retry_after)
    except Exception as e:  # a genuine fault: the log names the error class only, never input data
        logger.error("the model failed to score a study: %s", e.__class__.__name__)
        return _error(500, "the model failed to score the study; see the service log")
    study.gates = [g + [GateCheck(**o)] for g, o in zip(study.gates, body.pop("ood"))]
    gate = study.gate_report()
    refused = [i for i, g in enumerate(study.gates, 1) if not g.passed]
    if refused:
        return _error(422, f"image {refused[0]} was refused by the input gate: {study.gates[refused[0] - 1].reason}",
                      gate)
    body = {**body, "n_images": len(study.images), "views": study.views,
            "latency_ms": round(1000 * (times[4] - times[3]), 1), "gate": gate}
    await anyio.to_thread.run_sync(svc.log, body, study)
    # where the time went, for operators and bench/bench_serving.py (the Server-Timing header of browsers' tools)
    timing = ", ".join(f"{n};dur={1000 * (b - a):.1f}" for n, a, b in
                       zip(("queue", "read", "decode", "model"), times, times[1:]))
    return JSONResponse(body, headers={"Server-Timing": timing})


@app.get("/model", summary="The served model: tag, labels, thresholds, limits, gate")
async def model_info() -> dict:
    return bentoml.get_current_service().info


@app.get("/status", summary="Load: studies in progress, waiting and refused; batch sizes sent to the model")
async def status() -> dict:
    svc = bentoml.get_current_service()
    return {"admission": svc.admission.status(), "batching": svc.batcher.status()}
