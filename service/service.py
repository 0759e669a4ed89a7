"""The BentoML service: `bentoml serve service.service:CXRService` from the project root.

Two services, one process each (BentoML's model-composition pattern):

* `CXRService`, the entry point on the HTTP port (service/api.py): admission control (503 + Retry-After
  when full, service/admission.py), reads and checks uploads, decodes and resizes them to the model's input
  size and runs the input gate's rules (service/uploads.py), answers bad input with a 4xx JSON
  `{"error": ...}`, records every prediction in the prediction store (cxrlt.monitoring.store, through
  service/recording.py), and calls
* `CXRModel`, which holds the model and exposes ONE API that scores a batch of studies with
  `cxrlt.inference.Predictor` in a single forward pass, with the gate's out-of-distribution score. The
  entry service groups concurrent studies into those batches (service/batching.py; sizes in /status).

Routes on the entry port: POST /predict (multipart: `images` files, optional `views`, optional `explain`
for heatmaps), POST /score_text (the same plus `texts`: free-text findings, text-head models only), GET /model
(POST /info gives the same), GET /status (admission and batching counters), /docs (Swagger UI from local
assets only; the spec at /docs.json lists every route with its fields and answers), plus BentoML's /readyz,
/livez and /metrics. With CXRLT_API_TOKEN set, every
route but /readyz, /livez and /healthz needs `Authorization: Bearer <token>` (service/auth.py).

The model is the one marked for serving in the registry (`cxrlt registry promote`), unless the
environment variable CXRLT_MODEL_TAG names another. Other settings (environment): CXRLT_PREDICTION_DB (the
prediction store's SQLAlchemy URL; default a SQLite file, see cxrlt.monitoring.store.prediction_db_url),
CXRLT_PREDICTION_LOG (a JSONL log of earlier versions, imported into the store once),
CXRLT_DEVICE (default cuda when available), CXRLT_MAX_BATCH_SIZE (8 on CPU, 32 on a GPU),
CXRLT_SERVICE_TIMEOUT_S (60), and the admission limits of service/admission.py.
"""

from __future__ import annotations

import logging
import os

# Before torch loads OpenMP: its threads otherwise spin for ~100 ms after every forward pass, on the cores
# the entry service decodes uploads on (full-size studies decoded in 91 ms instead of 58 ms)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import bentoml  # noqa: E402
import numpy as np

from service.admission import Admission
from service.api import app, call_model
from service.batching import Batcher
from service.decoding import DecodePool
from service.docs_page import install_docs
from service.auth import TokenAuth
from service.recording import Recorder

logger = logging.getLogger("cxrlt.service")

MAX_IMAGES_SINGLE_VIEW = 4  # a single-image model averages over a study of up to this many images


def _use_gpu() -> bool:
    device = os.environ.get("CXRLT_DEVICE", "")
    if device:
        return device.startswith("cuda")
    import torch

    return torch.cuda.is_available()


GPU = _use_gpu()
# studies per model call (service/batching.py): a GPU scores 32 small studies in about the time of one
MAX_BATCH_SIZE = int(os.environ.get("CXRLT_MAX_BATCH_SIZE") or (32 if GPU else 8))
TIMEOUT_S = int(os.environ.get("CXRLT_SERVICE_TIMEOUT_S", "60"))
MODEL_RESOURCES = {"gpu": 1} if GPU else {"cpu": str(os.cpu_count() or 1)}


def served_model_tag() -> str:
    """CXRLT_MODEL_TAG, else the registry's serving mark, else the newest cxrlt model (inside a built
    bento, whose model store holds exactly the model packaged at build time)."""
    from cxrlt.registry import store

    tag = os.environ.get("CXRLT_MODEL_TAG") or store.serving_tag(required=False)
    if tag:
        return tag
    try:
        if bentoml.models.list(store.MODEL_NAME):
            return f"{store.MODEL_NAME}:latest"
    except bentoml.exceptions.NotFound:
        pass
    return store.serving_tag()  # raises: no model is marked for serving, and how to make one


MODEL_TAG = served_model_tag()


