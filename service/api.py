"""The entry service's HTTP routes, as a FastAPI app mounted by BentoML (so /docs lists them with their
fields and answers). The handlers stay thin: a study's way through admission, upload checks, the gate's
rules and the model service is `service/flow.py`; /predict adds the prediction store's record and, on request,
heatmaps (service/explain_route.py); /score_text is service/text_route.py. /docs (service/docs_page.py) is
added by service/service.py, which holds the spec it shows.

Answers: 200 a prediction; 4xx `{"error": ...}` for input the client can fix (422 when the input gate
refuses an image, with `gate` saying which checks ran and why); 503 with Retry-After when the service is
full or the model process is restarting; 500 only for a genuine fault, logged without any input data.
"""

from __future__ import annotations

import anyio
import bentoml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.explain_route import explain_job, raise_study_error
from service.flow import call_model, error_response, score_study, server_timing
from service.schemas import ERRORS, PREDICT_FORM, ErrorBody, Prediction
from service.text_route import router as text_router
from service.uploads import keep_uploads_in_memory

__all__ = ["app", "call_model"]

app = FastAPI(title="cxrlt", version="1", docs_url=None, redoc_url=None, openapi_url=None)
keep_uploads_in_memory()


@app.post("/predict", response_model=Prediction, openapi_extra=PREDICT_FORM,
          responses={k: {"model": ErrorBody, "description": v} for k, v in ERRORS.items()},
          summary="Score one study (1 to max_images radiographs); heatmaps on request")
async def predict(request: Request):
    """Findings of one study. Images are checked by the input gate (format, size, aspect, colour, DICOM
    modality and body part, and the model's out-of-distribution score); the answer says which checks ran.
    With `explain`, the answer also maps where each named finding's evidence lies in each image."""
    svc = bentoml.get_current_service()
    try:
        study, body, times = await score_study(request, ("explain",), explain_job(svc.info["labels"]))
        raise_study_error(body)
    except Exception as e:
        return error_response(e)
    explained = body.pop("explanations", None)
    body = {**body, "n_images": len(study.images), "views": study.views,
            "latency_ms": round(1000 * (times[4] - times[3]), 1), "gate": study.gate_report()}
    await anyio.to_thread.run_sync(svc.log, body, study)
    if explained is not None:
        body["explanations"] = explained
    return JSONResponse(body, headers={"Server-Timing": server_timing(times)})


@app.get("/model", summary="The served model: tag, labels, thresholds, limits, gate, text head")
async def model_info() -> dict:
    return bentoml.get_current_service().info


@app.get("/status", summary="Load: studies in progress, waiting and refused; batch sizes sent to the model; "
         "studies recorded in the prediction store and failures to record")
async def status() -> dict:
    svc = bentoml.get_current_service()
    return {"admission": svc.admission.status(), "batching": svc.batcher.status(),
            "prediction_store": svc.recorder.status()}


app.include_router(text_router)
