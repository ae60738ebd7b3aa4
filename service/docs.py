"""OpenAPI docs that work offline: /docs (Swagger UI) and /redoc (ReDoc) load their scripts, styles and icon from
this server, out of the `fastapi-offline` package, never from a CDN (the service often runs where there is no
internet).

ReDoc's script shows a "Redocly" logo that it fetches from cdn.redoc.ly; the copy served here points that image at
the local icon instead, so /redoc, like /docs, sends no request beyond this server.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse, Response
from fastapi_offline import FastAPIOffline

DOCS_ASSETS_URL = "/docs-assets"  # Swagger UI's script, CSS and favicon, served from the package
REDOC_JS_URL = "/redoc-assets/redoc.standalone.js"  # ReDoc's script, its CDN logo replaced
REDOC_JS = Path(fastapi_offline.__file__).parent / "static" / "redoc.standalone.js"
REDOC_CDN_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


def app_with_offline_docs(**kwargs: Any) -> FastAPI:
    """A FastAPI app (same arguments) whose /docs and /redoc pages reference only this server's own assets."""
    app = FastAPIOffline(docs_url="/docs", redoc_url=None, static_url=DOCS_ASSETS_URL, **kwargs)
    add_offline_redoc(app)
    return app


def add_offline_redoc(app: FastAPI) -> None:
    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{REDOC_JS_URL}",
                              redoc_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png", with_google_fonts=False)

    @app.get(REDOC_JS_URL, include_in_schema=False)
    async def redoc_js(request: Request) -> Response:
        root = request.scope.get("root_path", "").rstrip("/")
        return Response(_redoc_script(f"{root}{DOCS_ASSETS_URL}/favicon.png"), media_type="text/javascript",
                        headers={"Cache-Control": "public, max-age=86400"})


@functools.cache
def _redoc_script(logo_url: str) -> bytes:
    return REDOC_JS.read_text(encoding="utf-8").replace(REDOC_CDN_LOGO, logo_url).encode()
