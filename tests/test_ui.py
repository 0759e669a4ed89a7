"""The Streamlit app with AppTest: the Predict page against the live service, the Models, Experiments and
Monitoring pages on a real model store and real reports, and the defects a browser run found (a stray "None",
results lost on a view change, too many images refused only after Predict, views not preselected, "No
Finding" listed as a finding, cut chart labels, the Deploy button)."""

from __future__ import annotations

import io
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from conftest import SERVICE_TOKEN, free_port, image_bytes

UI = Path(__file__).resolve().parents[1] / "ui"
APP = str(UI / "app.py")
PAGES = ("views/predict.py", "views/models.py", "views/experiments.py", "views/monitoring.py")
pytestmark = pytest.mark.slow
sys.path.insert(0, str(UI))  # the app's own modules (study, client), as `streamlit run ui/app.py` sees them

import study  # noqa: E402


def app(monkeypatch, url, reports=None, token=SERVICE_TOKEN, page=None, **env) -> AppTest:
    monkeypatch.setenv("CXRLT_SERVICE_URL", url)
    monkeypatch.setenv("CXRLT_API_TOKEN", token)  # the session's service requires it
    if reports is not None:
        monkeypatch.setenv("CXRLT_REPORTS_DIR", str(reports))
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    at = AppTest.from_file(APP, default_timeout=120).run()
    return at.switch_page(page).run() if page else at


def texts(at: AppTest, kind: str) -> str:
    return " ".join(str(e.value) for e in getattr(at, kind))


def every_text(at: AppTest) -> list[str]:
    kinds = ("markdown", "text", "caption", "subheader", "header", "title", "info", "warning", "error", "success")
    return [str(e.value) for k in kinds for e in getattr(at, k)]


def assert_no_stray_none(at: AppTest) -> None:
    assert not [t for t in every_text(at) if t.strip() in ("None", "null")], every_text(at)


def two_images():
    return [("a.png", image_bytes("PNG", seed=1), "image/png"), ("b.jpg", image_bytes("JPEG", seed=2), "image/jpeg")]


def view_keys(files) -> list[str]:
    key = study.files_hash([(n, d) for n, d, _ in files])
    return [f"view_{i}_{key}" for i in range(len(files))]


# ----------------------------------------------------------------------------------------------- Predict

def test_upload_scores_the_study(monkeypatch, service_url, served_tag):
    at = app(monkeypatch, service_url)
    assert not at.exception and "Service up" in texts(at, "success")
    files = two_images()
    at.file_uploader(key="upload").set_value(files).run()
    k0, k1 = view_keys(files)
    assert (at.selectbox(key=k0).value, at.selectbox(key=k1).value) == ("frontal", "lateral"), "views not preselected"
    at.button(key="predict").click().run()
    assert not at.exception and not at.error, texts(at, "error")
    assert at.get("vega_lite_chart"), "no findings chart"
    assert "Findings" in texts(at, "subheader")
    assert "SYNTHETIC" in texts(at, "warning")
    assert served_tag in texts(at, "caption") and "2 image(s)" in texts(at, "caption")
    assert "No guarantee" in texts(at, "caption"), "a model without a guarantee must say so"
    assert "no text head" in texts(at, "info"), "the tiny model has no text head: free text must say so"
    assert_no_stray_none(at)
    # a heatmap of a label the user picks, over each image: fetched from the service on choice
    explain = at.multiselect(key=f"explain_{study.files_hash([(n, d) for n, d, _ in files])}")
    explain.set_value(["Edema"]).run()
    captions = [str(c) for i in at.get("image") for c in [getattr(i, "proto", None)] if c is not None]
    assert not at.exception and not at.error, texts(at, "error")
    empty = texts(at, "caption")   # a map without positive evidence is a sentence, not a blue picture
    for view in ("image 1 (frontal)", "image 2 (lateral)"):
        shown = sum(f"Edema · {view}" in c for c in captions)
        said = f"Edema · {view} · no positive evidence on this view" in empty
        assert shown + said == 1, (view, captions, empty)
    assert "Colour scale: blue 0 (no evidence)" in empty and "Resolution: computed at the model's input size" in empty
    # every image says what it shows
    assert all(i.proto.imgs[0].alt for i in at.get("image")), "an image without alternative text"


