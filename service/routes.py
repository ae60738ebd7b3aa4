"""The routes: `POST /v1/captions`, `POST /v1/previews` and `/v1/stats` (api), `/healthz` and `/readyz` (probes),
`/` (the page).

Routes stay thin: read the upload (service/uploads.py), decode the image off the event loop (pixel cap before
decoding), queue it for the micro-batcher (service/batching.py), shape the response (service/schemas.py).
What they need from the app comes through service/dependencies.py.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image

from captioner.images import ImageError, open_image
from captioner.inference.visualize import attention_style
from captioner.options import DecodingOptions

from .auth import API_KEY
from .batching import BatchResult, CaptionJob, MicroBatcher, NotRunning, Overloaded
from .dependencies import BatcherDep, CaptionerDep, RunningBatcherDep, SettingsDep
from .errors import ERROR_RESPONSES, IMAGE_ERRORS, ApiError
from .model import CaptionModel
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
from .uploads import Upload, params_with_form_fields, receive_upload, upload_openapi

STATIC = Path(__file__).resolve().parent / "static"

api = APIRouter(dependencies=API_KEY)  # the API proper: /v1/*, behind the optional API keys (service/auth.py)
probes = APIRouter()  # liveness and readiness, for orchestrators
pages = APIRouter()  # the web page


@api.post(
    "/v1/captions",
    response_model=CaptionResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=upload_openapi(),
    summary="Caption an image",
)
async def create_caption(
    request: Request,
    params: Annotated[CaptionParams, Query()],
    settings: SettingsDep,
    batcher: BatcherDep,
    captioner: CaptionerDep,
) -> JSONResponse:
    """Upload an image as multipart field `image` (parameters in the query string or as form fields), or as a
    raw `image/*` body (parameters in the query string)."""
    started = time.perf_counter()
    with batcher.arriving():  # batches forming meanwhile may wait for this request (up to max_wait_ms)
        upload = await receive_upload(request, settings)
        read = time.perf_counter()
        params = params_with_form_fields(params, upload.fields)
        options = _decoding_options(params, settings)
        job = await _prepare_job(captioner, upload, settings.max_pixels, options)
        prepared = time.perf_counter()
        future = _enqueue(batcher, job)
    done = await _wait_for_result(future, settings.request_timeout_s)
    timing = TimingOut(
        read=_ms(read - started),
        decode_image=_ms(prepared - read),
        queue=_ms(done.queued_s),
        inference=_ms(done.inference_s),
        total=_ms(time.perf_counter() - started),
    )
    return _caption_response(done, options, captioner, timing, params.attention)


@api.post(
    "/v1/previews",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "the photo as a JPEG"}, **ERROR_RESPONSES},
    openapi_extra=upload_openapi(caption_params=False),
    summary="The photo as a JPEG a browser can show",
)
async def create_preview(
    request: Request,
    settings: SettingsDep,
    max_side: Annotated[int, Query(ge=64, le=4096, description="longest side of the JPEG, in px")] = 1024,
) -> Response:
    """The uploaded image as the model sees it (EXIF orientation applied, first frame, RGB), as a JPEG no larger
    than `max_side`: for clients that cannot decode what they uploaded (HEIC in most browsers, TIFF). The web
    page draws the attention maps over it. Same upload forms and limits as `/v1/captions`."""
    upload = await receive_upload(request, settings)
    jpeg = await _read_image_in_thread(upload, lambda data: _preview_jpeg(data, settings.max_pixels, max_side))
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


def _preview_jpeg(data: bytes, max_pixels: int, max_side: int) -> bytes:
    image = open_image(data, max_pixels, draft_size=max_side)  # a big JPEG decodes at a reduced scale
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # keeps the aspect ratio; never enlarges
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def _decoding_options(params: CaptionParams, settings: Settings) -> DecodingOptions:
    try:
        return params.decoding(settings.default_decoding())
    except ValueError as exc:  # a combination DecodingOptions refuses (e.g. more captions than beams)
        raise ApiError(422, "invalid_parameters", str(exc)) from None


async def _prepare_job(captioner: CaptionModel, upload: Upload, max_pixels: int,
                       options: DecodingOptions) -> CaptionJob:
    """Header check (pixel cap), decoding and preprocessing, in a thread: a big JPEG takes a while."""
    return await _read_image_in_thread(
        upload, lambda data: CaptionJob.from_image(captioner, captioner.open(data, max_pixels), options)
    )


T = TypeVar("T")


async def _read_image_in_thread(upload: Upload, read: Callable[[bytes], T]) -> T:
    """`read(upload.image)` off the event loop; an empty upload or an unusable image becomes its API error."""
    if not upload.image:
        raise ApiError(400, "empty_upload", "the image is empty (0 bytes)")
    try:
        return await asyncio.to_thread(read, upload.image)
    except ImageError as exc:
        status, code = IMAGE_ERRORS.get(exc.kind, (400, "invalid_image"))
        raise ApiError(status, code, str(exc)) from None


def _enqueue(batcher: MicroBatcher, job: CaptionJob) -> asyncio.Future:
    try:
        return batcher.enqueue(job)
    except Overloaded as exc:
        raise ApiError(503, "overloaded", str(exc), headers={"Retry-After": "1"}) from None
    except NotRunning as exc:
        raise ApiError(503, "not_ready", str(exc)) from None


async def _wait_for_result(future: asyncio.Future, timeout_s: float) -> BatchResult:
    try:
        return await asyncio.wait_for(future, timeout_s)
    except NotRunning as exc:
        raise ApiError(503, "not_ready", str(exc)) from None
    except asyncio.TimeoutError:
        raise ApiError(503, "timeout", f"no result within {timeout_s} s", headers={"Retry-After": "5"}) from None


def _caption_response(done: BatchResult, options: DecodingOptions, captioner: CaptionModel, timing: TimingOut,
                      with_attention: bool) -> JSONResponse:
    result = done.value
    response = CaptionResponse(
        caption=result.caption,
        uncertain=result.uncertain,
        candidates=[CandidateOut(caption=c.caption, log_prob=round(c.log_prob, 4),
                                 mean_log_prob=round(c.mean_log_prob, 4)) for c in result.candidates],
        decoding=decoding_out(options),
        model=_model_out(captioner),
        timing_ms=timing,
        batch_size=done.batch_size,
        attention=attention_out(result) if with_attention else None,
    )
    # `attention` is left out unless asked for; other nulls (an unseeded `decoding.seed`) stay explicit.
    return JSONResponse(response.model_dump(mode="json", exclude=None if with_attention else {"attention"}))


def _model_out(captioner: CaptionModel) -> ModelOut:
    return ModelOut(name=captioner.name, version=captioner.version, encoder=captioner.encoder_name,
                    engine=captioner.engine)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


@api.get("/v1/stats", summary="Micro-batching counters")
async def stats(batcher: BatcherDep, settings: SettingsDep) -> dict[str, Any]:
    return {
        "batches": batcher.stats.batches,
        "requests": batcher.stats.requests,
        "max_batch_size_seen": batcher.stats.max_size,
        "batch_sizes": {str(size): n for size, n in sorted(batcher.stats.sizes.items())},
        "queue_depth": batcher.queue_depth,
        "max_batch": batcher.max_batch,
        "max_wait_ms": batcher.max_wait_s * 1000.0,
        "encoder_batch": settings.resolved_encoder_batch(),
    }


@probes.get("/healthz", response_model=HealthResponse, response_model_exclude_none=True,
            summary="The process is alive")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@probes.get("/readyz", response_model=HealthResponse, response_model_exclude_none=True,
            responses={503: {"model": ErrorResponse}},
            summary="The model is loaded and its worker is running")
async def readyz(batcher: RunningBatcherDep, captioner: CaptionerDep) -> HealthResponse:
    return HealthResponse(status="ok", model=_model_out(captioner))


@pages.get("/", include_in_schema=False)
async def index(settings: SettingsDep) -> HTMLResponse:
    """The page, its decoding fields filled with this server's defaults (RECOMMENDED unless CAPTIONER_* says
    otherwise), so the page, the API and the CLI give a photo the same caption."""
    return HTMLResponse(page_with_defaults(settings.default_decoding()), headers={"Cache-Control": "no-cache"})


def page_with_defaults(defaults: DecodingOptions) -> str:
    html = (STATIC / "index.html").read_text()
    for name, value in asdict(defaults).items():
        html = html.replace("{{" + name + "}}", "" if value is None else f"{value:g}" if isinstance(value, float)
                            else str(value))
    return html.replace(f'<option value="{defaults.method}">', f'<option value="{defaults.method}" selected>')


@pages.get("/attention-style.json", include_in_schema=False)
async def attention_colours() -> dict[str, Any]:
    """The figures' colour lookup table and opacity, so the page colours attention maps exactly as they do."""
    return attention_style()
