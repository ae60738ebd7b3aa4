"""What routes take from the app, as FastAPI dependencies: `settings: SettingsDep`, `batcher: BatcherDep`, ...

The lifespan (service/app.py) puts the loaded model and its micro-batcher on `app.state`; routes never read
`app.state` themselves. Router-wide requirements (e.g. an API key) belong here too, added to a router's
`dependencies=[...]`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .batching import MicroBatcher
from .errors import ApiError
from .model import CaptionModel
from .settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_batcher(request: Request) -> MicroBatcher:
    """The micro-batcher; 503 while the model is not loaded (before start-up, after shutdown)."""
    batcher: MicroBatcher | None = getattr(request.app.state, "batcher", None)
    if batcher is None:
        raise ApiError(503, "not_ready", "the model is not loaded")
    return batcher


def get_running_batcher(request: Request) -> MicroBatcher:
    """The micro-batcher, only while its worker runs (readiness)."""
    batcher: MicroBatcher | None = getattr(request.app.state, "batcher", None)
    if batcher is None or not batcher.running:
        raise ApiError(503, "not_ready", "the model is not loaded or its worker has stopped")
    return batcher


def get_captioner(request: Request) -> CaptionModel:
    captioner: CaptionModel | None = getattr(request.app.state, "captioner", None)
    if captioner is None:
        raise ApiError(503, "not_ready", "the model is not loaded")
    return captioner


SettingsDep = Annotated[Settings, Depends(get_settings)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
RunningBatcherDep = Annotated[MicroBatcher, Depends(get_running_batcher)]
CaptionerDep = Annotated[CaptionModel, Depends(get_captioner)]