def test_the_demo_study_is_one_click_away_and_the_synthetic_notice_comes_first(monkeypatch, service_url):
    at = app(monkeypatch, service_url)
    assert not at.exception and "Real chest radiographs are outside what it has seen" in texts(at, "warning")
    assert "at most 20 MiB per image" in texts(at, "caption")
    at.button(key="demo").click().run()
    assert not at.exception and len(at.get("image")) == 2 and "Demo study: a synthetic" in texts(at, "caption")
    at.button(key="predict").click().run()
    assert not at.exception and not at.error, texts(at, "error")
    assert texts(at, "subheader").startswith("Findings: ")


def test_the_headline_gives_probability_against_threshold_and_the_guarantee():
    from answer import headline_lines

    body = {"probabilities": {"Edema": 0.81, "Mass": 0.62, "Nodule": 0.3, "No Finding": 0.1},
            "thresholds": {"Edema": 0.4, "Mass": 0.5, "Nodule": 0.35, "No Finding": 0.5},
            "findings": ["Edema", "Mass"],
            "guarantee": {"available": True, "confirmed": ["Edema"], "uncertain": ["Mass", "Nodule"], "set": True}}
    lines = headline_lines(body)
    assert lines[0] == "**Edema**: probability 0.81 against threshold 0.40 · confirmed by the guarantee"
    assert lines[1] == "**Mass**: probability 0.62 against threshold 0.50 · uncertain: check it"
    assert lines[2] == "Under threshold but uncertain, worth a look: Nodule (0.30 against 0.35)"
    assert headline_lines({**body, "guarantee": None})[0].endswith("against threshold 0.40")


def test_the_heading_names_a_few_findings_not_all():
    from answer import headline

    assert headline([]) == "Findings: none over threshold"
    assert headline(["A", "B", "C"]) == "Findings: A, B, C"
    assert headline([f"L{i}" for i in range(19)]) == "Findings: L0, L1, L2 and 16 more"


def test_guarantee_lines_name_the_sets_and_the_guarantee():
    g = {"available": True, "set": ["Edema", "Effusion"], "confirmed": ["Edema"], "uncertain": ["Effusion"],
         "statement": "The finding set holds ..."}
    assert study.guarantee_lines(g) == ("Findings with a guarantee: confirmed: Edema; uncertain, to check: Effusion",
                                        "The finding set holds ...")
    empty = study.guarantee_lines({**g, "set": [], "confirmed": [], "uncertain": []})[0]
    assert "the set is empty" in empty
    assert study.guarantee_lines({"available": False, "statement": "No guarantee: x"}) == ("", "No guarantee: x")
    assert "older service" in study.guarantee_lines(None)[1]


def test_results_stay_when_a_view_changes_and_go_with_other_files(monkeypatch, service_url):
    at = app(monkeypatch, service_url)
    files = two_images()
    at.file_uploader(key="upload").set_value(files).run()
    at.button(key="predict").click().run()
    assert at.get("vega_lite_chart")
    at.selectbox(key=view_keys(files)[1]).set_value("unknown").run()
    assert not at.exception and at.get("vega_lite_chart"), "the results vanished when a view changed"
    assert "made with the views frontal, lateral" in texts(at, "warning")
    at.selectbox(key=view_keys(files)[1]).set_value("lateral").run()
    assert "made with the views" not in texts(at, "warning")
    other = [("c.png", image_bytes("PNG", seed=5), "image/png")]
    at.file_uploader(key="upload").set_value(other).run()
    assert not at.get("vega_lite_chart") and "Findings" not in texts(at, "subheader"), "old results shown"


def test_five_images_are_refused_when_chosen(monkeypatch, service_url):
    at = app(monkeypatch, service_url)
    five = [(f"{i}.png", image_bytes("PNG", seed=i), "image/png") for i in range(5)]
    at.file_uploader(key="upload").set_value(five).run()
    assert not at.exception
    assert "5 images chosen: a study has at most 4 images" in texts(at, "error")
    assert not [b for b in at.button if b.key == "predict"], "Predict offered for a study the service refuses"


def test_a_file_that_is_no_image_is_refused_when_chosen(monkeypatch, service_url):
    at = app(monkeypatch, service_url)
    at.file_uploader(key="upload").set_value([("x.png", b"not an image", "image/png")]).run()
    assert not at.exception and "not a PNG, JPEG or DICOM file" in texts(at, "error")
    assert not [b for b in at.button if b.key == "predict"]