# one worker holding the model on its device (the GPU, when there is one); it takes one batch at a time,
# so its concurrency is 1 request (of up to MAX_BATCH_SIZE studies)
@bentoml.service(name="cxrlt_model", workers=1, threads=1, resources=MODEL_RESOURCES,
                 traffic={"timeout": TIMEOUT_S, "concurrency": 1})
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

    @bentoml.api
    def predict_studies(self, studies: list[dict]) -> list[dict]:
        """A batch of studies {"images": [uint8 SxS arrays at the model's size], "views": [...]} (grouped by
        the entry service's continuous batcher) -> one describe() body each, with "ood": the gate's
        out-of-distribution verdict per image. One forward pass for the batch, the gate's features included. A
        study may also ask for "explain" (finding names: "explanations" with heatmaps) or "texts" (free text:
        "text_scores"); those run for that study alone after the batch's pass (service/explain_route.py)."""
        from PIL import Image

        from service.explain_route import study_extras

        images = [[Image.fromarray(np.asarray(a, dtype=np.uint8), mode="L") for a in s["images"]] for s in studies]
        views = [s["views"] for s in studies]
        # the gate's OOD check of each image from the prediction's own backbone pass (a score never depends
        # on the batch-mates)
        probs, checks = self.predictor.predict_gated(images, views)
        out = []
        for s, p, imgs, vs, ood in zip(studies, probs, images, views, checks):
            body = {**self.predictor.describe(p), "ood": [c.as_dict() for c in ood]}
            if all(c.passed is not False for c in ood):  # heatmaps / text scores, one study at a time
                body.update(study_extras(self.predictor, s, imgs, vs, p))
            out.append(body)
        return out


@bentoml.service(name="cxrlt", workers=1, traffic={"timeout": TIMEOUT_S})
@bentoml.asgi_app(app, path="/")
class CXRService:
    """Entry service: admission, upload checks and the gate's rules, the prediction store, the model behind."""

    model = bentoml.depends(CXRModel)
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        from cxrlt.artefact.checkpoint import Artefact
        from cxrlt.artefact.meta import read_meta

        from cxrlt.inference import MAX_EXPLAIN

        from service.decoding import MAX_IMAGE_BYTES, MAX_PIXELS

        stored = self.model_ref
        meta = read_meta(stored.path)
        artefact = Artefact(stored.path, None, meta)  # metadata only: the weights live in CXRModel
        max_views = int(meta["model_config"]["max_views"])
        self.max_images = max_views if max_views > 1 else MAX_IMAGES_SINGLE_VIEW
        self.image_size = int(meta["data"]["image_size"])
        self.tag, self.synthetic = str(stored.tag), bool(meta.get("synthetic"))
        self.admission = Admission.from_env(MAX_BATCH_SIZE)
        self.decoders = DecodePool()
        self.decoders.warm()
        self.batcher = Batcher(lambda studies: call_model(self.model, studies), MAX_BATCH_SIZE)
        self.recorder = Recorder()  # the prediction store ($CXRLT_PREDICTION_DB; SQLite by default)
        names = artefact.label_space.names
        self.info = {"model_tag": self.tag, "synthetic_model": self.synthetic, "model": meta["model"],
                     "variant": meta.get("variant"), "labels": list(names),
                     "thresholds": {n: float(t) for n, t in zip(names, artefact.thresholds)},
                     "max_images": self.max_images, "image_size": self.image_size,
                     "max_image_bytes": MAX_IMAGE_BYTES, "max_pixels": MAX_PIXELS,
                     "formats": ["PNG", "JPEG", "DICOM"], "views": ["frontal", "lateral", "unknown"],
                     "gate": meta.get("gate"), "metrics": meta.get("metrics", {}),
                     "guarantee": {k: v for k, v in (meta.get("guarantee") or {}).items() if k != "labels"} or None,
                     "text_head": bool(meta.get("text_encoder")),  # POST /score_text works
                     "explain": {"methods": ["gradcam"], "max_findings": MAX_EXPLAIN}}

    async def __is_ready__(self) -> bool:
        """/readyz: ready only while the model service answers its own readiness probe (after a crash,
        until it has restarted and loaded the model again, the entry service says not ready)."""
        import asyncio

        try:  # a restarting worker's socket still accepts connections (the supervisor holds it): time out
            return bool(await asyncio.wait_for(self.model.is_ready(2), 3))
        except Exception:  # refused, reset, timed out: the model process is down or restarting
            return False

    def log(self, body: dict, study) -> None:
        """Record the answered study in the prediction store (service/recording.py); never raises."""
        self.recorder.record(body, study)

    @bentoml.api(route="/info")
    def model_details(self) -> dict:
        """The served model: tag, labels, thresholds, limits (same as GET /model)."""
        return self.info


CXRService.add_asgi_middleware(TokenAuth)


# after the class: the page serves the spec BentoML builds for it
install_docs(app, "cxrlt: chest X-ray findings", lambda: CXRService.openapi_spec.asdict())
