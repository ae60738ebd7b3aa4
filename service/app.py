"""The HTTP service: `create_app(settings)`; `uvicorn service.app:app` serves one built from the environment.

Importing this module loads no model: the lifespan does, once, and keeps it on `app.state`. Routes stay thin:
read the upload (capped while streaming), decode the image off the event loop (pixel cap before decoding),
queue it for the micro-batcher, shape the response. Every error is JSON `{"error": {"code", "message"}}`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from captioner.api import Captioner, load_captioner
from captioner.decoding import DecodingOptions
from captioner.images import ImageError

from .auth import API_KEY  # issue 19: optional API keys on /v1/*
from .batching import CaptionJob, CaptionRunner, MicroBatcher, NotRunning, Overloaded
from .docs import app_with_offline_docs  # issue 19: /docs without a CDN
from .draining import DrainUnreadBody  # issue 19: bounded drain after an early answer
from .schemas import (
    CandidateOut,
    CaptionParams,
    CaptionResponse,
    ErrorResponse,
    HealthResponse,
    ModelOut,
    TimingOut,
    attention_out,
    decoding_out,
)
from .settings import Settings

logger = logging.getLogger("captioner.service")
STATIC = Path(__file__).resolve().parent / "static"

# --------------------------------------------------------------------------------------------------------------
# Errors.


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


IMAGE_ERRORS = {  # ImageError.kind -> (status, code)
    "not_image": (415, "unsupported_media_type"),
    "corrupt": (400, "invalid_image"),
    "too_large": (413, "image_too_large"),
    "missing": (400, "invalid_image"),
}

STATUS_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
                413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_parameters",
                500: "internal_error", 503: "unavailable", 401: "unauthorized"}


def error_response(status: int, code: str, message: str, details: list | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _validation_details(errors: list[dict]) -> list[dict]:
    # Only what a client can act on; pydantic's `input`/`ctx` may hold objects that are not JSON.
    return jsonable_encoder([{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                             for e in errors])


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(list(exc.errors()))
        summary = "; ".join(f"{'.'.join(str(p) for p in d['loc'])}: {d['msg']}" for d in details)
        return error_response(422, "invalid_parameters", summary or "invalid parameters", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal error: see the server log")


# --------------------------------------------------------------------------------------------------------------
# Reading the upload: the body is counted while it streams in, and refused as soon as it passes the cap.


@dataclass
class Upload:
    image: bytes
    fields: dict[str, str] = field(default_factory=dict)  # multipart form fields other than `image`


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"request body is over the upload limit of {limit} bytes")


async def _capped(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        yield chunk


async def read_upload(request: Request, limit: int) -> Upload:
    content_type = request.headers.get("content-type", "")
    mime, options = parse_options_header(content_type)
    mime = mime.decode("latin-1").lower()
    if mime != "multipart/form-data" and not mime.startswith("image/"):
        raise ApiError(415, "unsupported_media_type",
                       f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data with the "
                       "image in the field `image`, or the image itself as the body with an image/* content type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refused before a byte of the body is read
        raise _too_large(limit)
    stream = _capped(request.stream(), limit)
    if mime.startswith("image/"):
        return Upload(b"".join([chunk async for chunk in stream]))
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_request", "multipart/form-data without a boundary")
    return await _read_multipart(stream, boundary)


class _FormCollector:
    """python-multipart callbacks gathering each part's name and bytes (the total is already capped)."""

    def __init__(self) -> None:
        self.parts: list[tuple[str, bytes]] = []
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._name = ""
        self._data = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_part_data": lambda d, s, e: self._data.extend(d[s:e]),
            "on_part_end": lambda: self.parts.append((self._name, bytes(self._data))),
        }

    def _part_begin(self) -> None:
        self._name, self._data = "", bytearray()

    def _header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            _, params = parse_options_header(bytes(self._header_value))
            self._name = params.get(b"name", b"").decode("utf-8", "replace")
        self._header_name, self._header_value = bytearray(), bytearray()


