"""The service's heatmaps (/predict with `explain`), free-text scoring (/score_text) and its /docs page that
requests nothing outside the machine, over HTTP against the real BentoML service."""

from __future__ import annotations

import base64
import io
import re
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urljoin, urlparse

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import AUTH, SERVICE_TOKEN, image_bytes, running_service

pytestmark = pytest.mark.slow
api = requests.Session()
api.headers.update(AUTH)
VIEWS = ["frontal", "lateral"]


def png(seed: int, size=(96, 120)) -> tuple[str, bytes, str]:
    return (f"s{seed}.png", image_bytes("PNG", size=size, seed=seed), "image/png")


def post(url, route, images, views=None, fields=()):
    data = [("views", v) for v in views or []] + list(fields)
    return api.post(f"{url}{route}", files=[("images", i) for i in images], data=data, timeout=60)


def decoded(images, size):
    from cxrlt.data.images import read_image

    return [read_image(i[1], size=size)[0] for i in images]


# ------------------------------------------------------------------ /predict with explain

def test_explain_adds_heatmaps_and_changes_nothing_else(service_url, served_tag, label_space):
    from cxrlt.inference import Predictor
    from cxrlt.registry.store import model_path

    study = [png(1), png(2)]
    plain = post(service_url, "/predict", study, VIEWS)
    assert plain.status_code == 200 and "explanations" not in plain.json()
    r = post(service_url, "/predict", study, VIEWS, [("explain", "Edema"), ("explain", "Atelectasis")])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["probabilities"] == plain.json()["probabilities"] and body["findings"] == plain.json()["findings"]
    ex = body["explanations"]
    assert [(e["finding"], e["image"]) for e in ex] == [("Edema", 0), ("Edema", 1), ("Atelectasis", 0),
                                                       ("Atelectasis", 1)]
    predictor = Predictor.from_path(model_path(served_tag))
    ref = predictor.explain(decoded(study, predictor.image_size), VIEWS, ["Edema", "Atelectasis"])
    for e, want in zip(ex, ref):
        img = Image.open(io.BytesIO(base64.b64decode(e["png"])))
        assert img.format == "PNG" and img.mode == "L"
        assert img.size == (e["width"], e["height"]) == (predictor.image_size, predictor.image_size)
        assert e["method"] == "gradcam"
        # the service's heatmap is the library's, for these pixels and views
        np.testing.assert_allclose(np.asarray(img, dtype=float), np.round(want["map"] * 255), atol=1)


def test_explain_findings_word_and_comma_list(service_url, label_space):
    r = post(service_url, "/predict", [png(3)], ["frontal"], [("explain", "findings")])
    assert r.status_code == 200, r.text
    body = r.json()
    assert [e["finding"] for e in body["explanations"]] == body["findings"][:5]
    r = post(service_url, "/predict", [png(3)], ["frontal"], [("explain", "Hernia, Edema")])
    assert [e["finding"] for e in r.json()["explanations"]] == ["Hernia", "Edema"]


@pytest.mark.parametrize("fields,status,message", [
    ([("explain", "Nodule")], 400, "unknown finding(s) ['Nodule'] to explain: this model's labels are"),
    ([("explain", ",".join(["Atelectasis", "Cardiomegaly", "Edema", "Pneumothorax", "Hernia", "Tuberculosis"]))],
     400, "at most 5"),
    ([("explain", " , ")], 400, "name 1 to 5 findings"),
    ([("explian", "Edema")], 400, "unknown form field(s) ['explian']"),
])
def test_bad_explain_is_a_clear_400(service_url, fields, status, message):
    r = post(service_url, "/predict", [png(4)], ["frontal"], fields)
    assert r.status_code == status and message in r.json()["error"], r.text
    if "labels are" in message:
        assert "Tuberculosis" in r.json()["error"]


def test_a_studys_heatmaps_do_not_depend_on_its_batch_mates(service_url):
    a = [png(20), png(21)]
    fields = [("explain", "Atelectasis,Hernia")]
    alone = post(service_url, "/predict", a, VIEWS, fields).json()["explanations"]
    jobs = [a if i % 3 == 0 else [png(40 + i)] for i in range(12)]
    before = api.get(f"{service_url}/status", timeout=10).json()["batching"]["batch_sizes"]
    with ThreadPoolExecutor(6) as ex:
        rs = list(ex.map(lambda s: post(service_url, "/predict", s, VIEWS[:len(s)], fields), jobs))
    after = api.get(f"{service_url}/status", timeout=10).json()["batching"]["batch_sizes"]
    assert all(r.status_code == 200 for r in rs)
    grew = {k: v - before.get(k, 0) for k, v in after.items()}
    assert any(v > 0 for k, v in grew.items() if int(k) > 1), f"no batch of several studies: {grew}"
    for s, r in zip(jobs, rs):
        if s is a:
            assert r.json()["explanations"] == alone  # byte for byte, whoever shared the batch


