"""A /docs page that requests nothing outside the machine (hospital networks block or flag outside calls).

BentoML's own index page (`_bentoml_impl/server/main-openapi.html`, served at `/`) loads Google Tag
Manager and links outside hosts, and its Swagger UI set-up leaves `validatorUrl` at Swagger UI's default,
which loads a badge image from validator.swagger.io. Here `/` and `/docs` are FastAPI's Swagger UI page
(`fastapi.openapi.docs.get_swagger_ui_html`) with every asset served from this service: the Swagger UI
files that ship inside the installed BentoML package (mounted at /docs-assets, nothing copied or
downloaded), the spec at /docs.json (BentoML's, which lists the mounted routes, with this service's own
description in place of BentoML's default README and its outside badges), `validatorUrl: null`.
The routes of this FastAPI app are matched before BentoML's own `/` (BentoML mounts the app first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from cxrlt import __version__

ASSETS = "/docs-assets"
SPEC = "/docs.json"
# BentoML describes a service served from source with its default README, whose badges load from
# img.shields.io and link readthedocs.org: the spec this service answers carries its own words instead
DESCRIPTION = ("Long-tailed, multi-label chest X-ray classification (CXR-LT). `POST /predict` scores one study "
               "(1-4 PNG, JPEG or DICOM images; optional `explain` heatmaps); `POST /score_text` scores free-text "
               "findings with a text-head model (uncalibrated). Every route but /readyz, /livez and /healthz "
               "needs `Authorization: Bearer <token>` when the service runs with CXRLT_API_TOKEN. Research "
               "software, not for clinical use.")


def swagger_assets() -> Path:
    """The Swagger UI files of the installed BentoML package (swagger-ui-bundle.js, swagger-ui.css, icons)."""
    from bentoml._internal import server

    return Path(server.__file__).parent / "static_content"


# Accessibility (WCAG AA, checked with axe-core by the browser test): Swagger UI's light badges and links
# fall below 4.5:1 contrast, its <html> has no language, its server picker no name, and with deep links on
# it nests a link inside each operation's button. Darker colours, lang, a name, and no deep links.
A11Y_CSS = """<style>
.swagger-ui .info .title small { background: #4f5664; }
.swagger-ui .info .title small.version-stamp { background: #3d6b00; }
.swagger-ui .info a, .swagger-ui .info .url, .swagger-ui a.nostyle { color: #1d5aa6; }
.swagger-ui .opblock.opblock-post .opblock-summary-method { background: #0e7a4a; }
.swagger-ui .opblock.opblock-get .opblock-summary-method { background: #1d5aa6; }
.swagger-ui .opblock.opblock-put .opblock-summary-method { background: #9a5200; }
.swagger-ui .opblock.opblock-delete .opblock-summary-method { background: #b3261e; }
.swagger-ui .opblock-tag small, .swagger-ui .opblock .opblock-summary-description { color: #2b2f36; }
</style>"""
A11Y_JS = """<script>
new MutationObserver(() => {
  const s = document.getElementById("servers");
  if (s && !s.getAttribute("aria-label")) s.setAttribute("aria-label", "Server");
}).observe(document.documentElement, {childList: true, subtree: true});
</script>"""


def docs_html(title: str) -> str:
    page = get_swagger_ui_html(
        openapi_url=SPEC, title=title,
        swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS}/favicon-light-32x32.png",
        # no validator badge (Swagger UI's default fetches one from validator.swagger.io); no deep links
        # (a link nested in each operation's button)
        swagger_ui_parameters={"validatorUrl": None, "deepLinking": False},
    ).body.decode()
    page = page.replace("<html>", '<html lang="en">', 1).replace("</head>", A11Y_CSS + "\n</head>", 1)
    return page.replace("</body>", A11Y_JS + "\n</body>", 1)


def install_docs(app: FastAPI, title: str, openapi_spec: Callable[[], dict]) -> None:
    """Serve the self-contained Swagger UI at `/` and `/docs` of `app`, and at /docs.json the spec that
    `openapi_spec()` gives (the BentoML service's, which lists the mounted routes)."""
    page = docs_html(title)
    app.mount(ASSETS, StaticFiles(directory=swagger_assets()), name="docs-assets")

    async def docs() -> HTMLResponse:
        return HTMLResponse(page)

    async def spec() -> JSONResponse:
        body = openapi_spec()
        info = body.setdefault("info", {})
        info["description"] = DESCRIPTION
        info["version"] = __version__    # BentoML leaves it None for a service served from source
        return JSONResponse(body)

    for path in ("/", "/docs"):
        app.add_api_route(path, docs, methods=["GET"], include_in_schema=False, response_class=HTMLResponse)
    app.add_api_route(SPEC, spec, methods=["GET"], include_in_schema=False)