def test_gate_refusal_shows_the_gates_verdicts(monkeypatch, service_url):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (10, 400), 90).save(buf, format="PNG")
    at = app(monkeypatch, service_url)
    at.file_uploader(key="upload").set_value([("sliver.png", buf.getvalue(), "image/png")]).run()
    at.button(key="predict").click().run()
    assert not at.exception and "refused an image (input gate)" in texts(at, "error")
    assert "input gate checks each image" in texts(at, "caption") and at.table, "no gate verdicts shown"
    verdicts = at.table[0].value
    assert set(verdicts["verdict"]) >= {"not run (no DICOM header)", "REFUSED"}, verdicts
    assert not (verdicts == "").any().any() and not verdicts.isna().any().any(), "blank cells in the gate table"
    # a model trained on synthetic data says so beside the refusal, and what to do about real radiographs
    assert "train a model on real data" in texts(at, "info") + texts(at, "warning")


def test_service_down_is_a_clear_message(monkeypatch):
    at = app(monkeypatch, f"http://127.0.0.1:{free_port()}")
    assert not at.exception and "not reachable" in texts(at, "error")
    at.file_uploader(key="upload").set_value([("a.png", image_bytes("PNG"), "image/png")]).run()
    at.button(key="predict").click().run()
    assert not at.exception
    assert "is not reachable" in texts(at, "error") and "CXRLT_SERVICE_URL" in texts(at, "error")


def test_dicom_view_comes_from_its_header_and_is_scored(monkeypatch, service_url):
    from dicom_factory import chest_pixels, make_dicom

    at = app(monkeypatch, service_url)
    files = [("study.dcm", make_dicom(chest_pixels(160, 128), size=(160, 128), view="LL"), "application/dicom"),
             ("b.png", image_bytes("PNG", seed=3), "image/png")]
    at.file_uploader(key="upload").set_value(files).run()
    k0, k1 = view_keys(files)
    assert at.selectbox(key=k0).value == "lateral" and "lateral from header" in texts(at, "caption")
    assert at.selectbox(key=k1).value == "frontal", "the PNG beside a lateral DICOM should default to frontal"
    at.button(key="predict").click().run()
    assert not at.exception and not at.error, texts(at, "error")
    assert "Findings" in texts(at, "subheader")


def test_missing_token_is_a_clear_message(monkeypatch, service_url):
    at = app(monkeypatch, service_url, token="")
    assert not at.exception and "CXRLT_API_TOKEN" in texts(at, "error")


# ------------------------------------------------------------------------------ Predict's pure logic

def test_default_views():
    assert study.default_views([None, None]) == ["frontal", "lateral"]
    assert study.default_views([None]) == ["frontal"]
    assert study.default_views([None, None, None]) == ["frontal", "lateral", "unknown"]
    assert study.default_views(["frontal", None]) == ["frontal", "lateral"]
    assert study.default_views(["lateral", None]) == ["lateral", "frontal"]


def _body(normal_p: float, edema_p: float) -> dict:
    names = ["No Finding", "Edema", "Calcification of the Aorta"]
    return {"probabilities": dict(zip(names, [normal_p, edema_p, 0.1])),
            "thresholds": dict(zip(names, [0.5, 0.5, 0.5])),
            "findings": [n for n, p in zip(names, [normal_p, edema_p, 0.1]) if p >= 0.5]}


def test_no_finding_is_never_a_finding():
    f = study.read_findings(_body(0.9, 0.2))
    assert f.findings == [] and f.normal == "No Finding" and f.normal_over and not f.conflict
    f = study.read_findings(_body(0.9, 0.7))
    assert f.findings == ["Edema"] and f.conflict
    spec = study.findings_chart(_body(0.9, 0.7)).to_dict()
    labels = [r["label"] for d in spec["datasets"].values() for r in d]
    assert "No Finding" not in labels and "Calcification of the Aorta" in labels


@pytest.mark.parametrize("normal_p, edema_p, kind, words", [
    (0.9, 0.2, "success", "No abnormality: 'No Finding' is over its threshold"),
    (0.9, 0.7, "warning", "Conflict: 'No Finding' (no abnormality) is over its threshold"),
    (0.2, 0.1, "info", "Uncertain: no finding is over its threshold"),
])
def test_no_finding_is_shown_as_the_absence_of_findings(normal_p, edema_p, kind, words):
    at = AppTest.from_string(f"import sys\nsys.path.insert(0, {str(UI)!r})\nfrom answer import summary\n"
                             f"summary({_body(normal_p, edema_p)!r})\n", default_timeout=30).run()
    assert not at.exception and words in texts(at, kind)
    assert "No Finding" not in texts(at, "subheader").split(":", 1)[1], "No Finding listed among the findings"


