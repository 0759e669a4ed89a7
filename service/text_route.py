"""POST /score_text: score a study against free-text finding descriptions (models with a text head).

A text-head model's queries are projections of label-text embeddings, so any text can be scored
(`cxrlt.inference.Predictor.score_findings`, with the text encoder and prompt form the model was trained
with). The study goes the way a /predict study goes (`flow.score_study`: admission, the same form fields
and limits, decoding, the input gate, the batcher); the texts ride along to the model process. A model
with learned per-label queries cannot read text: 409 before anything is read, saying which models can.
"""

from __future__ import annotations

import copy

import bentoml
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from cxrlt.models.prompts import parse_finding

from service.decoding import UploadError
from service.explain_route import raise_study_error
from service.flow import error, error_response, score_study, server_timing
from service.schemas import ERRORS, PREDICT_FORM, ErrorBody, GateReport

MAX_TEXTS, MAX_TEXT_CHARS = 10, 200
CAVEAT = ("Scores for free text are uncalibrated: the model was not trained to output the probability of these "
          "words, no decision threshold was tuned for them, and the number depends on the wording. A score is not "
          "the chance that the finding is present, and scores of different texts are not comparable with each "
          "other or with the trained labels' probabilities (the exception: a text that is exactly one of the "
          "model's labels, marked trained_label, uses that label's trained query). Use a score to rank studies "
          "for one text, never as a diagnosis.")


class TextScore(BaseModel):
    text: str = Field(description="the text as sent")
    probability: float = Field(description="the model's output for this text, 0..1 (uncalibrated, see caveat)")
    trained_label: bool = Field(description="true when the text is exactly one of the model's trained labels")


class TextScores(BaseModel):
    model_tag: str
    synthetic_model: bool = Field(description="true when the model was trained on synthetic data")
    scores: list[TextScore] = Field(description="one per text, in the order sent")
    calibrated: bool = Field(False, description="always false: see caveat")
    caveat: str
    n_images: int
    views: list[str]
    latency_ms: float = Field(description="time spent in the model service")
    gate: GateReport


def _text_form() -> dict:
    form = copy.deepcopy(PREDICT_FORM)
    schema = form["requestBody"]["content"]["multipart/form-data"]["schema"]
    schema["properties"].pop("explain")
    schema["properties"]["texts"] = {
        "type": "array", "minItems": 1, "maxItems": MAX_TEXTS,
        "items": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS},
        "description": f"1 to {MAX_TEXTS} finding descriptions, one per field (repeat the field; commas stay "
                       f"inside a text), each 1 to {MAX_TEXT_CHARS} characters: 'Name' or 'Name: description'"}
    schema["required"] = ["images", "texts"]
    return form


TEXT_ERRORS = {**ERRORS, 409: "the served model has no text head: it scores only its trained labels"}
router = APIRouter()


def check_texts(values: list) -> list[str]:
    """The `texts` form values -> the texts, stripped; 400 saying what is wrong."""
    if any(not isinstance(v, str) for v in values):
        raise UploadError(400, "'texts' must be text fields, not files")
    texts = [" ".join(v.split()) for v in values]
    if not 1 <= len(texts) <= MAX_TEXTS:
        raise UploadError(400, f"{len(texts)} texts: send 1 to {MAX_TEXTS} finding descriptions, one per 'texts' field")
    for i, t in enumerate(texts, 1):
        if not 1 <= len(t) <= MAX_TEXT_CHARS:
            raise UploadError(400, f"text {i} has {len(t)} characters: each text needs 1 to {MAX_TEXT_CHARS}")
        try:
            parse_finding(t)
        except ValueError as e:
            raise UploadError(400, f"text {i}: {e}") from None
    return texts


def text_job(fields: dict) -> dict:
    return {"texts": check_texts(fields.get("texts") or [])}


def _is_label(text: str, labels: set[str]) -> bool:
    name, description = parse_finding(text)
    return description is None and name in labels


def no_text_head(info: dict) -> str:
    return (f"model {info['model_tag']} (variant {info.get('variant') or 'unknown'}, {info['model']}) scores only its "
            f"{len(info['labels'])} trained labels: its decoder has one learned query per label and cannot read a "
            "finding's text. Free text needs a model with a text head: a variant trained with "
            "`model_args: {query: text}` and a `text_encoder` in params.yaml (GET /model says `text_head: true`). "
            "Serve one with `cxrlt registry promote` or CXRLT_MODEL_TAG; /predict scores the trained labels.")


@router.post("/score_text", response_model=TextScores, openapi_extra=_text_form(),
             responses={k: {"model": ErrorBody, "description": v} for k, v in TEXT_ERRORS.items()},
             summary="Score one study against free-text findings (text-head models only; uncalibrated)")
async def score_text(request: Request):
    """How strongly the study shows each described finding, from the text alone. The images take the
    /predict route's way (same fields, limits, decoding and input gate); the scores are uncalibrated."""
    svc = bentoml.get_current_service()
    if not svc.info.get("text_head"):
        return error(409, no_text_head(svc.info))
    try:
        study, body, times = await score_study(request, ("texts",), text_job)
        raise_study_error(body)
    except Exception as e:
        return error_response(e, "score the texts")
    labels = set(svc.info["labels"])
    scores = [{**d, "trained_label": _is_label(d["text"], labels)} for d in body["text_scores"]]
    answer = {"model_tag": body["model_tag"], "synthetic_model": body["synthetic_model"], "scores": scores,
              "calibrated": False, "caveat": CAVEAT, "n_images": len(study.images), "views": study.views,
              "latency_ms": round(1000 * (times[4] - times[3]), 1), "gate": study.gate_report()}
    return JSONResponse(answer, headers={"Server-Timing": server_timing(times)})
