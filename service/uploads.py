"""Reading an upload: a multipart form (the image in the field `image`, decoding parameters as other fields) or
a raw `image/*` body. The body is counted while it streams in and refused as soon as it passes the cap, and a
client that trickles it is cut off after `upload_timeout_s`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from .errors import ApiError
from .schemas import CaptionParams
from .settings import Settings


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


def params_with_form_fields(params: CaptionParams, fields: dict[str, str]) -> CaptionParams:
    """Form fields (multipart) override the query string; both are validated the same way."""
    if not fields:
        return params
    try:
        return CaptionParams.model_validate({**params.model_dump(exclude_unset=True), **fields})
    except ValidationError as exc:
        errors = [{**e, "loc": ("form", *e["loc"])} for e in exc.errors()]
        raise RequestValidationError(errors) from None


async def receive_upload(request: Request, settings: Settings) -> Upload:
    """The whole upload, within the size cap and the upload time limit (else 413 / 408)."""
    try:
        return await asyncio.wait_for(read_upload(request, settings.max_upload_bytes), settings.upload_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, "request_timeout", f"upload not received within {settings.upload_timeout_s} s") from None
    except ClientDisconnect:
        raise ApiError(400, "bad_request", "client disconnected during the upload") from None


def upload_openapi(caption_params: bool = True) -> dict[str, Any]:
    """The request body as /docs shows it (FastAPI cannot infer it: the route reads the stream itself): the
    multipart fields are the image and (with `caption_params`) CaptionParams, one schema for both places a
    parameter can come from."""
    params = CaptionParams.model_json_schema()["properties"] if caption_params else {}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": {"type": "string", "format": "binary"}, **params},
                    },
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }
