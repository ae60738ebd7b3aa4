"""Oversized uploads: the JSON 413 reaches every client, Python's urllib.request included, which sends the whole
body before it reads a byte of the answer. The server drains the unread body (bounded) before closing."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from service.settings import Settings
from tests.helpers import running_server

MAX_UPLOAD = 2 * 1024 * 1024
BODY = 60 * 1000 * 1000  # a 60 MB "photo"


@pytest.fixture(scope="module")
def body() -> bytes:
    return os.urandom(BODY)


@pytest.fixture(scope="module")
def base_url(lite0_checkpoint) -> Iterator[str]:
    with running_server(Settings(checkpoint=lite0_checkpoint, max_upload_bytes=MAX_UPLOAD)) as url:
        yield url


def urllib_post(url: str, data, content_type: str) -> urllib.error.HTTPError:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    return caught.value


def json_error(error: urllib.error.HTTPError) -> dict:
    assert error.headers["Content-Type"].startswith("application/json")
    return json.loads(error.read())["error"]


def test_urllib_reads_the_413_of_a_60_mb_body(base_url, body):
    error = urllib_post(f"{base_url}/v1/captions", body, "image/jpeg")
    assert error.code == 413
    details = json_error(error)
    assert details["code"] == "payload_too_large" and str(MAX_UPLOAD) in details["message"]


def test_urllib_reads_the_413_of_a_chunked_60_mb_body(base_url, body):
    """No Content-Length: the cap trips while the body streams in, after 2 MiB; the rest is drained."""
    chunks = (body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20))  # urllib sends an iterable chunked
    error = urllib_post(f"{base_url}/v1/captions", chunks, "image/jpeg")
    assert error.code == 413 and json_error(error)["code"] == "payload_too_large"


def test_urllib_reads_other_early_answers_too(base_url, body):
    error = urllib_post(f"{base_url}/v1/captions", body[: 20 * 1000 * 1000], "text/plain")
    assert error.code == 415 and json_error(error)["code"] == "unsupported_media_type"


def test_the_server_answers_after_draining(base_url, body):
    urllib_post(f"{base_url}/v1/captions", body, "image/jpeg")
    with urllib.request.urlopen(f"{base_url}/healthz", timeout=10) as answer:
        assert json.loads(answer.read()) == {"status": "ok"}


def test_draining_is_bounded(lite0_checkpoint, body):
    """Past drain_max_bytes the server stops reading and closes: a client still sending gets a reset, not a
    server that reads forever."""
    settings = Settings(checkpoint=lite0_checkpoint, max_upload_bytes=MAX_UPLOAD, drain_max_bytes=1 << 20)
    with running_server(settings) as url:
        request = urllib.request.Request(f"{url}/v1/captions", data=body, headers={"Content-Type": "image/jpeg"})
        with pytest.raises((urllib.error.URLError, ConnectionError, socket.error)) as caught:
            urllib.request.urlopen(request, timeout=60)
        assert not isinstance(caught.value, urllib.error.HTTPError)
