"""Headless Chromium that can reach nothing but 127.0.0.1: /docs renders the operations from the service's own
assets (no CDN), and the web page works against a server that requires an API key."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from service.settings import Settings
from tests.helpers import running_server
from tests.test_browser import DevTools, chromium, find_chromium

PHOTO = "000000000790.jpg"  # coco-mini/val
KEY = "browser-key-5e0c2a"
# Every host name but 127.0.0.1 fails to resolve: a page that needs a CDN stays blank here, as it does offline.
OFFLINE = ("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",)


@pytest.fixture(scope="module", autouse=True)
def needs_chromium() -> None:
    find_chromium()  # skip (or fail under CI=true) before a server is started for nothing


@pytest.fixture(scope="module")
def server(lite0_checkpoint) -> Iterator[str]:
    with running_server(Settings(checkpoint=lite0_checkpoint, api_keys=KEY, max_length=8)) as url:
        yield url


@pytest.fixture
def page(tmp_path) -> Iterator[DevTools]:
    profile = tmp_path / "profile"
    profile.mkdir()
    with chromium(profile, OFFLINE) as page:
        page.call("Network.enable")
        yield page


def requested_urls(page: DevTools) -> list[str]:
    page.evaluate("1")  # collect the events that arrived since the last call
    return [e["params"]["request"]["url"] for e in page.events if e["method"] == "Network.requestWillBeSent"]


@pytest.mark.browser
def test_docs_render_the_operations_with_no_request_leaving_localhost(server, page):
    page.call("Page.navigate", url=f"{server}/docs")
    count = page.wait_for("document.querySelectorAll('#swagger-ui .opblock').length", timeout=60)
    operations = page.evaluate("[...document.querySelectorAll('#swagger-ui .opblock-summary-path')]"
                               ".map(e => e.textContent.replace(/\\u200b/g, ''))")
    assert count >= 4 and {"/v1/captions", "/v1/stats", "/healthz", "/readyz"} <= set(operations), operations
    assert page.evaluate("!!document.querySelector('#swagger-ui .btn.authorize')"), "no Authorize button for the key"
    urls = requested_urls(page)
    assert any(u.endswith("/docs-assets/swagger-ui-bundle.js") for u in urls), urls
    assert any(u.endswith("/openapi.json") for u in urls), urls
    outside = [u for u in urls if not (u.startswith(f"{server}/") or u.startswith(("data:", "blob:")))]
    assert not outside, f"requests leaving 127.0.0.1: {outside}"



@pytest.mark.browser
def test_redoc_renders_the_operations_with_no_request_leaving_localhost(server, page):
    page.call("Page.navigate", url=f"{server}/redoc")
    count = page.wait_for("document.querySelectorAll('[data-section-id^=\"operation/\"]').length", timeout=60)
    assert count >= 4
    page.wait_for("document.querySelectorAll('img').length > 0", timeout=10)  # the logo ReDoc would take from its CDN
    urls = requested_urls(page)
    assert any(u.endswith("/redoc-assets/redoc.standalone.js") for u in urls), urls
    outside = [u for u in urls if not (u.startswith(f"{server}/") or u.startswith(("data:", "blob:")))]
    assert not outside, f"requests leaving 127.0.0.1: {outside}"


def upload(page: DevTools, photo) -> str:
    # Forget the last outcome and the last choice, so that choosing the same file again is a new upload.
    page.evaluate("document.body.dataset.state = 'idle'; document.querySelector('#file-input').value = ''")
    node = page.call("Runtime.evaluate", expression="document.querySelector('#file-input')")["result"]
    page.call("DOM.setFileInputFiles", files=[str(photo)], objectId=node["objectId"])
    return page.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state",
                         timeout=120)


@pytest.mark.browser
def test_page_sends_the_key_it_keeps_in_local_storage(server, page, coco_mini):
    photo = coco_mini / "val" / PHOTO
    page.call("Page.navigate", url=f"{server}/")
    page.wait_for("document.readyState === 'complete' && "
                  "document.querySelector('#model-info').textContent.startsWith('model ')")

    # No key: the server's 401, explained.
    assert upload(page, photo) == "error"
    status = page.evaluate("document.querySelector('#status').textContent")
    assert "401" in status and "API key" in status

    # Type the key as a user would (input events), upload again: captioned.
    page.evaluate("document.querySelector('#api-key').focus()")
    page.call("Input.insertText", text=KEY)
    assert upload(page, photo) == "done", page.evaluate("document.querySelector('#status').textContent")
    assert page.evaluate("document.querySelector('#caption').textContent").strip()

    # Kept across visits, in this browser only.
    page.call("Page.reload")
    page.wait_for("document.readyState === 'complete' && document.querySelector('#api-key') !== null")
    assert page.wait_for(f"document.querySelector('#api-key').value === {json.dumps(KEY)}", timeout=10)
    assert page.evaluate("localStorage.getItem('captioner.apiKey')") == KEY
