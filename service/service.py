"""The BentoML service: `bentoml serve service.service:CXRService` from the project root.

Two services, one process each (BentoML's model-composition pattern):

* `CXRService`, the entry point on the HTTP port: reads and checks uploads (service/uploads.py), answers
  bad input with a 4xx JSON `{"error": ...}`, logs every prediction (cxrlt.monitoring), and calls
* `CXRModel`, which holds the model and exposes ONE batchable API: concurrent studies are grouped by
  BentoML's adaptive batching (see `bentoml_service_adaptive_batch_size` in /metrics) and scored with
  `cxrlt.inference.Predictor` in a single forward pass.

Routes on the entry port: POST /predict (multipart: `images` files, optional `views`), GET /model
(POST /info gives the same),
plus BentoML's /readyz, /livez, /metrics and /docs.

The model is the one marked for serving in the registry (`cxrlt registry promote`), unless the
environment variable CXRLT_MODEL_TAG names another. Other settings (environment): CXRLT_PREDICTION_LOG,
CXRLT_DEVICE (default cuda when available), CXRLT_MAX_BATCH_SIZE (8), CXRLT_MAX_LATENCY_MS (500),
CXRLT_SERVICE_TIMEOUT_S (60).
"""

from __future__ import annotations

import logging
import os
import time

import anyio
import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.uploads import MAX_IMAGE_BYTES, MAX_PIXELS, UploadError, decode_study, read_form

logger = logging.getLogger("cxrlt.service")

MAX_IMAGES_SINGLE_VIEW = 4  # a single-image model averages over a study of up to this many images
MAX_BATCH_SIZE = int(os.environ.get("CXRLT_MAX_BATCH_SIZE", "8"))
# BentoML cancels (503) a request that has waited longer than this for a batch: keep it above the time
# one full batch takes on the serving hardware.
MAX_LATENCY_MS = int(os.environ.get("CXRLT_MAX_LATENCY_MS", "500"))
TIMEOUT_S = int(os.environ.get("CXRLT_SERVICE_TIMEOUT_S", "60"))


def served_model_tag() -> str:
    """CXRLT_MODEL_TAG, else the registry's serving mark, else the newest cxrlt model (inside a built
    bento, whose model store holds exactly the model packaged at build time)."""
    from cxrlt import registry

    tag = os.environ.get("CXRLT_MODEL_TAG") or registry.serving_tag(required=False)
    if tag:
        return tag
    try:
        if bentoml.models.list(registry.MODEL_NAME):
            return f"{registry.MODEL_NAME}:latest"
    except bentoml.exceptions.NotFound:
        pass
    return registry.serving_tag()  # raises: no model is marked for serving, and how to make one


MODEL_TAG = served_model_tag()


@bentoml.service(name="cxrlt_model", workers=1, threads=1, traffic={"timeout": TIMEOUT_S})
class CXRModel:
    """The model behind the entry service; only reachable from it."""

    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        import torch

        from cxrlt.inference import Predictor

        stored = self.model_ref
        device = os.environ.get("CXRLT_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.predictor = Predictor.from_path(stored.path, tag=str(stored.tag), device=device)
        logger.info("serving %s (%d labels) on %s", stored.tag, len(self.predictor.label_names), device)

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def predict_studies(self, studies: list[dict]) -> list[dict]:
        """Studies {"images": [uint8 HxW arrays], "views": [...]} -> one describe() body each."""
        import torch
        from PIL import Image

        with torch.inference_mode():
            probs = self.predictor.predict(
                [[Image.fromarray(np.asarray(a, dtype=np.uint8), mode="L") for a in s["images"]] for s in studies],
                [s["views"] for s in studies])
        return [self.predictor.describe(p) for p in probs]


async def predict(request: Request) -> JSONResponse:
    svc = bentoml.get_current_service()
    try:
        blobs, views = await read_form(request, svc.max_images)
        study = await anyio.to_thread.run_sync(decode_study, blobs, views, svc.max_images)
    except UploadError as e:
        return JSONResponse({"error": e.message}, status_code=e.status)
    t0 = time.perf_counter()
    try:
        [body] = await svc.model.to_async.predict_studies([{"images": study.images, "views": study.views}])
    except Exception as e:  # not the client's fault: 503 when the batcher sheds load, else 500
        busy = int(getattr(e, "error_code", 500)) == 503
        logger.log(logging.WARNING if busy else logging.ERROR, "model call failed: %s", e, exc_info=not busy)
        return JSONResponse({"error": "the model is busy: retry shortly" if busy else
                             "the model failed to score the study; see the service log"},
                            status_code=503 if busy else 500)
    body = {**body, "n_images": len(study.images), "views": study.views,
            "latency_ms": round(1000 * (time.perf_counter() - t0), 1)}
    await anyio.to_thread.run_sync(svc.log, body, study)
    return JSONResponse(body)


async def model_info(request: Request) -> JSONResponse:
    return JSONResponse(bentoml.get_current_service().info)


routes = Starlette(routes=[Route("/predict", predict, methods=["POST"]),
                          Route("/model", model_info, methods=["GET"])])


@bentoml.service(name="cxrlt", workers=1, traffic={"timeout": TIMEOUT_S})
@bentoml.asgi_app(routes, path="/")
class CXRService:
    """Entry service: upload checks, the prediction log, and the model service behind it."""

    model = bentoml.depends(CXRModel)
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        from cxrlt.checkpoint import Artefact, read_meta

        stored = self.model_ref
        meta = read_meta(stored.path)
        artefact = Artefact(stored.path, None, meta)  # metadata only: the weights live in CXRModel
        max_views = int(meta["model_config"]["max_views"])
        self.max_images = max_views if max_views > 1 else MAX_IMAGES_SINGLE_VIEW
        self.tag, self.synthetic = str(stored.tag), bool(meta.get("synthetic"))
        names = artefact.label_space.names
        self.info = {"model_tag": self.tag, "synthetic_model": self.synthetic, "model": meta["model"],
                     "variant": meta.get("variant"), "labels": list(names),
                     "thresholds": {n: float(t) for n, t in zip(names, artefact.thresholds)},
                     "max_images": self.max_images, "image_size": int(meta["data"]["image_size"]),
                     "max_image_bytes": MAX_IMAGE_BYTES, "max_pixels": MAX_PIXELS,
                     "views": ["frontal", "lateral", "unknown"], "metrics": meta.get("metrics", {})}

    def log(self, body: dict, study) -> None:
        from cxrlt.monitoring import log_prediction, prediction_record

        try:
            log_prediction(prediction_record(model_tag=body["model_tag"], probabilities=body["probabilities"],
                                             views=study.views, image_stats=study.stats,
                                             synthetic_model=body["synthetic_model"]))
        except Exception:  # the answer is still right; the monitoring gap is in the service log
            logger.exception("could not write the prediction log")

    @bentoml.api(route="/info")
    def model_details(self) -> dict:
        """The served model: tag, labels, thresholds, limits (same as GET /model)."""
        return self.info
