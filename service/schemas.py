"""The entry service's answers and form fields as OpenAPI sees them (pydantic models shown in /docs)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from service.explain_route import EXPLAIN_FIELD, Explanation


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


class GuaranteedFindings(BaseModel):
    available: bool = Field(description="false when the model has no guarantee (statement says why)")
    set: list[str] = Field(description="the finding set that meets the recall guarantee, most probable first")
    confirmed: list[str] = Field(description="findings in the set that also meet the precision guarantee")
    uncertain: list[str] = Field(description="findings in the set not confirmed: the uncertain band, to check")
    statement: str = Field(description="the guarantee in words")
    recall_target: float | None = Field(None, description="mean per-study recall the set is guaranteed")
    precision_target: float | None = Field(None, description="mean per-study precision of confirmed findings")
    confidence: float | None = Field(None, description="the confidence of both, over the calibration draw")


class Prediction(BaseModel):
    model_tag: str
    synthetic_model: bool = Field(description="true when the model was trained on synthetic data")
    probabilities: dict[str, float] = Field(description="label -> probability, in the model's label order")
    thresholds: dict[str, float] = Field(description="label -> decision threshold tuned on validation")
    findings: list[str] = Field(description="labels at or over their threshold, most probable first")
    guarantee: GuaranteedFindings = Field(description="findings with a guarantee (conformal risk control, "
                                          "calibrated on the model's validation studies, one per patient)")
    n_images: int
    views: list[str]
    latency_ms: float = Field(description="time spent in the model service")
    gate: GateReport
    explanations: list[Explanation] | None = Field(None, description="only when `explain` was sent: one entry "
                                                   "per finding and image, findings in order, images in upload order")


class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong and what to do")
    gate: GateReport | None = None


PREDICT_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                   "description": "1 to max_images files of one study: PNG, JPEG or DICOM Part 10"},
        "views": {"type": "array", "items": {"type": "string", "enum": ["frontal", "lateral", "unknown"]},
                  "description": "one per image, in upload order (or one JSON / comma list); DICOM files "
                                 "without a view take it from ViewPosition"},
        "explain": EXPLAIN_FIELD}}}}}}
ERRORS = {400: "malformed upload (the error says what to fix)", 401: "missing or wrong access token",
          411: "no Content-Length", 413: "upload or image too large", 415: "not multipart/form-data",
          422: "refused by the input gate: not an adult chest radiograph (see `gate`)",
          503: "the service is full or the model is restarting: retry after Retry-After seconds"}
