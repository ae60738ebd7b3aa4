"""Errors: every one is JSON `{"error": {"code", "message"}}` with the right status, never a 500 page or HTML.

Routes raise `ApiError`; `install_error_handlers` turns it, FastAPI's validation errors, Starlette's HTTP errors
and anything unexpected into that shape. `ERROR_RESPONSES` documents them in the OpenAPI schema.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .schemas import ErrorResponse

logger = logging.getLogger("captioner.service")


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
