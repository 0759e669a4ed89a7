"""Every HTTP call the web app makes to the BentoML service (it never loads a model itself).

Settings: CXRLT_SERVICE_URL (default http://127.0.0.1:3000) and CXRLT_API_TOKEN (the service's access token,
sent as a Bearer token; also the admin token of the Models page). Each call returns the decoded JSON body or
raises `ServiceError` with a message written for the user (what happened, what to do).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import requests

MIME = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "dcm": "application/dicom",
        "dicom": "application/dicom"}
VIEWS = ("frontal", "lateral", "unknown")


@dataclass
class ServiceError(Exception):
    """A refused or failed call: `message` for the user; `gate` when the input gate refused an image."""

    message: str
    status: int | None = None
    gate: dict | None = None
    retry_after: str | None = None
    body: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def service_url() -> str:
    return os.environ.get("CXRLT_SERVICE_URL", "http://127.0.0.1:3000").rstrip("/")


def api_token() -> str:
    return os.environ.get("CXRLT_API_TOKEN", "").strip()


def auth_headers() -> dict:
    token = api_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def mime_of(name: str, fallback: str = "application/octet-stream") -> str:
    return MIME.get(name.rsplit(".", 1)[-1].lower(), fallback) if "." in name else fallback


def _unreachable(e: Exception) -> ServiceError:
    return ServiceError(f"The prediction service at {service_url()} is not reachable ({e.__class__.__name__}). "
                        "Start it with `make up` (or `bentoml serve service.service:CXRService`) or set "
                        "CXRLT_SERVICE_URL.")


def _answer(r: requests.Response) -> dict:
    try:
        body = r.json()
    except ValueError:
        body = {}
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]
    if not isinstance(body, dict):
        body = {"value": body}
    if r.status_code < 400:
        return body
    detail = body.get("error") or body.get("detail") or r.text[:300]
    kind = {401: "needs an access token (set CXRLT_API_TOKEN to the service's token)",
            422: "refused an image (input gate)",
            503: "is busy"}.get(r.status_code, "refused the request" if r.status_code < 500 else "failed")
    retry = r.headers.get("Retry-After")
    tail = f" Retry in {retry} s." if r.status_code == 503 and retry else ""
    raise ServiceError(f"The service {kind} (HTTP {r.status_code}): {detail}{tail}", r.status_code,
                       body.get("gate"), retry, body)


def _study_parts(files: list[tuple[str, bytes]]) -> list:
    return [("images", (name, data, mime_of(name))) for name, data in files]


def model_info(timeout: float = 5) -> dict:
    """GET /model: the served model's tag, labels, thresholds and limits."""
    try:
        r = requests.get(f"{service_url()}/model", timeout=timeout, headers=auth_headers())
    except requests.RequestException as e:
        raise _unreachable(e) from None
    return _answer(r)


def predict(files: list[tuple[str, bytes]], views: list[str], explain: list[str] | None = None,
            timeout: float = 120) -> dict:
    """POST /predict: one study (file name, bytes) with a view per image; `explain`: labels whose heatmaps
    to return (the service's word "findings" means those over threshold)."""
    data: dict = {"views": list(views)}
    if explain:
        data["explain"] = list(explain)
    try:
        r = requests.post(f"{service_url()}/predict", files=_study_parts(files), data=data, timeout=timeout,
                          headers=auth_headers())
    except requests.RequestException as e:
        raise _unreachable(e) from None
    return _answer(r)


def score_text(files: list[tuple[str, bytes]], views: list[str], texts: list[str], timeout: float = 120) -> dict:
    """POST /score_text: the probability of each free-text finding, for models with a text head."""
    try:
        r = requests.post(f"{service_url()}/score_text", files=_study_parts(files),
                          data={"views": list(views), "texts": list(texts)}, timeout=timeout, headers=auth_headers())
    except requests.RequestException as e:
        raise _unreachable(e) from None
    return _answer(r)
