"""Real radiographs in, safely: the live service on a hostile corpus it builds itself (broken and odd images,
DICOMs of every kind, all carrying identifiers in every identifying field), the input gate's answers, the
access token, the documented API, and no identifier in anything the service or the drift report writes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import AUTH, image_bytes
from dicom_factory import ENCODABLE, PHI_VALUES, chest_pixels, make_dicom

pytestmark = pytest.mark.slow
api = requests.Session()
api.headers.update(AUTH)
CHEST = chest_pixels(160, 128, seed=3)


def post(url, files, views=None):
    data = {"views": views} if views is not None else None
    return api.post(f"{url}/predict", files=[("images", f) for f in files], data=data, timeout=60)


def dcm(name="x.dcm", **kw):
    kw.setdefault("size", (160, 128))
    return (name, make_dicom(CHEST, **kw), "application/dicom")


def pil_bytes(img: Image.Image, fmt="PNG", **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def grey(size=(96, 120), seed=0) -> Image.Image:
    return Image.open(io.BytesIO(image_bytes("PNG", size=size, seed=seed)))


def hostile_corpus() -> dict:
    """name -> (files, views, allowed statuses). Built here, so the test never depends on files on disk."""
    g = grey()
    cmyk, pal = g.convert("CMYK"), g.convert("P")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    sixteen = Image.fromarray(np.asarray(g, np.uint16) * 257)  # 16-bit grey ("I;16")
    colour = Image.fromarray(np.stack([np.asarray(g), np.zeros_like(np.asarray(g)), 255 - np.asarray(g)], -1), "RGB")
    html = b"<!DOCTYPE html><html><body>not an image</body></html>"
    ok, refused, bad = (200,), (422,), (400, 413, 415)
    c = {
        "empty": ([("a.png", b"", "image/png")], None, bad),
        "truncated png": ([("a.png", image_bytes("PNG")[:100], "image/png")], None, bad),
        "truncated jpeg": ([("a.jpg", image_bytes("JPEG")[:300], "image/jpeg")], None, bad + ok),
        "html as image": ([("a.png", html, "image/png")], None, bad),
        "cmyk jpeg": ([("a.jpg", pil_bytes(cmyk, "JPEG"), "image/jpeg")], None, ok),
        "palette png": ([("a.png", pil_bytes(pal), "image/png")], None, ok),
        "exif rotated jpeg": ([("a.jpg", pil_bytes(g, "JPEG", exif=exif), "image/jpeg")], None, ok),
        "16-bit png": ([("a.png", pil_bytes(sixteen), "image/png")], None, ok),
        "colour photo-like": ([("a.png", pil_bytes(colour), "image/png")], None, refused),
        "1x1": ([("a.png", pil_bytes(Image.new("L", (1, 1), 128)), "image/png")], None, refused),
        "10x4000 sliver": ([("a.png", pil_bytes(grey((10, 4000))), "image/png")], None, refused),
        "flat grey": ([("a.png", pil_bytes(Image.new("L", (200, 240), 90)), "image/png")], None, refused),
        "dicom with identifiers": ([dcm()], None, ok),
        "dicom monochrome1": ([dcm(photometric="MONOCHROME1")], None, ok),
        "dicom 16 bit signed": ([dcm(bits_stored=16, signed=True, rescale=(1.0, -1000.0))], None, ok),
        "dicom windowed": ([dcm(window=(2048, 3000))], None, ok),
        "dicom no pixels": ([dcm(with_pixels=False)], None, bad + refused),
        "dicom CT": ([dcm(modality="CT")], None, refused),
        "dicom MR": ([dcm(modality="MR")], None, refused),
        "dicom knee": ([dcm(body_part="KNEE")], None, refused),
        "dicom extremity": ([dcm(body_part="EXTREMITY")], None, refused),
        "dicom multi-frame": ([dcm(frames=2)], None, bad + refused),
        "dicom colour": ([dcm(samples=3, photometric="RGB")], None, bad + refused),
        "dicom truncated": ([("x.dcm", make_dicom(CHEST, size=(160, 128))[:1500], "application/dicom")], None, bad),
        "dicom lateral from header": ([dcm(view="LL"), dcm(view="PA")], None, ok),
    }
    for syntax in ENCODABLE:
        if syntax not in ("explicit",):
            c[f"dicom {syntax}"] = ([dcm(syntax=syntax)], None, ok)
    return c


CORPUS = hostile_corpus()


@pytest.fixture(scope="module")
def answers(service_url):
    return {name: post(service_url, files, views) for name, (files, views, _) in CORPUS.items()}


def test_hostile_corpus_gets_clear_answers_never_5xx(answers):
    wrong = {}
    for name, r in answers.items():
        allowed = CORPUS[name][2]
        body = r.json()
        if r.status_code not in allowed or (r.status_code != 200 and not body.get("error")):
            wrong[name] = (r.status_code, r.text[:300])
        if r.status_code == 200:
            assert all(np.isfinite(v) for v in body["probabilities"].values()), name
    assert not wrong, wrong


def test_gate_says_which_checks_ran_and_why(answers):
    ok = answers["dicom with identifiers"].json()
    assert ok["gate"]["passed"] and {"modality", "body_part", "size", "colour"} <= set(ok["gate"]["checks"])
    img = ok["gate"]["images"][0]
    assert img["format"] == "DICOM" and img["modality"] == "DX" and img["body_part"] == "CHEST"
    assert img["view"] == "frontal" and img["view_source"] == "header"
    ood = [c for c in img["gate"]["checks"] if c["name"] == "ood"]
    assert ood and ood[0]["ran"] is False and "no OOD gate" in ood[0]["message"]  # the tiny model has none
    for name, check in {"dicom CT": "modality", "dicom MR": "modality", "dicom knee": "body_part",
                        "dicom extremity": "body_part", "1x1": "size", "10x4000 sliver": "aspect",
                        "colour photo-like": "colour", "flat grey": "flat"}.items():
        body = answers[name].json()
        assert "refused by the input gate" in body["error"] and body["gate"]["passed"] is False, name
        failed = {c["name"] for c in body["gate"]["images"][-1]["gate"]["checks"] if c["passed"] is False}
        assert check in failed, (name, failed)
    assert "CT" in answers["dicom CT"].json()["error"] and "KNEE" in answers["dicom knee"].json()["error"]
    lat = answers["dicom lateral from header"].json()
    assert lat["views"] == ["lateral", "frontal"]


def test_views_from_the_client_win_over_the_header(service_url):
    r = post(service_url, [dcm(view="PA")], views=["lateral"])
    assert r.status_code == 200 and r.json()["views"] == ["lateral"]
    assert r.json()["gate"]["images"][0]["view_source"] == "client"


def test_same_chest_in_any_encoding_scores_alike(answers):
    base = answers["dicom with identifiers"].json()["probabilities"]
    for name in ("dicom monochrome1", "dicom windowed", *[f"dicom {s}" for s in ENCODABLE if s != "explicit"]):
        got = answers[name].json()["probabilities"]
        assert max(abs(got[k] - base[k]) for k in base) < 0.05, name


def test_no_identifier_anywhere(answers, service_url, session_tmp, prediction_db, served_tag, tmp_path):
    from cxrlt.monitoring.drift import run_drift
    from cxrlt.monitoring.store import open_store

    texts = {f"answer {n}": r.text for n, r in answers.items()}
    texts["prediction store"] = json.dumps(open_store(prediction_db).records())
    for f in (session_tmp / "var").glob("predictions.db*"):  # the SQLite file and its WAL, byte for byte
        texts[f"store file {f.name}"] = f.read_bytes().decode("latin-1")
    texts["service log"] = (session_tmp / "service.log").read_text(errors="replace")
    summary = run_drift(out_dir=tmp_path / "drift", tag=served_tag, db=prediction_db)
    assert summary["n_current"] >= 1
    for f in (tmp_path / "drift").rglob("*"):  # the latest report and its run folder (runs/<time>/)
        if f.is_file():
            texts[f"drift {f.relative_to(tmp_path / 'drift')}"] = f.read_text(errors="replace")
    leaks = {(where, v) for where, t in texts.items() for v in PHI_VALUES if v.lower() in t.lower()}
    assert not leaks, leaks
    assert "ZZDOE" not in json.dumps(api.get(f"{service_url}/status", timeout=10).json())


def test_token_is_required_except_for_health(service_url):
    for method, path in (("post", "/predict"), ("get", "/model"), ("post", "/info"), ("get", "/docs.json"),
                         ("get", "/metrics"), ("get", "/status")):
        r = getattr(requests, method)(f"{service_url}{path}", timeout=10)
        assert r.status_code == 401 and "Bearer" in r.json()["error"], path
        r = getattr(requests, method)(f"{service_url}{path}", timeout=10, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401, path
    for path in ("/readyz", "/livez"):
        assert requests.get(f"{service_url}{path}", timeout=10).status_code == 200


def test_predict_is_documented(service_url):
    spec = api.get(f"{service_url}/docs.json", timeout=10).json()
    op = spec["paths"]["/predict"]["post"]
    form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"images", "views"} <= set(form["properties"]) and form["required"] == ["images"]
    assert {"200", "400", "401", "413", "415", "422", "503"} <= set(op["responses"])
    schemas = spec["components"]["schemas"]
    assert {"probabilities", "findings", "gate"} <= set(schemas["Prediction"]["properties"])