def test_a_studys_failure_stays_its_own(tiny_artefact):
    """The model process's extra work fails per study (an error entry), never for the whole batch."""
    from cxrlt.inference import Predictor
    from service.explain_route import study_extras

    predictor = Predictor.from_path(tiny_artefact)
    imgs = decoded([png(1)], predictor.image_size)
    probs = predictor.predict([imgs])[0]
    bad = study_extras(predictor, {"texts": ["edema"]}, imgs, None, probs)  # learned queries: no text
    assert bad == {"error": {"status": 400, "message": bad["error"]["message"]}}
    assert "cannot score new findings" in bad["error"]["message"]
    good = study_extras(predictor, {"explain": ["Edema"]}, imgs, None, probs)
    assert [e["finding"] for e in good["explanations"]] == ["Edema"]
    assert study_extras(predictor, {}, imgs, None, probs) == {}


# ------------------------------------------------------------------ /score_text

def test_score_text_on_a_model_without_text_head_is_409(service_url):
    r = post(service_url, "/score_text", [png(5)], ["frontal"], [("texts", "pleural effusion")])
    assert r.status_code == 409, r.text
    msg = r.json()["error"]
    assert "scores only its" in msg and "query: text" in msg and "text_head" in msg
    assert api.get(f"{service_url}/model", timeout=10).json()["text_head"] is False


@pytest.fixture(scope="module")
def text_service(session_tmp, served_tag, label_space):
    """A second service on a tiny text-head model (the session's model has learned queries)."""
    from dataclasses import asdict

    import torch

    from cxrlt.registry import store
    from cxrlt.artefact.checkpoint import save_artefact
    from cxrlt.models import create_model
    from cxrlt.models.text import TextEncoderSpec, embedding_id, encode_labels

    spec = TextEncoderSpec(name="tiny", prompt="description")
    emb = encode_labels(label_space.names, spec, use_cache=False)
    torch.manual_seed(0)
    model = create_model("chexfusion_test", num_labels=len(label_space), query="text", label_embeddings=emb)
    art = save_artefact(session_tmp / "artefacts" / "text", model, model_name="chexfusion_test",
                        label_space=label_space, data={"image_size": 64}, variant="tiny-text", synthetic=True,
                        text_encoder={**asdict(spec), "embedding_id": embedding_id(label_space.names, spec)},
                        metrics={"val": {"mAP": 0.5, "mAUC": 0.6, "mF1": 0.1}}, thresholds=[0.5] * len(label_space))
    tag = store.register(art, name="cxrlt-text-fixture")
    store.set_serving(tag, reason="tests: text-head service")
    try:
        with running_service(session_tmp / "text-service.log", session_tmp / "var" / "text-predictions.db",
                             token=SERVICE_TOKEN) as url:
            store.set_serving(served_tag, reason="tests")  # both processes have read the mark by now
            yield url, art
    finally:
        store.set_serving(served_tag, reason="tests")


def test_score_text_scores_each_text_as_the_library_does(text_service):
    from cxrlt.inference import Predictor

    url, art = text_service
    study = [png(6), png(7)]
    texts = ["Edema", "small left apical pneumothorax", "Pleural effusion: fluid, blunted costophrenic angle"]
    r = post(url, "/score_text", study, VIEWS, [("texts", t) for t in texts])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["calibrated"] is False and "uncalibrated" in body["caveat"] and "not the chance" in body["caveat"]
    assert [s["text"] for s in body["scores"]] == texts
    assert [s["trained_label"] for s in body["scores"]] == [True, False, False]
    assert body["gate"]["passed"] and body["n_images"] == 2 and body["views"] == VIEWS
    predictor = Predictor.from_path(art)
    ref = predictor.score_findings(decoded(study, predictor.image_size), texts, VIEWS)
    assert [s["probability"] for s in body["scores"]] == pytest.approx([ref[t] for t in texts], abs=1e-5)
    # a text-head model explains its trained labels too
    r = post(url, "/predict", study, VIEWS, [("explain", "Edema")])
    assert r.status_code == 200 and len(r.json()["explanations"]) == 2
    assert api.get(f"{url}/model", timeout=10).json()["text_head"] is True


