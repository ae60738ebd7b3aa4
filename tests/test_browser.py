"""The web page end to end: a real uvicorn server, Debian's headless Chromium driven over the DevTools protocol.

The protocol client is a few lines of standard library (a WebSocket is a handshake plus small frames), so the
test needs no browser-automation package and no browser download: only the `chromium` system package, which
`.ci/run` installs. Set CAPTIONER_SCREENSHOT=path to keep the screenshot (docs/screenshot-service.png comes
from `CAPTIONER_SCREENSHOT=docs/screenshot-service.png pytest -q tests/test_browser.py`).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from captioner.inference.visualize import (
    DEFAULT_OPACITY,
    attention_colours,
    colour_index,
    normalize_heat,
    upsample_attention,
)
from service.settings import Settings
from tests.helpers import CHROMIUM, require_command, running_server

PHOTO = "000000000790.jpg"  # coco-mini/val
WINDOW = (1200, 900)




# --------------------------------------------------------------------------------------------------------------
# A minimal Chrome DevTools Protocol client: one page target, JSON commands over a WebSocket (RFC 6455).


class DevTools:
    def __init__(self, ws_url: str, timeout: float = 60.0):
        url = urllib.parse.urlparse(ws_url)
        self._sock = socket.create_connection((url.hostname, url.port), timeout=timeout)
        self._file = self._sock.makefile("rb")
        key = base64.b64encode(os.urandom(16)).decode()
        self._sock.sendall(
            f"GET {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        status = self._file.readline()
        if b" 101 " not in status:
            raise ConnectionError(f"DevTools refused the WebSocket: {status!r}")
        while self._file.readline() not in (b"\r\n", b""):  # rest of the handshake's headers
            pass
        self._next_id = 0
        self.events: list[dict] = []  # protocol events (e.g. Network.requestWillBeSent) seen so far

    def call(self, method: str, **params: Any) -> dict:
        self._next_id += 1
        self._send(json.dumps({"id": self._next_id, "method": method, "params": params}).encode())
        while True:  # events arrive in between: kept for the tests that look at them
            message = json.loads(self._receive())
            if "method" in message:
                self.events.append(message)
            elif message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout} s: {expression}")
            time.sleep(0.1)
        return value

    def close(self) -> None:
        self._sock.close()

    def _send(self, payload: bytes, opcode: int = 0x1) -> None:
        mask = os.urandom(4)  # clients must mask every frame
        n = len(payload)
        header = bytes([0x80 | opcode])
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            header += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self._sock.sendall(header + mask + masked)

    def _read(self, n: int) -> bytes:
        data = self._file.read(n)
        if len(data) != n:
            raise ConnectionError("DevTools closed the connection")
        return data

    def _receive(self) -> str:
        message = bytearray()
        while True:
            first, second = self._read(2)
            n = second & 0x7F
            if n == 126:
                n = int.from_bytes(self._read(2), "big")
            elif n == 127:
                n = int.from_bytes(self._read(8), "big")
            payload = self._read(n)  # server frames are never masked
            opcode = first & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the WebSocket")
            if opcode == 0x9:
                self._send(payload, opcode=0xA)  # ping -> pong
                continue
            if opcode == 0xA:
                continue
            message += payload
            if first & 0x80:  # FIN: last fragment of the message
                return message.decode()


def find_chromium() -> str:
    return require_command(*CHROMIUM)  # skips with `apt-get install chromium` on a fresh machine, fails in CI


@contextmanager
def chromium(profile: Path, extra_args: tuple[str, ...] = ()) -> Iterator[DevTools]:
    """Headless Chromium with a throwaway profile, no network of its own; yields a DevTools client on its tab."""
    command = [
        find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-extensions", "--hide-scrollbars",
        "--mute-audio", f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--user-data-dir={profile}",
        "--remote-debugging-port=0", *extra_args, "about:blank",
    ]
    log = (profile.parent / "chromium.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    page = None
    try:
        port_file = profile / "DevToolsActivePort"  # Chromium writes the port it picked here
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Chromium did not start: {(profile.parent / 'chromium.log').read_text()[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            targets = json.load(answer)
        page = DevTools(next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"))
        yield page
    finally:
        if page is not None:
            page.close()
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
        log.close()


# --------------------------------------------------------------------------------------------------------------


def center_of(page: DevTools, selector: str) -> tuple[float, float]:
    box = page.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                        ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    return box[0], box[1]


HEATMAP_INK = """(() => {
  const c = document.querySelector('#heatmap');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let alpha = 0; for (let i = 3; i < d.length; i += 4) alpha += d[i];
  return c.width > 0 ? alpha / (c.width * c.height) : 0;
})()"""


def assert_drawn_like_the_figures(page: DevTools) -> None:
    """The page upsamples, scales and colours a map with captioner.inference.visualize's rule and lookup table."""
    grid_map = np.array([[0.0, 1.0, 0.2], [0.6, 0.0, 0.4]], dtype=np.float32)
    ours = page.evaluate(f"Array.from(upsample({json.dumps(grid_map.tolist())}, {{height: 2, width: 3}}, 7, 5))")
    np.testing.assert_allclose(np.asarray(ours).reshape(5, 7), upsample_attention(grid_map, (7, 5)), atol=1e-6)

    # The first word's map as drawn on the canvas, at sample points, against the figures' colours there.
    drawn = page.evaluate("""(() => {
      const c = document.querySelector('#heatmap');
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      const points = [];
      for (let k = 0; k < 400; k++) {
        const x = Math.floor((k * 7919) % c.width), y = Math.floor((k * 104729) % c.height);
        points.push([x, y, ...d.slice((y * c.width + x) * 4, (y * c.width + x) * 4 + 4)]);
      }
      return {width: c.width, height: c.height, points, alphas: page.result.attention.alphas[page.word]};
    })()""")
    heat = normalize_heat(upsample_attention(np.asarray(drawn["alphas"], dtype=np.float32),
                                             (drawn["width"], drawn["height"])))
    expected = attention_colours()[colour_index(heat)]
    points = np.asarray(drawn["points"])
    assert (points[:, 5] == round(255 * DEFAULT_OPACITY)).all()  # blended at the figures' opacity
    # The canvas keeps premultiplied alpha, so a colour read back at opacity 0.5 may be off by one; a neighbouring
    # entry of the table (a heat on a bin edge) is further off than that.
    off = np.abs(points[:, 2:5] - expected[points[:, 1], points[:, 0]].astype(int)).max(axis=1)
    same = off <= 1
    assert same.mean() > 0.97, f"{(~same).sum()} of {len(same)} sampled pixels differ from the figures' colours"


