"""Heatmaps on request (`/predict` with the form field `explain`) and what the model process does besides
scoring a study (explanations, free-text scores), so one study's extra work never fails its batch-mates.

The request: `explain` names 1 to MAX_EXPLAIN of the model's labels, as repeated fields or one comma list;
the word `findings` stands for the labels at or over their threshold (most probable first; named labels
come first, the total is capped at MAX_EXPLAIN). The answer gains `explanations`: one entry per finding and
uploaded image, each an 8-bit grey PNG (0 = no evidence, 255 = the strongest in the study) at the model's
input size. The maps are computed by `cxrlt.inference.Predictor.explain` (Grad-CAM, `cxrlt.explain`),
one study at a time, so they never depend on the studies batched with it: after the batch's forward pass,
one more forward pass for the study and one backward pass (head, fusion, tokenizer; never the backbone)
per finding (bench/bench_explain.py: 2.2x a plain prediction for one finding, 2.7x for five, on a CPU).
The batch-mates of a study with `explain` wait for it. Without `explain` nothing of this runs: the answer
and its speed are those of a plain prediction.
"""

from __future__ import annotations

import base64
import logging

from pydantic import BaseModel, Field

from cxrlt.inference import FINDINGS, MAX_EXPLAIN, StudyInputError, check_explain
from cxrlt.models.text import EncoderUnavailableError

from service.decoding import UploadError
from service.flow import ModelFailed

logger = logging.getLogger("cxrlt.service")

EXPLAIN_FIELD = {"type": "array", "items": {"type": "string"}, "maxItems": MAX_EXPLAIN,
                 "description": f"optional: findings to map (the model's label names, repeated or one comma "
                                f"list; '{FINDINGS}' = those over threshold); at most {MAX_EXPLAIN}. The answer "
                                "then carries `explanations`"}


class Explanation(BaseModel):
    finding: str = Field(description="the label whose evidence is mapped")
    image: int = Field(description="0-based index of the image in upload order")
    method: str = Field(description="gradcam: Grad-CAM on the backbone's last feature map for the label's logit")
    png: str = Field(description="base64 PNG, 8-bit grey at the model's input size: 0 = no evidence, 255 = the "
                                 "strongest evidence for this finding anywhere in the study")
    width: int
    height: int


def split_values(values: list, field: str) -> list[str]:
    """Form values as repeated fields or comma lists -> the non-empty items, stripped."""
    if any(not isinstance(v, str) for v in values):
        raise UploadError(400, f"'{field}' must be text, not a file")
    return [item.strip() for v in values for item in v.split(",") if item.strip()]


def explain_job(labels: list[str]):
    """-> job(fields) for `flow.score_study`: checks `explain` against the model's labels (400 naming the
    valid ones) and returns {"explain": [names or 'findings']}, or {} when it is absent."""
    def job(fields: dict) -> dict:
        values = fields.get("explain") or []
        if not values:
            return {}
        names = split_values(values, "explain")
        try:
            explicit, over = check_explain(names, labels)
        except StudyInputError as e:
            raise UploadError(400, str(e)) from None
        return {"explain": explicit + ([FINDINGS] if over else [])}
    return job


def explanations(predictor, images, views, findings: list[str], probs) -> list[dict]:
    """The model process's half: Predictor.explain -> JSON entries with base64 PNG heatmaps."""
    import torch

    from cxrlt.explain import heatmap_png

    out = []
    for d in predictor.explain(images, views, findings, probs=probs):
        png = base64.b64encode(heatmap_png(torch.from_numpy(d["map"]))).decode("ascii")
        out.append({"finding": d["finding"], "image": d["image"], "method": d["method"], "png": png,
                    "width": d["width"], "height": d["height"]})
    return out


def study_extras(predictor, study: dict, images, views, probs) -> dict:
    """What a study's item asks for besides its scores ("explain", "texts"), each computed for this study
    alone. A failure is this study's error ({"error": {"status", "message"}}), never its batch's."""
    out = {}
    try:
        if study.get("explain"):
            out["explanations"] = explanations(predictor, images, views, list(study["explain"]), probs)
        if study.get("texts"):
            scores = predictor.score_findings(images, list(study["texts"]), views)
            out["text_scores"] = [{"text": t, "probability": scores[t]} for t in study["texts"]]
    except StudyInputError as e:
        out = {"error": {"status": 400, "message": str(e)}}
    except EncoderUnavailableError as e:  # the model's text encoder is not installed where it is served
        logger.error("free-text scoring is unavailable: %s", e)
        out = {"error": {"status": 500, "message": f"free-text scoring is not available on this server: {e}"}}
    except Exception as e:  # e.g. a text encoder missing on this machine: the log says which kind
        logger.error("explaining / scoring text failed: %s: %s", e.__class__.__name__, str(e)[:200])
        out = {"error": {"status": 500, "message": f"the model failed on this request ({e.__class__.__name__}); "
                                                   "see the service log"}}
    return out


def raise_study_error(body: dict) -> None:
    """The entry service's half of `study_extras`' errors."""
    err = body.pop("error", None)
    if err:  # the model process's message says what failed (never input data): passed on as it is
        status = int(err["status"])
        raise UploadError(status, err["message"]) if status < 500 else ModelFailed(status, err["message"])