@pytest.mark.parametrize("fields,status,message", [
    ([], 400, "send 1 to 10 finding descriptions"),
    ([("texts", f"finding {i}") for i in range(11)], 400, "11 texts"),
    ([("texts", "x" * 201)], 400, "text 1 has 201 characters"),
    ([("texts", "ok"), ("texts", "   ")], 400, "text 2 has 0 characters"),
    ([("texts", ": no name")], 400, "text 1: finding"),
    ([("texts", "ok"), ("explain", "Edema")], 400, "unknown form field(s) ['explain']"),
])
def test_bad_texts_are_a_clear_400(text_service, fields, status, message):
    r = post(text_service[0], "/score_text", [png(8)], ["frontal"], fields)
    assert r.status_code == status and message in r.json()["error"], r.text


def test_score_text_takes_the_predict_routes_checks(text_service):
    url = text_service[0]
    tiny = [("t.png", image_bytes("PNG", size=(40, 40)), "image/png")]  # under the gate's minimum side
    for route in ("/predict", "/score_text"):
        r = post(url, route, tiny, fields=[("texts", "edema")] if route == "/score_text" else ())
        assert r.status_code == 422 and "refused by the input gate" in r.json()["error"], (route, r.text)
    r = requests.post(f"{url}/score_text", files=[("images", png(9)), ("texts", (None, "edema"))], timeout=10)
    assert r.status_code == 401


# ------------------------------------------------------------------ /docs

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def urls_in(text: str, css: bool = False) -> set[str]:
    """Every URL a page can request: src/href attributes, url(...), `url:` settings and any absolute http(s)
    or protocol-relative address anywhere in the text. In a stylesheet only url(...) and @import request
    anything (an inline SVG's xmlns inside a data: URI is a name, not a request)."""
    found = {m.group(1).strip() for m in re.finditer(r"""url\(\s*["']?([^"')]*)""", text)}
    found |= set(re.findall(r"""@import\s+["']([^"']+)["']""", text))
    if not css:
        found |= set(re.findall(r"""(?:src|href|action)\s*=\s*["']([^"']+)["']""", text))
        found |= set(re.findall(r"""\burl\s*:\s*["']([^"']+)["']""", text))
        found |= set(re.findall(r"""(?:https?:)?//[A-Za-z0-9.\-]+[^\s"'<>)]*""", text))
    return {u for u in found if u and not u.startswith(("data:", "#"))}


def test_docs_page_requests_nothing_outside_the_machine(service_url):
    for page in ("/docs", "/"):
        r = api.get(f"{service_url}{page}", timeout=10)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"], page
        html = r.text
        assert "swagger-ui" in html and "googletagmanager" not in html
        assert re.search(r'"validatorUrl"\s*:\s*null', html), "Swagger UI's validator badge is an outside request"
        urls = urls_in(html)
        assert urls, "no asset found on the page: the check would be empty"
        for u in urls:
            full = urljoin(f"{service_url}{page}", u)
            host = urlparse(full).hostname
            assert host in LOCAL_HOSTS, f"{page} references {u}"
            got = api.get(full, timeout=10)
            assert got.status_code == 200, (u, got.status_code)
            if full.endswith(".css") or "text/html" in got.headers.get("content-type", ""):
                for v in urls_in(got.text, css=full.endswith(".css")):  # stylesheets and frames request more
                    assert urlparse(urljoin(full, v)).hostname in LOCAL_HOSTS, f"{u} references {v}"
    assert requests.get(f"{service_url}/docs", timeout=10).status_code == 401  # the token guards it too


def test_new_routes_are_documented(service_url):
    spec = api.get(f"{service_url}/docs.json", timeout=10).json()
    form = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert "explain" in form["properties"]
    op = spec["paths"]["/score_text"]["post"]
    form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"images", "views", "texts"} <= set(form["properties"]) and form["required"] == ["images", "texts"]
    assert form["properties"]["texts"]["maxItems"] == 10
    assert {"200", "400", "401", "409", "413", "422", "503"} <= set(op["responses"])
    schemas = spec["components"]["schemas"]
    assert {"scores", "calibrated", "caveat", "gate"} <= set(schemas["TextScores"]["properties"])
    assert {"finding", "image", "method", "png", "width", "height"} <= set(schemas["Explanation"]["properties"])
