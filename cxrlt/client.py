"""A small HTTP client of the service: send studies from a manifest, as an uploader would.

Used by `make demo` (to give the drift report real traffic) and by people checking a deployment.
Only `requests` is needed; images are sent as the original files, never modified.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import requests

from cxrlt.data.manifest_io import load_manifest

DEFAULT_URL = "http://127.0.0.1:3000"


class ServiceError(RuntimeError):
    """The service did not answer with a prediction; `status` is its HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".dcm": "application/dicom"}


def auth_headers(token: str | None = None) -> dict:
    """`Authorization: Bearer ...` from `token`, else $CXRLT_API_TOKEN; nothing when neither is set."""
    token = token or os.environ.get("CXRLT_API_TOKEN", "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def post_study(url: str, paths: list[Path], views: list[str] | None = None, timeout: float = 60,
               session: requests.Session | None = None, token: str | None = None) -> dict:
    """POST one study (image files + optional views) to `<url>/predict`; returns the JSON answer."""
    files = [("images", (p.name, p.read_bytes(), MEDIA_TYPES.get(p.suffix.lower(), "application/octet-stream")))
             for p in map(Path, paths)]
    data = [("views", v) for v in views] if views else None
    try:
        r = (session or requests).post(f"{url.rstrip('/')}/predict", files=files, data=data, timeout=timeout,
                                       headers=auth_headers(token))
    except requests.ConnectionError:
        raise ServiceError(f"no service answers at {url}: start it with `make up` or `bentoml serve`") from None
    if r.status_code == 401:
        raise ServiceError("the service needs an access token: set CXRLT_API_TOKEN to its value", 401)
    if r.status_code != 200:
        ra = r.headers.get("retry-after", "")
        raise ServiceError(f"service answered {r.status_code}: {r.text[:300]}", r.status_code,
                           float(ra) if ra.replace(".", "", 1).isdigit() else None)
    return r.json()


def send_studies(url: str, manifest_dir: str | Path, split: str = "test", n: int = 40, seed: int = 0,
                 max_images: int = 4) -> dict:
    """Send `n` random studies of a manifest split; returns counts and round-trip latencies (ms). A study
    the input gate refuses (422: ~1% of genuine images by design) is counted, not an error; a 503 is
    retried after its Retry-After (up to 3 times)."""
    m = load_manifest(manifest_dir)
    studies = m.studies(split)
    if not studies:
        raise ValueError(f"manifest {manifest_dir} has no studies in split {split!r}")
    pick = np.random.default_rng(seed).permutation(len(studies))[:n]
    latencies, findings, refused, out = [], 0, 0, None
    with requests.Session() as s:
        for i in pick:
            _, rows = studies[i]
            rows = rows.head(max_images)
            for attempt in range(4):
                t = time.perf_counter()
                try:
                    out = post_study(url, [m.image_root / p for p in rows["path"]], list(rows["view"]), session=s)
                except ServiceError as e:
                    if e.status == 503 and attempt < 3:
                        time.sleep(min(30.0, e.retry_after or 1.0))
                        continue
                    if e.status != 422:
                        raise
                    refused += 1
                    break
                latencies.append((time.perf_counter() - t) * 1e3)
                findings += len(out["findings"])
                break
    if not latencies:
        raise ServiceError(f"the input gate refused all {refused} studies sent: is this the model's kind of data?", 422)
    lat = np.asarray(latencies)
    return {"studies": len(lat), "refused_by_gate": refused, "model_tag": out["model_tag"],
            "findings_per_study": findings / len(lat),
            "latency_ms_median": float(np.median(lat)), "latency_ms_p90": float(np.percentile(lat, 90))}
