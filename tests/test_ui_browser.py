"""The web app, the service's /docs page and the Prefect dashboard in a real browser (Debian's Chromium driven
by Playwright; no browser is downloaded). The app is driven as a new user would: the synthetic model's notice
before any upload, the demo study in one click, a headline of the findings, heatmaps with a colour scale,
free text scored in one click, a picture the gate refuses (with the synthetic model's wording), the
Experiments page's paired differences of two models; every page is opened, and every request the browser
makes is recorded: none may go to a host other than this machine (127.0.0.1 / localhost).

Accessibility: axe-core (the npm package, `make test` installs it into .cache/axe) runs on every page the
project renders and the test fails on any critical or serious violation, listing them. Excluded, as
third-party renderings: the Evidently drift report embedded in an iframe on Monitoring, and the Prefect
dashboard (Prefect's own UI). The service's /docs page is Swagger UI with this project's settings: checked too.

Screenshots of each page go to $CXRLT_SCREENSHOTS (e.g. docs/screenshots) when it is set.
Skipped, saying why, where no Chromium is installed (`make test` installs Debian's package when it can); fails
where axe-core is missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

import axe
from conftest import SERVICE_TOKEN, drift_reports, free_port, running_service, server_process

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
LOCAL = {"127.0.0.1", "localhost", "::1"}
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed: `apt-get install chromium` "
                                 "(Debian's package; `make test` does it when run as root)")]


def outside(urls: list[str]) -> list[str]:
    """The requests that left this machine (data:, blob: and about: URLs never do)."""
    return [u for u in urls if urlparse(u).scheme in ("http", "https", "ws", "wss")
            and urlparse(u).hostname not in LOCAL]


@contextlib.contextmanager
def browser_page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            page.set_default_timeout(90_000)
            seen: list[str] = []
            page.on("request", lambda r: seen.append(r.url))
            yield page, seen
        finally:
            browser.close()


def screenshot(page, name: str) -> None:
    folder = os.environ.get("CXRLT_SCREENSHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    # Streamlit scrolls inside its main block, not the document: grow the window to the block's height
    tall = page.evaluate("Math.max(...[...document.querySelectorAll('[data-testid=stMain], body')]"
                         ".map(e => e.scrollHeight))")
    page.set_viewport_size({"width": size["width"], "height": min(max(tall, size["height"]), 8000)})
    page.wait_for_timeout(800)
    page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)
    page.set_viewport_size(size)


def server(cmd: list[str], health: str, log: Path, env: dict, timeout: float = 120):
    """conftest's server_process with `env` over this process's (None removes a variable)."""
    merged = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    return server_process(cmd, health, log, merged, timeout)


def visible_text(page) -> str:
    return page.evaluate("document.body.innerText")


def check_page(page, name: str, found: dict) -> None:
    """No Deploy button, no stray None; the page's critical and serious axe violations into `found`."""
    text = visible_text(page)
    assert "Deploy" not in text, f"{name}: Streamlit's Deploy button is shown"
    assert not [ln for ln in text.splitlines() if ln.strip() == "None"], f"{name}: a stray None is printed"
    broken = page.evaluate("[...document.images].filter(i => i.complete && i.naturalWidth === 0).length")
    assert broken == 0, f"{name}: an image did not load"
    found[name] = axe.violations(page)


@pytest.fixture(scope="module")
def browser_stack(served_tag, tmp_path_factory):
    """A service on a tiny synthetic text-head model with an input gate (the session's model has neither),
    the picture its gate refuses, and two evaluated models with their manifest for Experiments."""
    from browser_models import evaluated_pair, gated_text_model, refused_and_demo
    from cxrlt.registry import store

    root = tmp_path_factory.mktemp("browser")
    art = gated_text_model(root)
    refused, demo_codes = refused_and_demo(art)
    assert demo_codes == ["None", "None"], f"the gate refuses the demo study: {demo_codes}"
    manifest, exp_tags = evaluated_pair(root / "exp", "cxrlt-browser-exp")
    store.set_serving(store.register(art, name="cxrlt-browser"), reason="tests: browser")
    try:
        with running_service(root / "service.log", root / "predictions.db", token=SERVICE_TOKEN) as url:
            store.set_serving(served_tag, reason="tests")  # the service has read the mark by now
            yield {"url": url, "refused": refused, "manifest": manifest, "exp_tags": exp_tags, "root": root}
    finally:
        store.set_serving(served_tag, reason="tests")