async def _read_multipart(stream: AsyncIterator[bytes], boundary: bytes) -> Upload:
    collector = _FormCollector()
    parser = MultipartParser(boundary, collector.callbacks())
    try:
        async for chunk in stream:
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise ApiError(400, "bad_request", f"malformed multipart body ({exc})") from exc
    images = [data for name, data in collector.parts if name == "image"]
    if len(images) != 1:
        raise ApiError(400, "missing_image" if not images else "bad_request",
                       "send exactly one image, in the multipart field `image`")
    fields = {}
    for name, data in collector.parts:
        if name != "image":
            try:
                fields[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, "bad_request", f"form field {name!r} is not UTF-8 text") from None
    return Upload(images[0], fields)


def _params_with_form_fields(params: CaptionParams, fields: dict[str, str]) -> CaptionParams:
    """Form fields (multipart) override the query string; both are validated the same way."""
    if not fields:
        return params
    try:
        return CaptionParams.model_validate({**params.model_dump(exclude_unset=True), **fields})
    except ValidationError as exc:
        errors = [{**e, "loc": ("form", *e["loc"])} for e in exc.errors()]
        raise RequestValidationError(errors) from None


# --------------------------------------------------------------------------------------------------------------
# Routes.

router = APIRouter()

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "corrupt or truncated image, malformed upload",
        401: "an API key is required (CAPTIONER_API_KEYS is set) and none, or a wrong one, was sent",
        408: "the upload took longer than upload_timeout_s",
        413: "body over the upload limit, or an image over the pixel limit (decompression bomb)",
        415: "not an image, or a content type other than multipart/form-data or image/*",
        422: "parameters out of range",
        503: "model not loaded, queue full or inference timed out",
    }.items()
}

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "method": {"type": "string", "enum": ["greedy", "sample", "beam"]},
                        "num_captions": {"type": "integer"},
                        "attention": {"type": "boolean"},
                    },
                },
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


async def _receive(request: Request, settings: Settings) -> Upload:
    try:
        return await asyncio.wait_for(read_upload(request, settings.max_upload_bytes), settings.upload_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, "request_timeout", f"upload not received within {settings.upload_timeout_s} s") from None
    except ClientDisconnect:
        raise ApiError(400, "bad_request", "client disconnected during the upload") from None


def _prepare(captioner: Captioner, data: bytes, max_pixels: int, options: DecodingOptions) -> CaptionJob:
    return CaptionJob.from_image(captioner, captioner.open(data, max_pixels), options)


def _model_out(captioner: Captioner) -> ModelOut:
    return ModelOut(name=captioner.name, version=captioner.version, encoder=captioner.checkpoint.encoder_name)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


@router.post(
    "/v1/captions",
    response_model=CaptionResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=UPLOAD_BODY,
    summary="Caption an image",
    dependencies=API_KEY,
)
async def create_caption(request: Request, params: Annotated[CaptionParams, Query()]) -> JSONResponse:
    """Upload an image as multipart field `image` (parameters in the query string or as form fields), or as a
    raw `image/*` body (parameters in the query string)."""
    state = request.app.state
    settings: Settings = state.settings
    batcher: MicroBatcher | None = getattr(state, "batcher", None)
    if batcher is None:
        raise ApiError(503, "not_ready", "the model is not loaded")
    started = time.perf_counter()
    with batcher.arriving():  # batches forming meanwhile may wait for this request (up to max_wait_ms)
        upload = await _receive(request, settings)
        read_done = time.perf_counter()
        params = _params_with_form_fields(params, upload.fields)
        try:
            options = params.decoding(settings.default_decoding())
        except ValueError as exc:
            raise ApiError(422, "invalid_parameters", str(exc)) from None
        if not upload.image:
            raise ApiError(400, "empty_upload", "the image is empty (0 bytes)")
        try:  # header check (pixel cap), decoding and preprocessing, in a thread: a big JPEG takes a while
            job = await asyncio.to_thread(_prepare, state.captioner, upload.image, settings.max_pixels, options)
        except ImageError as exc:
            status, code = IMAGE_ERRORS.get(exc.kind, (400, "invalid_image"))
            raise ApiError(status, code, str(exc)) from None
        decoded = time.perf_counter()
        try:
            future = batcher.enqueue(job)
        except Overloaded as exc:
            raise ApiError(503, "overloaded", str(exc), headers={"Retry-After": "1"}) from None
        except NotRunning as exc:
            raise ApiError(503, "not_ready", str(exc)) from None
    try:
        done = await asyncio.wait_for(future, settings.request_timeout_s)
    except NotRunning as exc:
        raise ApiError(503, "not_ready", str(exc)) from None
    except asyncio.TimeoutError:
        raise ApiError(503, "timeout", f"no result within {settings.request_timeout_s} s",
                       headers={"Retry-After": "5"}) from None

    result = done.value
    response = CaptionResponse(
        caption=result.caption,
        candidates=[CandidateOut(caption=c.caption, log_prob=round(c.log_prob, 4)) for c in result.candidates],
        decoding=decoding_out(options),
        model=_model_out(state.captioner),
        timing_ms=TimingOut(
            read=_ms(read_done - started),
            decode_image=_ms(decoded - read_done),
            queue=_ms(done.queued_s),
            inference=_ms(done.inference_s),
            total=_ms(time.perf_counter() - started),
        ),
        batch_size=done.batch_size,
        attention=attention_out(result) if params.attention else None,
    )
    # `attention` is left out unless asked for; other nulls (an unseeded `decoding.seed`) stay explicit.
    return JSONResponse(response.model_dump(mode="json", exclude=None if params.attention else {"attention"}))


