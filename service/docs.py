"""OpenAPI docs that work offline: /docs (Swagger UI) loads its script, styles and icon from this server, out of
the `fastapi-offline` package, never from a CDN (the service often runs where there is no internet).

No /redoc: ReDoc's page still fetches its logo from its CDN, and /docs covers the same ground.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

DOCS_ASSETS_URL = "/docs-assets"  # Swagger UI's script, CSS and favicon, served from the package


def app_with_offline_docs(**kwargs: Any) -> FastAPI:
    """A FastAPI app (same arguments) whose /docs page references only this server's own assets."""
    return FastAPIOffline(docs_url="/docs", redoc_url=None, static_url=DOCS_ASSETS_URL, **kwargs)
