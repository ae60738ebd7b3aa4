"""The HTTP service: `create_app(settings)`; `uvicorn service.app:app` serves one built from the environment.

Laid out as the FastAPI template: an app factory with a lifespan (here), the routes (routes.py), what routes
need from the app (dependencies.py), errors (errors.py), upload reading (uploads.py), schemas (schemas.py) and
settings (settings.py). Importing this module loads no model: the lifespan does, once, and keeps it on
`app.state`. Every error is JSON `{"error": {"code", "message"}}`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

import captioner

from .batching import CaptionRunner, MicroBatcher
from .docs import app_with_offline_docs
from .draining import DrainUnreadBody
from .errors import install_error_handlers
from .model import load_model
from .routes import STATIC, api, pages, probes
from .settings import Settings

logger = logging.getLogger("captioner.service")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    started = time.perf_counter()
    model = await asyncio.to_thread(load_model, settings)
    logger.info("loaded %s (version %s, encoder %s, engine %s) on %s in %.1f s", model.name, model.version,
                model.encoder_name, model.engine, settings.device, time.perf_counter() - started)
    runner = CaptionRunner(model, settings.resolved_encoder_batch())
    batcher = MicroBatcher(runner, settings.max_batch, settings.max_wait_ms, settings.max_queue)
    app.state.captioner = model
    app.state.batcher = batcher
    batcher.start()
    try:
        yield
    finally:
        await batcher.stop()
        app.state.batcher = None


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app; its model is loaded when the server starts it (lifespan), not here."""
    app = app_with_offline_docs(  # /docs assets served from fastapi-offline, not a CDN (service/docs.py)
        title="captioner",
        summary="Show, Attend and Tell image captioning over HTTP",
        description="Caption an image with `POST /v1/captions`; the web page is at `/`. Errors are always "
        '`{"error": {"code": ..., "message": ...}}`.',
        version=captioner.__version__,
        lifespan=lifespan,
    )
    app.state.settings = settings if settings is not None else Settings()
    app.state.batcher = None
    app.state.captioner = None
    install_error_handlers(app)
    # Early answers (413, 401, ...) reach clients that send the whole body first (service/draining.py).
    app.add_middleware(DrainUnreadBody, max_bytes=app.state.settings.drain_max_bytes,
                       timeout_s=app.state.settings.drain_timeout_s)
    app.include_router(api)
    app.include_router(probes)
    app.include_router(pages)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


_default_app: FastAPI | None = None


def __getattr__(name: str) -> FastAPI:
    """`service.app:app` for uvicorn, built on first use so importing this module builds nothing."""
    global _default_app
    if name == "app":
        if _default_app is None:
            _default_app = create_app()
        return _default_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
