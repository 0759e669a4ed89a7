"""The real BentoML service over HTTP: predictions, every kind of bad input, batching, the prediction log."""

from __future__ import annotations

import json
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from conftest import AUTH, image_bytes

pytestmark = pytest.mark.slow
api = requests.Session()  # the session's service requires its access token, as a deployment would
api.headers.update(AUTH)


def post(url, images, views=None, data=None, **kw):
    files = [("images", img) for img in images]
    payload = dict(data or {})
    if views is not None:
        payload["views"] = views
    return api.post(f"{url}/predict", files=files or None, data=payload, timeout=60, **kw)


def png(seed=0, fmt="PNG", name=None):
    ext = "png" if fmt == "PNG" else "jpg"
    return (name or f"study-{seed}.{ext}", image_bytes(fmt, seed=seed), f"image/{'png' if fmt == 'PNG' else 'jpeg'}")


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height pixels, without the pixels (cheap bomb/size tests)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_predict_png_and_jpeg(service_url, served_tag, label_space):
    r = post(service_url, [png(1), png(2, "JPEG")], views=["frontal", "lateral"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body["probabilities"]) == list(label_space.names)
    assert set(body["thresholds"]) == set(label_space.names)
    # the service's answer is the library's prediction for these images and views, not just numbers in [0, 1]
    # images read at the model's size as the training cache reads them (JPEG: downscaled in the decoder)
    from cxrlt.data.images import read_image
    from cxrlt.inference import Predictor
    from cxrlt.registry.store import model_path

    predictor = Predictor.from_path(model_path(served_tag))
    imgs = [read_image(png(1)[1], size=predictor.image_size)[0],
            read_image(png(2, "JPEG")[1], size=predictor.image_size)[0]]
    ref = predictor.predict([imgs], [["frontal", "lateral"]])[0]
    np.testing.assert_allclose([body["probabilities"][n] for n in label_space.names], ref, atol=2e-6)
    assert body["findings"] == [n for n in sorted(label_space.names, key=lambda n: -body["probabilities"][n])
                                if body["probabilities"][n] >= body["thresholds"][n]]
    assert body["model_tag"] == served_tag and body["synthetic_model"] is True
    assert body["n_images"] == 2 and body["views"] == ["frontal", "lateral"]


def test_model_endpoints(service_url, served_tag, label_space):
    get = api.get(f"{service_url}/model", timeout=10).json()
    assert get["model_tag"] == served_tag and get["labels"] == list(label_space.names)
    assert get["thresholds"]["Tuberculosis"] == pytest.approx(0.1) and get["max_images"] == 4
    assert api.post(f"{service_url}/info", timeout=10).json() == get
    assert api.get(f"{service_url}/readyz", timeout=10).status_code == 200


def test_views_accepted_as_repeated_fields_json_or_comma_list(service_url):
    imgs = [png(3), png(4)]
    a = post(service_url, imgs, views=["frontal", "lateral"]).json()
    b = post(service_url, imgs, views=json.dumps(["frontal", "lateral"])).json()
    c = post(service_url, imgs, views="frontal, lateral").json()
    assert a["views"] == b["views"] == c["views"] == ["frontal", "lateral"]
    assert a["probabilities"] == b["probabilities"] == c["probabilities"]
    none = post(service_url, imgs).json()
    assert none["views"] == ["unknown", "unknown"]


BAD = {
    "not an image": (lambda: [("x.png", b"this is not an image", "image/png")], None, 415, "not a PNG, JPEG or DICOM"),
    "empty file": (lambda: [("x.png", b"", "image/png")], None, 400, "empty"),
    "truncated png": (lambda: [("x.png", image_bytes("PNG")[:120], "image/png")], None, 400, "image 1"),
    "gif": (lambda: [("x.gif", image_bytes("GIF"), "image/gif")], None, 415, "GIF images are not supported"),
    "five images": (lambda: [png(i) for i in range(5)], None, 400, "at most 4 images"),
    "too many bytes": (lambda: [("x.png", os.urandom(21 * 2**20), "image/png")], None, 413, "MiB"),
    "too many pixels": (lambda: [("x.png", png_header(7000, 7000), "image/png")], None, 413, "too large"),
    "decompression bomb": (lambda: [("x.png", png_header(40000, 40000), "image/png")], None, 413, "pixels"),
    "views count": (lambda: [png(1), png(2)], ["frontal"], 400, "2 images but 1 views"),
    "unknown view": (lambda: [png(1)], ["sideways"], 400, "unknown view"),
    "bad views json": (lambda: [png(1)], "[frontal", 400, "JSON"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_clear_4xx(service_url, case):
    files, views, status, message = BAD[case]
    r = post(service_url, files(), views=views)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_malformed_requests_are_4xx(service_url):
    url, mp = f"{service_url}/predict", {"content-type": "multipart/form-data; boundary=xx"}
    cases = {
        "form without files": (lambda: api.post(url, data={"views": "frontal"}, timeout=10), 415),
        "views only": (lambda: api.post(url, files=[("views", (None, "frontal"))], timeout=10), 400),
        "url instead of file": (lambda: api.post(url, files=[("images", (None, "http://example.com/x.png"))],
                                                      timeout=10), 400),
        "misspelt field": (lambda: api.post(url, files=[("image", png(1))], timeout=10), 400),
        "json body": (lambda: api.post(url, json={"images": ["x"]}, timeout=10), 415),
        "garbage multipart": (lambda: api.post(url, data=b"--xx\r\ngarbage", headers=mp, timeout=10), 400),
        "file as views": (lambda: api.post(url, files=[("images", png(1)), ("views", png(2))], timeout=10), 400),
        "chunked upload": (lambda: api.post(url, data=iter([b"--xx\r\n", b"x"]), headers=mp, timeout=10), 411),
    }
    for name, (send, status) in cases.items():
        r = send()
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.json()["error"], name


def model_calls(url) -> dict[int, int]:
    """Batch size -> number of model calls so far (the entry service's continuous batcher, GET /status)."""
    return {int(k): v for k, v in api.get(f"{url}/status", timeout=10).json()["batching"]["batch_sizes"].items()}


def test_concurrent_requests_are_batched_and_batch_independent(service_url):
    studies = [[png(10 + i), png(30 + i, "JPEG")] for i in range(16)]
    alone = [post(service_url, s, views=["frontal", "lateral"]).json()["probabilities"] for s in studies]
    before = model_calls(service_url)
    with ThreadPoolExecutor(8) as ex:
        rs = list(ex.map(lambda s: post(service_url, s, views=["frontal", "lateral"]), studies))
    assert [r.status_code for r in rs] == [200] * len(studies)
    for r, ref in zip(rs, alone):  # a study's answer does not depend on what it was batched with
        got = r.json()["probabilities"]
        np.testing.assert_allclose([got[k] for k in ref], list(ref.values()), atol=1e-5)
    after = model_calls(service_url)
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert sum(k * v for k, v in grew.items()) == len(studies)  # every study went to the model exactly once
    assert any(v > 0 for k, v in grew.items() if k > 1), f"no batch of more than one study: {grew}"


def test_prediction_store_has_no_identifiers(service_url, prediction_db, label_space):
    from cxrlt.monitoring.log import RECORD_KEYS
    from cxrlt.monitoring.store import open_store, read_store

    name = "patient-JohnDoe-123456.png"
    assert post(service_url, [png(5, name=name)], views=["frontal"]).status_code == 200
    rows = open_store(prediction_db).records()
    assert rows and name not in json.dumps(rows) and "JohnDoe" not in json.dumps(rows)
    for rec in rows:
        assert set(rec) == set(RECORD_KEYS)
        assert set(rec["probabilities"]) == set(label_space.names)
        assert all(set(s) == {"width", "height", "mean_intensity", "std_intensity"} for s in rec["image_stats"])
        assert rec["time"].endswith("Z")
    frame = read_store(prediction_db)
    assert {f"p_{n}" for n in label_space.names} <= set(frame.columns)
    assert frame["width"].iloc[-1] == 96.0  # the uploaded image's size, not the model's input size