def test_web_app_in_chromium(browser_stack, tmp_path):
    started = time.monotonic()
    port = free_port()
    env = {"CXRLT_SERVICE_URL": browser_stack["url"], "CXRLT_API_TOKEN": SERVICE_TOKEN,
           "CXRLT_MODEL_NAME": "cxrlt-browser-exp", "CXRLT_MANIFEST": str(browser_stack["manifest"]),
           "CXRLT_REPORTS_DIR": str(drift_reports(tmp_path / "drift", 2.0, "cxrlt:demo")),
           "CXRLT_COMPARE_DIR": str(tmp_path / "compare")}
    cmd = [sys.executable, "-m", "streamlit", "run", "ui/app.py", "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port)]
    url = f"http://127.0.0.1:{port}"
    counts, found = {}, {}
    with server(cmd, f"{url}/_stcore/health", tmp_path / "ui.log", env), browser_page() as (page, seen):
        page.goto(url)
        page.get_by_role("heading", name="Predict").wait_for()
        # what the demo is, before any upload; the uploader's limit is the service's
        page.get_by_text("Real chest radiographs are outside what it has seen").wait_for()
        text = visible_text(page)
        assert "SYNTHETIC" in text and "at most 20 MiB per image" in text and "20MB per file" in text, text
        assert "200MB" not in text
        check_page(page, "Predict (before an upload)", found)
        # the demo study in one click, then Predict: a headline, probability against threshold
        page.get_by_role("button", name="Try a demo study").click()
        page.get_by_text("view of image 2").wait_for()
        page.get_by_role("button", name="Predict", exact=True).click()
        headline = page.get_by_text(re.compile(r"^Findings: ")).first
        headline.wait_for()
        text = visible_text(page)
        assert "none over threshold" in headline.inner_text() or "against threshold" in text, text
        assert "All 6 labels: probability against threshold" in text
        # heatmaps: the top two to start with, a colour scale and the resolution stated
        page.get_by_role("img", name=re.compile("Colour scale of the heatmaps")).wait_for()
        page.get_by_text(re.compile(r"· image 2 \(lateral\) ·")).first.wait_for()
        text = visible_text(page)
        assert "Resolution: computed at the model's input size, 64 × 64 px" in text
        assert len(page.get_by_text(re.compile(r"· image 1 \(frontal\) ·")).all()) == 2, "not the top two maps"
        # free text: typed and scored with one click (no Enter, no click elsewhere first)
        page.get_by_label("Findings to score").fill("small left pleural effusion")
        page.get_by_role("button", name="Score text").click()
        page.get_by_text(re.compile("^Uncalibrated: ")).wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        check_page(page, "Predict", found)
        screenshot(page, "predict")
        counts["Predict"] = (len(seen), outside(seen))
        # a picture the gate refuses: the synthetic model says why, and what to do
        page.locator("input[type=file]").set_input_files(
            files=[{"name": "not-a-chest.png", "mimeType": "image/png", "buffer": browser_stack["refused"]}])
        page.get_by_text("image 1 · not-a-chest.png").wait_for()   # the page has the upload: Predict scores it
        page.get_by_role("button", name="Predict", exact=True).click()
        page.get_by_text(re.compile("refused an image")).wait_for()
        page.get_by_text("not run (no DICOM header)").first.wait_for()   # the gate's table, under the error
        text = visible_text(page)
        assert "real chest radiograph is outside what it has seen" in text and "train a model on real data" in text
        check_page(page, "Predict (refused)", found)
        screenshot(page, "predict-refused")

        for name, marker in (("Models", "Promote and roll back"), ("Experiments", "Build the report"),
                             ("Monitoring", "Drift over time")):
            seen.clear()
            page.get_by_role("link", name=name).click()
            page.get_by_role("heading", name=name).wait_for()
            page.get_by_text(marker).first.wait_for()
            if name == "Experiments":   # the report, then the two models' paired differences
                page.get_by_role("button", name="Build the report").click()
                page.get_by_text("Two models: paired differences").wait_for(timeout=120_000)
                page.get_by_text("B − A on the same resampled patients").wait_for()
                grid = page.locator("[data-testid=stDataFrame]").nth(1)
                assert grid.get_attribute("aria-label") is None or "missing" not in grid.get_attribute("aria-label")
                text = visible_text(page)
                assert "missing" not in text.split("The full report")[0] and str(tmp_path) not in text
            if name == "Monitoring":  # the embedded Evidently report loads its own scripts
                page.frame_locator("iframe").first.locator("body").wait_for()
                assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", visible_text(page)), "no readable time"
            page.wait_for_timeout(3000)  # (Streamlit's page never goes network-idle: it keeps polling)
            check_page(page, name, found)
            screenshot(page, name.lower())
            counts[name] = (len(seen), outside(seen))

    print(f"\nbrowser test {time.monotonic() - started:.0f} s; requests (all, outside) per page:",
          {k: (n, len(o)) for k, (n, o) in counts.items()})
    print("axe, critical and serious violations per page:", {k: len(v) for k, v in found.items()})
    assert not {k: o for k, (_, o) in counts.items() if o}, "requests to hosts outside this machine"
    assert not any(found.values()), "accessibility (axe-core, critical and serious):\n" + axe.describe(found)


def test_service_docs_page_requests_no_outside_host_shows_the_version_and_is_accessible(service_url):
    with browser_page() as (page, seen):
        page.set_extra_http_headers({"Authorization": f"Bearer {SERVICE_TOKEN}"})  # the service wants its token
        r = page.goto(f"{service_url}/docs", wait_until="networkidle")
        assert r is not None and r.status == 200, f"/docs answered {r.status if r else None}"
        page.wait_for_timeout(2000)
        assert "predict" in visible_text(page).lower(), "the API docs do not list /predict"
        screenshot(page, "service-docs")
        found = {"/docs": axe.violations(page)}
        from cxrlt import __version__

        title = page.locator(".info .title").inner_text()
        assert __version__ in title and "None" not in title, f"/docs shows no project version: {title!r}"
    print(f"\n/docs: {len(seen)} requests, {len(outside(seen))} outside")
    assert not outside(seen), outside(seen)
    assert not found["/docs"], "accessibility (axe-core, critical and serious):\n" + axe.describe(found)


def test_prefect_dashboard_requests_no_outside_host(tmp_path):
    """The dashboard as scripts/stack.sh should start it. Prefect 3.9's newer (v2) UI initialises Amplitude
    (a request to sr-client-cfg.amplitude.com) whatever the analytics setting says; the classic UI
    (PREFECT_SERVER_UI_V2_ENABLED=false) requests nothing outside."""
    port = free_port()
    # the port also as a setting: the UI is told its API's URL from the settings, not from --port
    env = {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_SERVER_UI_V2_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_API_URL": None}  # a fresh server of its own, not one the environment points at
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
           "--analytics-off"]
    url = f"http://127.0.0.1:{port}"
    with server(cmd, f"{url}/api/health", tmp_path / "prefect.log", env, timeout=180), \
            browser_page() as (page, seen):
        for path in ("/", "/dashboard", "/runs", "/deployments", "/work-pools"):
            page.goto(url + path, wait_until="networkidle")
            page.wait_for_timeout(1500)
        assert "Prefect" in page.title() or "prefect" in visible_text(page).lower()
        assert "Can't connect to Server API" not in visible_text(page)
        screenshot(page, "prefect-dashboard")
    print(f"\nPrefect dashboard: {len(seen)} requests, {len(outside(seen))} outside")
    assert not outside(seen), sorted(set(outside(seen)))