@pytest.mark.browser
def test_web_page_captions_an_uploaded_coco_photo(coco_mini, shipped_checkpoint, tmp_path):
    photo = coco_mini / "val" / PHOTO
    settings = Settings(checkpoint=shipped_checkpoint, max_length=12)
    profile = tmp_path / "profile"
    profile.mkdir()
    with running_server(settings) as base_url, chromium(profile) as page:
        page.call("Page.enable")
        page.call("Page.navigate", url=f"{base_url}/")
        page.wait_for("document.readyState === 'complete' && "
                      "document.querySelector('#model-info').textContent.startsWith('model ')")
        assert "captioner-default" in page.evaluate("document.querySelector('#model-info').textContent")
        assert page.evaluate("document.querySelector('#beam-size').value") == str(settings.beam_size)  # defaults
        page.evaluate("document.querySelector('#num-captions').value = '3'")  # the n-best list, as a user asks

        # Choose the file as the file picker would: the page's own change handler uploads it.
        node = page.call("Runtime.evaluate", expression="document.querySelector('#file-input')")["result"]
        page.call("DOM.setFileInputFiles", files=[str(photo)], objectId=node["objectId"])
        state = page.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state",
                              timeout=120)
        assert state == "done", page.evaluate("document.querySelector('#status').textContent")

        caption = page.evaluate("document.querySelector('#caption').textContent")
        words = page.evaluate("[...document.querySelectorAll('#words .word')].map(w => w.textContent)")
        candidates = page.evaluate("[...document.querySelectorAll('#candidates li')].map(li => li.textContent)")
        assert caption.strip(), "no caption shown"
        assert words[-1] == "<end>" and " ".join(words[:-1]) == caption
        assert len(candidates) == 3 and all("log p" in c for c in candidates)
        assert page.evaluate("document.querySelector('#photo').naturalWidth") == 640
        assert page.evaluate(HEATMAP_INK) > 10, "no attention heat map drawn over the photo"
        assert_drawn_like_the_figures(page)
        assert page.evaluate("document.querySelector('#words .word.active').textContent") == words[0]

        # Hover the second word (a real mouse move), then step on with the right-arrow key.
        x, y = center_of(page, "#words .word:nth-child(2)")
        page.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        page.wait_for("document.querySelector('#words .word.active') === "
                      "document.querySelector('#words .word:nth-child(2)')", timeout=5)
        for kind in ("keyDown", "keyUp"):
            page.call("Input.dispatchKeyEvent", type=kind, key="ArrowRight", code="ArrowRight",
                      windowsVirtualKeyCode=39)
        page.wait_for("document.querySelector('#word-info').textContent.startsWith('3/')", timeout=5)
        assert page.evaluate(HEATMAP_INK) > 10

        # Back to the first word for the picture, then keep it.
        x, y = center_of(page, "#words .word:nth-child(1)")
        page.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        size = page.call("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = page.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        shot = base64.b64decode(shot["data"])

        # An iPhone's HEIC, which Chromium cannot decode: the page shows the server's JPEG of it instead.
        heic = tmp_path / "IMG_0790.HEIC"
        Image.open(photo).save(heic, format="HEIF", quality=90)
        page.evaluate("document.body.dataset.state = 'picking'")
        page.call("DOM.setFileInputFiles", files=[str(heic)], objectId=node["objectId"])
        state = page.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state",
                              timeout=120)
        assert state == "done" and page.evaluate("document.querySelector('#status').textContent") == ""
        assert page.evaluate("document.querySelector('#photo').naturalWidth") == 640
        assert page.evaluate(HEATMAP_INK) > 10, "no attention heat map drawn over the HEIC's preview"
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 50_000
    (tmp_path / "service.png").write_bytes(shot)
    if target := os.environ.get("CAPTIONER_SCREENSHOT"):
        Path(target).write_bytes(shot)