@router.get("/healthz", response_model=HealthResponse, response_model_exclude_none=True, summary="The process is alive")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=HealthResponse, response_model_exclude_none=True,
            responses={503: {"model": ErrorResponse}},
            summary="The model is loaded and its worker is running")
async def readyz(request: Request) -> HealthResponse:
    batcher: MicroBatcher | None = getattr(request.app.state, "batcher", None)
    if batcher is None or not batcher.running:
        raise ApiError(503, "not_ready", "the model is not loaded or its worker has stopped")
    return HealthResponse(status="ok", model=_model_out(request.app.state.captioner))


@router.get("/v1/stats", summary="Micro-batching counters", dependencies=API_KEY)
async def stats(request: Request) -> dict[str, Any]:
    batcher: MicroBatcher | None = getattr(request.app.state, "batcher", None)
    if batcher is None:
        raise ApiError(503, "not_ready", "the model is not loaded")
    return {
        "batches": batcher.stats.batches,
        "requests": batcher.stats.requests,
        "max_batch_size_seen": batcher.stats.max_size,
        "batch_sizes": {str(size): n for size, n in sorted(batcher.stats.sizes.items())},
        "queue_depth": batcher.queue_depth,
        "max_batch": batcher.max_batch,
        "max_wait_ms": batcher.max_wait_s * 1000.0,
        "encoder_batch": request.app.state.settings.resolved_encoder_batch(),
    }


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


# --------------------------------------------------------------------------------------------------------------
# The app.


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    started = time.perf_counter()
    captioner = await asyncio.to_thread(
        load_captioner, settings.checkpoint, settings.device, settings.pretrained_encoder, settings.engine
    )
    logger.info("loaded %s (version %s, encoder %s) on %s in %.1f s", captioner.name, captioner.version,
                captioner.checkpoint.encoder_name, settings.device, time.perf_counter() - started)
    runner = CaptionRunner(captioner, settings.resolved_encoder_batch())
    batcher = MicroBatcher(runner, settings.max_batch, settings.max_wait_ms, settings.max_queue)
    app.state.captioner = captioner
    app.state.batcher = batcher
    batcher.start()
    try:
        yield
    finally:
        await batcher.stop()
        app.state.batcher = None


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app; its model is loaded when the server starts it (lifespan), not here."""
    app = app_with_offline_docs(  # issue 19: /docs assets served from fastapi-offline, not a CDN
        title="captioner",
        summary="Show, Attend and Tell image captioning over HTTP",
        description="Caption an image with `POST /v1/captions`; the web page is at `/`. Errors are always "
        '`{"error": {"code": ..., "message": ...}}`.',
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings if settings is not None else Settings()
    app.state.batcher = None
    install_error_handlers(app)
    # issue 19: early answers (413, 401, ...) reach clients that send the whole body first (service/draining.py)
    app.add_middleware(DrainUnreadBody, max_bytes=app.state.settings.drain_max_bytes,
                       timeout_s=app.state.settings.drain_timeout_s)
    app.include_router(router)
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
