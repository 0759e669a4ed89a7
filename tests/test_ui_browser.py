"""The web app, the service's /docs page and the Prefect dashboard in a real browser (Debian's Chromium driven
by Playwright; no browser is downloaded). A demo study is uploaded and scored with the session's service,
every page is opened, and every request the browser makes is recorded: none may go to a host other than
this machine (127.0.0.1 / localhost).

Screenshots of each page go to $CXRLT_SCREENSHOTS (e.g. docs/screenshots) when it is set.
Skipped, saying why, where no Chromium is installed (`make test` installs Debian's package when it can).
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

import pandas as pd
import pytest

from conftest import SERVICE_TOKEN, drift_reports, free_port, server_process

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


def demo_study(root: Path) -> list[Path]:
    """A two-image study (frontal, then lateral) of the synthetic demo."""
    from cxrlt.data.demo.generate import generate_demo
    from cxrlt.views import FRONTAL_POSITIONS, LATERAL_POSITIONS

    generate_demo(root, n_studies=20, progress=False, workers=1)
    frame = pd.read_csv(root / "cxr-lt-2024" / "train_labeled.csv").fillna({"ViewPosition": ""})
    for _, s in frame.groupby("study_id"):
        codes = list(s["ViewPosition"])
        if len(s) == 2 and any(c in FRONTAL_POSITIONS for c in codes) and any(c in LATERAL_POSITIONS for c in codes):
            s = s.sort_values("ViewPosition", key=lambda v: v.isin(LATERAL_POSITIONS))
            return [root / "mimic-cxr-jpg" / p for p in s["fpath"]]
    raise AssertionError("the demo has no frontal + lateral study")


def visible_text(page) -> str:
    return page.evaluate("document.body.innerText")


def test_web_app_in_chromium(service_url, served_tag, tmp_path):
    started = time.monotonic()
    study = demo_study(tmp_path / "demo")
    port = free_port()
    env = {"CXRLT_SERVICE_URL": service_url, "CXRLT_API_TOKEN": SERVICE_TOKEN,
           "CXRLT_MODEL_NAME": served_tag.split(":")[0],
           "CXRLT_REPORTS_DIR": str(drift_reports(tmp_path / "drift", 2.0, "cxrlt:demo")),
           "CXRLT_COMPARE_DIR": str(tmp_path / "compare")}
    cmd = [sys.executable, "-m", "streamlit", "run", "ui/app.py", "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port)]
    url = f"http://127.0.0.1:{port}"
    counts = {}
    with server(cmd, f"{url}/_stcore/health", tmp_path / "ui.log", env), browser_page() as (page, seen):
        page.goto(url)
        page.get_by_role("heading", name="Predict").wait_for()
        page.locator("input[type=file]").set_input_files([str(p) for p in study])
        page.get_by_text("view of image 2").wait_for()
        page.get_by_role("button", name="Predict", exact=True).click()
        page.get_by_text(re.compile(r"^Findings: ")).wait_for()
        heat = page.get_by_text(re.compile(r"· image 2 \(lateral\) ·"))
        try:
            heat.first.wait_for(timeout=30_000)
        except Exception:  # no finding over threshold: ask for the heatmap of one label
            page.locator("[data-testid=stMultiSelect]").click()
            page.get_by_role("option").first.click()
            heat.first.wait_for()
        page.get_by_text(re.compile(r"· image 1 \(frontal\) ·")).first.wait_for()
        page.wait_for_timeout(1000)
        broken = page.evaluate("[...document.images].filter(i => i.complete && i.naturalWidth === 0).length")
        assert broken == 0, "an image did not load"
        text = visible_text(page)
        assert "Deploy" not in text, "Streamlit's Deploy button is shown"
        assert not [ln for ln in text.splitlines() if ln.strip() == "None"], "a stray None is printed"
        screenshot(page, "predict")
        counts["Predict"] = (len(seen), outside(seen))

        for name, marker in (("Models", served_tag), ("Experiments", "Build the report"),
                             ("Monitoring", "Drift over time")):
            seen.clear()
            page.get_by_role("link", name=name).click()
            page.get_by_role("heading", name=name).wait_for()
            page.get_by_text(marker).first.wait_for()
            if name == "Monitoring":  # the embedded Evidently report loads its own scripts
                page.frame_locator("iframe").first.locator("body").wait_for()
            page.wait_for_timeout(3000)  # (Streamlit's page never goes network-idle: it keeps polling)
            text = visible_text(page)
            assert "Deploy" not in text and not [ln for ln in text.splitlines() if ln.strip() == "None"], name
            screenshot(page, name.lower())
            counts[name] = (len(seen), outside(seen))

    print(f"\nbrowser test {time.monotonic() - started:.0f} s; requests (all, outside) per page:",
          {k: (n, len(o)) for k, (n, o) in counts.items()})
    assert not {k: o for k, (_, o) in counts.items() if o}, "requests to hosts outside this machine"


def test_service_docs_page_requests_no_outside_host(service_url):
    with browser_page() as (page, seen):
        page.set_extra_http_headers({"Authorization": f"Bearer {SERVICE_TOKEN}"})  # the service wants its token
        r = page.goto(f"{service_url}/docs", wait_until="networkidle")
        assert r is not None and r.status == 200, f"/docs answered {r.status if r else None}"
        page.wait_for_timeout(2000)
        assert "predict" in visible_text(page).lower(), "the API docs do not list /predict"
        screenshot(page, "service-docs")
    print(f"\n/docs: {len(seen)} requests, {len(outside(seen))} outside")
    assert not outside(seen), outside(seen)


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
