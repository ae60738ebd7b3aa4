"""Optional API keys (CAPTIONER_API_KEYS) through a real uvicorn server: /v1/* needs a key, probes and the page
stay open; unset, the service is open as before."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from service.auth import key_matches
from service.settings import Settings
from tests.helpers import running_server

PHOTO = "000000000790.jpg"  # coco-mini/val
KEYS = ("first-key-6d1f0c", "second-key-93ab27")


@pytest.fixture(scope="module")
def photo(coco_mini) -> bytes:
    return (coco_mini / "val" / PHOTO).read_bytes()


@pytest.fixture(scope="module")
def base_url(lite0_checkpoint) -> Iterator[str]:
    with running_server(Settings(checkpoint=lite0_checkpoint, api_keys=",".join(KEYS), max_length=6)) as url:
        yield url


def caption(base_url: str, photo: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/captions", files={"image": ("photo.jpg", photo, "image/jpeg")},
                      headers=headers, timeout=60)


def assert_401(response: httpx.Response) -> dict:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == "unauthorized" and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-key"},
    {"X-API-Key": "wrong-key"},
    {"Authorization": f"Basic {KEYS[0]}"},  # a key, but not as a bearer token
    {"Authorization": f"Bearer {KEYS[0]}x"},
    {"Authorization": f"Bearer {KEYS[0][:-1]}"},
], ids=["none", "wrong-bearer", "wrong-header", "basic", "longer", "prefix"])
def test_no_key_or_a_wrong_key_is_401(base_url, photo, headers):
    message = assert_401(caption(base_url, photo, headers))["message"]
    assert KEYS[0] not in message and KEYS[1] not in message
    assert_401(httpx.get(f"{base_url}/v1/stats", headers=headers))


@pytest.mark.parametrize("headers", [
    {"Authorization": f"Bearer {KEYS[0]}"},
    {"Authorization": f"bearer {KEYS[1]}"},  # the scheme is case-insensitive
    {"X-API-Key": KEYS[1]},
], ids=["bearer-first", "bearer-second", "header"])
def test_a_right_key_is_200(base_url, photo, headers):
    response = caption(base_url, photo, headers)
    assert response.status_code == 200, response.text
    assert response.json()["caption"].strip()
    assert httpx.get(f"{base_url}/v1/stats", headers=headers).status_code == 200


def test_probes_page_static_files_and_docs_stay_open(base_url):
    for path in ("/healthz", "/readyz", "/", "/static/app.js", "/static/style.css", "/docs", "/openapi.json"):
        assert httpx.get(f"{base_url}{path}").status_code == 200, path


def test_docs_describe_both_ways_to_send_the_key(base_url):
    openapi = httpx.get(f"{base_url}/openapi.json").json()
    schemes = openapi["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
    assert any(s.get("name") == "X-API-Key" for s in schemes.values())
    assert "401" in openapi["paths"]["/v1/captions"]["post"]["responses"]


def test_without_keys_the_service_is_open(lite0_checkpoint, photo):
    with running_server(Settings(checkpoint=lite0_checkpoint, max_length=6)) as url:
        assert caption(url, photo, {}).status_code == 200
        assert caption(url, photo, {"Authorization": "Bearer anything"}).status_code == 200


def test_every_v1_operation_requires_the_key(base_url):
    """A /v1 route added later without `dependencies=API_KEY` would be open to anyone: every operation the API
    documents under /v1/ answers 401 without a key, and says so in its OpenAPI security."""
    paths = httpx.get(f"{base_url}/openapi.json").json()["paths"]
    operations = [(method, path, op) for path, ops in paths.items() for method, op in ops.items()]
    assert any(path.startswith("/v1/") for _, path, _ in operations)
    for method, path, op in operations:
        if path.startswith("/v1/"):
            assert op.get("security"), f"{method} {path} documents no API key"
            assert_401(httpx.request(method.upper(), f"{base_url}{path}"))
        else:
            assert not op.get("security"), f"{method} {path} should stay open"


def test_key_matches_compares_whole_keys():
    assert key_matches(KEYS[1], KEYS) and key_matches(KEYS[0], KEYS)
    assert not key_matches(KEYS[0][:-1], KEYS) and not key_matches("", KEYS) and not key_matches(KEYS[0], ())


def test_keys_from_the_environment(monkeypatch):
    monkeypatch.setenv("CAPTIONER_API_KEYS", f" {KEYS[0]} ,{KEYS[1]},")
    settings = Settings()
    assert settings.api_keys == KEYS
    assert KEYS[0] not in repr(settings)
