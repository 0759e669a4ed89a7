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


def docs_html(title: str) -> str:
    return get_swagger_ui_html(
        openapi_url=SPEC, title=title,
        swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS}/favicon-light-32x32.png",
        # no validator badge (Swagger UI's default fetches one from validator.swagger.io)
        swagger_ui_parameters={"validatorUrl": None},
    ).body.decode()


def install_docs(app: FastAPI, title: str, openapi_spec: Callable[[], dict]) -> None:
    """Serve the self-contained Swagger UI at `/` and `/docs` of `app`, and at /docs.json the spec that
    `openapi_spec()` gives (the BentoML service's, which lists the mounted routes)."""
    page = docs_html(title)
    app.mount(ASSETS, StaticFiles(directory=swagger_assets()), name="docs-assets")

    async def docs() -> HTMLResponse:
        return HTMLResponse(page)

    async def spec() -> JSONResponse:
        body = openapi_spec()
        body.setdefault("info", {})["description"] = DESCRIPTION
        return JSONResponse(body)

    for path in ("/", "/docs"):
        app.add_api_route(path, docs, methods=["GET"], include_in_schema=False, response_class=HTMLResponse)
    app.add_api_route(SPEC, spec, methods=["GET"], include_in_schema=False)