def test_heatmap_choices_never_offer_or_preselect_normal():
    """The service's `explain=findings` may explain Normal when it is over threshold; the heatmap box
    neither offers nor preselects it (a preselected value outside the options stops the page)."""
    body = {"probabilities": {"Normal": 0.6, "Edema": 0.7, "Mass": 0.2, "No Finding": 0.1},
            "explanations": [{"finding": f, "image": i} for f in ("Normal", "Edema", "Edema") for i in (0, 1)]}
    labels, default = study.heatmap_choices(body, 5)
    assert labels == ["Edema", "Mass"] and default == ["Edema"]
    assert study.heatmap_choices({"probabilities": {"A": 0.1}}, 5) == (["A"], [])


def test_the_demo_study_starts_its_heatmaps_with_the_findings_drawn_into_it():
    """A newcomer's first heatmaps show where the model looks for what is really drawn in the demo study,
    not the weak demo model's top scores (whose maps are often empty); an upload keeps the top findings."""
    import heatmaps
    from cxrlt.data.demo.sample import DEMO_FINDINGS

    body = {"probabilities": {"Edema": 0.9, "Mass": 0.8, "Cardiomegaly": 0.3, "Pleural Effusion": 0.2},
            "explanations": [{"finding": "Edema", "image": 0}, {"finding": "Mass", "image": 0}]}
    assert heatmaps._defaults(body, DEMO_FINDINGS)[1] == ["Cardiomegaly", "Pleural Effusion"]
    assert heatmaps._defaults(body)[1] == ["Edema", "Mass"]
    assert heatmaps._defaults({"probabilities": {"Edema": 0.9, "Mass": 0.1}}, DEMO_FINDINGS)[1] == ["Edema", "Mass"]
    # a model with one of the drawn findings: that one first, then the top finding
    one = {"probabilities": {"Edema": 0.9, "Mass": 0.8, "Cardiomegaly": 0.1}}
    assert heatmaps._defaults(one, DEMO_FINDINGS)[1] == ["Cardiomegaly", "Edema"]


def test_chart_labels_are_never_cut():
    spec = study.findings_chart(_body(0.1, 0.7)).to_dict()
    axes = [layer["encoding"]["y"]["axis"] for layer in spec["layer"]]
    assert all(a.get("labelLimit") == 0 for a in axes), axes
    assert spec["height"] == {"step": 22}, "a fixed chart height squeezes the rows and hides labels"


# ------------------------------------------------------------------------------------ app-wide defects

def test_config_hides_deploy_and_sends_no_usage_stats():
    from streamlit import config

    cfg = tomllib.loads((UI / ".streamlit" / "config.toml").read_text())
    assert cfg["client"]["toolbarMode"] in ("viewer", "minimal")
    assert cfg["browser"]["gatherUsageStats"] is False
    assert cfg["runner"]["magicEnabled"] is False
    known = config.get_config_options()
    assert all(f"{s}.{k}" in known for s, opts in cfg.items() for k in opts), "unknown Streamlit option"


def test_every_page_runs_without_stray_output(monkeypatch, tmp_path):
    for page in PAGES:
        at = app(monkeypatch, f"http://127.0.0.1:{free_port()}", reports=tmp_path / "none", page=page,
                 CXRLT_MODEL_NAME="cxrlt-none")
        assert not at.exception, (page, at.exception)
        assert_no_stray_none(at)
        assert at.header[0].value == page.split("/")[1][:-3].capitalize()


def test_pages_never_import_torch(service_url, served_tag, tmp_path):
    """Each page, run in a fresh interpreter against the live service and the model store: no torch."""
    code = (f"import sys\nfrom streamlit.testing.v1 import AppTest\nat = AppTest.from_file({APP!r}, default_timeout=60)"
            f".run()\nfor p in {PAGES!r}:\n    at.switch_page(p).run()\n    assert not at.exception, (p, at.exception)\n"
            "bad = sorted(m for m in ('torch', 'torchvision', 'timm', 'transformers') if m in sys.modules)\n"
            "print('HEAVY', bad)\n")
    env = {**__import__("os").environ, "CXRLT_SERVICE_URL": service_url, "CXRLT_API_TOKEN": SERVICE_TOKEN,
           "CXRLT_MODEL_NAME": served_tag.split(":")[0], "CXRLT_REPORTS_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr[-2000:]
