"""The HTTP service through a real uvicorn server on 127.0.0.1, with real COCO images and every kind of bad input."""

from __future__ import annotations

import asyncio
import io
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from captioner.decoding import RECOMMENDED
from service.batching import MicroBatcher, NotRunning
from service.settings import Settings
from tests.helpers import running_server

PHOTO = "000000000790.jpg"  # coco-mini/val
MAX_UPLOAD = 2 * 1024 * 1024
MAX_PIXELS = 4_000_000  # COCO photos are ~0.3 MP; the crafted bombs claim far more




@pytest.fixture(scope="module")
def base_url(lite0_checkpoint) -> Iterator[str]:
    settings = Settings(
        checkpoint=lite0_checkpoint,
        max_upload_bytes=MAX_UPLOAD,
        max_pixels=MAX_PIXELS,
        max_batch=8,
        max_wait_ms=100,  # long enough for 8 simultaneous requests to meet in one batch on a busy 2-core box
        upload_timeout_s=2.0,
        max_length=12,  # shorter captions: quicker tests, same code paths
    )
    with running_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def photo(coco_mini) -> bytes:
    return (coco_mini / "val" / PHOTO).read_bytes()


def post_image(client: httpx.Client, data: bytes, filename: str = "photo.jpg", content_type: str = "image/jpeg",
               fields: dict | None = None, params: dict | None = None) -> httpx.Response:
    return client.post("/v1/captions", files={"image": (filename, data, content_type)}, data=fields, params=params)


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    """Every error is JSON {"error": {"code", "message"}} with the right status: never a 500, never HTML."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]


# --------------------------------------------------------------------------------------------------------------
# Health, docs, the page.


def test_health_ready_docs_and_page(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["model"]["name"] == "lite0-untrained"
    assert ready.json()["model"]["encoder"] == "efficientnet-lite0"
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    openapi = client.get("/openapi.json").json()
    post = openapi["paths"]["/v1/captions"]["post"]
    assert {"multipart/form-data", "image/*"} <= set(post["requestBody"]["content"])
    assert {"method", "beam_size", "top_p", "attention"} <= {p["name"] for p in post["parameters"]}
    page = client.get("/")
    assert page.status_code == 200 and 'id="file-input"' in page.text
    assert client.get("/static/app.js").status_code == 200


def test_unknown_route_and_method_are_json_errors(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/v1/captions"), 405, "method_not_allowed")


# --------------------------------------------------------------------------------------------------------------
# Captioning real COCO images.


def test_caption_multipart_with_defaults(client, photo):
    response = post_image(client, photo)
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["caption"], str) and body["caption"]
    assert body["candidates"][0]["caption"] == body["caption"]
    assert isinstance(body["candidates"][0]["log_prob"], float)
    for key, value in RECOMMENDED.items():  # the server's defaults are captioner's recommended decoding
        assert body["decoding"][key] == value, key
    assert body["decoding"]["max_length"] == 12 and body["decoding"]["seed"] is None
    assert body["model"]["name"] == "lite0-untrained" and len(body["model"]["version"]) >= 8
    assert set(body["timing_ms"]) == {"read", "decode_image", "queue", "inference", "total"}
    assert body["batch_size"] >= 1
    assert "attention" not in body  # only on request


def test_caption_raw_image_body_with_query_parameters(client, photo):
    response = client.post("/v1/captions", content=photo, headers={"Content-Type": "image/jpeg"},
                           params={"method": "greedy", "max_length": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["decoding"]["method"] == "greedy" and body["decoding"]["max_length"] == 5
    assert 1 <= len(body["caption"].split()) <= 5


def test_form_fields_choose_the_n_best_list(client, photo):
    response = post_image(client, photo, fields={"method": "beam", "beam_size": "4", "num_captions": "3"})
    assert response.status_code == 200, response.text
    body = response.json()
    candidates = body["candidates"]
    assert len(candidates) == 3 and len({c["caption"] for c in candidates}) == 3  # three different beams
    d = body["decoding"]
    assert (d["method"], d["beam_size"], d["num_captions"]) == ("beam", 4, 3)  # the form fields were used
    # Beam search ranks by its score, log p / (words + END) ** length_penalty, not by log p itself.
    scores = [c["log_prob"] / (len(c["caption"].split()) + 1) ** d["length_penalty"] for c in candidates]
    assert scores == sorted(scores, reverse=True)


def test_more_captions_than_the_default_beam_widens_it(client, photo):
    response = post_image(client, photo, params={"num_captions": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["candidates"]) == 3 and body["decoding"]["beam_size"] == 3


def test_attention_maps_for_every_word(client, photo):
    response = post_image(client, photo, params={"attention": "true", "method": "greedy"})
    assert response.status_code == 200, response.text
    body = response.json()
    attention = body["attention"]
    height, width = attention["grid"]["height"], attention["grid"]["width"]
    assert (height, width) == (14, 14)
    tokens = attention["tokens"]
    assert tokens[-1] == "<end>" and " ".join(tokens[:-1]) == body["caption"]
    alphas = np.asarray(attention["alphas"])  # the payload `captioner visualize --json` writes: T x h x w
    assert alphas.shape == (len(tokens), height, width) == (len(attention["betas"]), 14, 14)
    assert alphas.sum(axis=(1, 2)) == pytest.approx(np.ones(len(tokens)), abs=1e-3)
    assert all(0.0 <= b <= 1.0 for b in attention["betas"])


def test_page_gets_the_figures_colour_ramp(client):
    from captioner.inference.visualize import DEFAULT_OPACITY, attention_colours

    style = client.get("/attention-style.json").json()
    assert np.array_equal(np.asarray(style["colours"]), attention_colours())
    assert style["opacity"] == DEFAULT_OPACITY


def test_seeded_sampling_is_reproducible(client, photo):
    params = {"method": "sample", "seed": 7, "num_captions": 2, "temperature": 0.9, "top_p": 0.9}
    first, second = (post_image(client, photo, params=params) for _ in range(2))
    assert first.status_code == second.status_code == 200, first.text
    assert first.json()["candidates"] == second.json()["candidates"]
    assert first.json()["decoding"]["seed"] == 7


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def odd_images(photo_path: Path) -> dict[str, tuple[bytes, str]]:
    """Valid images in the modes and containers that trip naive code, all made from a real COCO photo."""
    rgb = Image.open(photo_path).convert("RGB")
    rgb.thumbnail((320, 320))
    alpha = Image.linear_gradient("L").resize(rgb.size)
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    deep = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    frames = [rgb.convert("P", palette=Image.Palette.ADAPTIVE), rgb.rotate(180).convert("P")]
    images = {
        "grayscale.jpg": (_encode(rgb.convert("L"), "JPEG"), "image/jpeg"),
        "rgba.png": (_encode(rgba, "PNG"), "image/png"),
        "cmyk.jpg": (_encode(rgb.convert("CMYK"), "JPEG"), "image/jpeg"),
        "palette.png": (_encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG"), "image/png"),
        "16bit.png": (_encode(Image.fromarray(deep), "PNG"), "image/png"),
        "exif-rotated.jpg": (_encode(rgb, "JPEG", exif=exif.tobytes()), "image/jpeg"),
        "animated.gif": (_encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
                         "image/gif"),
        "tiny.png": (_encode(rgb.resize((3, 2)), "PNG"), "image/png"),
        "photo.webp": (_encode(rgb, "WEBP"), "image/webp"),
    }
    assert Image.open(io.BytesIO(images["16bit.png"][0])).mode.startswith("I"), "not a 16-bit PNG"
    assert Image.open(io.BytesIO(images["cmyk.jpg"][0])).mode == "CMYK"
    assert getattr(Image.open(io.BytesIO(images["animated.gif"][0])), "n_frames", 1) == 2
    return images


def test_odd_but_valid_images_are_captioned(base_url, coco_mini):
    """Sent all at once: besides the modes, this checks a batch of mixed images comes back to the right callers."""
    images = odd_images(coco_mini / "val" / PHOTO)

    def send(name: str) -> httpx.Response:
        data, content_type = images[name]
        return httpx.post(f"{base_url}/v1/captions", files={"image": (name, data, content_type)},
                          params={"method": "greedy"}, timeout=120)

    with ThreadPoolExecutor(len(images)) as pool:
        responses = dict(zip(images, pool.map(send, images), strict=True))
    for name, response in responses.items():
        assert response.status_code == 200, f"{name}: {response.text}"
        assert response.json()["caption"], name


# --------------------------------------------------------------------------------------------------------------
# Bad input: the right status and a JSON error, never a 500.


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_not_an_image_is_415(client, coco_mini):
    text = (coco_mini / "annotations" / "captions_val.json").read_bytes()[:2000]
    error = assert_error(post_image(client, text, "captions.txt", "text/plain"), 415, "unsupported_media_type")
    assert "not a recognised image" in error["message"]
    raw = client.post("/v1/captions", content=text, headers={"Content-Type": "image/png"})
    assert_error(raw, 415, "unsupported_media_type")


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "application/x-www-form-urlencoded", None])
def test_unsupported_content_type_is_415(client, photo, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/v1/captions", content=photo, headers=headers)
    error = assert_error(response, 415, "unsupported_media_type")
    assert "multipart/form-data" in error["message"] and "image/*" in error["message"]


def test_truncated_or_corrupt_image_is_400(client, photo, coco_mini):
    assert_error(post_image(client, photo[: len(photo) // 2]), 400, "invalid_image")
    png = _encode(Image.open(coco_mini / "val" / PHOTO).convert("RGB").resize((64, 64)), "PNG")
    assert_error(post_image(client, png[: len(png) - 300], "cut.png", "image/png"), 400, "invalid_image")
    broken = bytearray(png)
    broken[60:90] = b"\x00" * 30  # inside the compressed data: the CRC and zlib checks both fail
    assert_error(post_image(client, bytes(broken), "broken.png", "image/png"), 400, "invalid_image")


def test_empty_or_missing_image_is_400(client):
    assert_error(client.post("/v1/captions", content=b"", headers={"Content-Type": "image/jpeg"}), 400, "empty_upload")
    no_image = client.post("/v1/captions", files={"picture": ("a.jpg", b"123", "image/jpeg")})
    assert_error(no_image, 400, "missing_image")
    garbage = client.post("/v1/captions", content=b"--x\r\nnot a part header at all",
                          headers={"Content-Type": "multipart/form-data; boundary=zzz"})
    assert garbage.status_code == 400 and garbage.json()["error"]["code"] in ("bad_request", "missing_image")
    no_boundary = client.post("/v1/captions", content=b"abc", headers={"Content-Type": "multipart/form-data"})
    assert_error(no_boundary, 400, "bad_request")


def test_body_over_the_upload_cap_is_413(client):
    big = os.urandom(MAX_UPLOAD + 1)
    error = assert_error(client.post("/v1/captions", content=big, headers={"Content-Type": "image/jpeg"}),
                         413, "payload_too_large")
    assert str(MAX_UPLOAD) in error["message"]
    assert_error(post_image(client, big), 413, "payload_too_large")


def _read_http_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:])
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), json.loads(body[:length])


def test_upload_cap_is_checked_while_streaming(base_url):
    """A chunked body (no Content-Length) of 64 MiB: the 413 must come long before the client has sent it all."""
    port = int(base_url.rsplit(":", 1)[1])
    total, chunk = 64 * 1024 * 1024, b"\xff" * 65536
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        while sent < total and not select.select([sock], [], [], 0)[0]:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        status, body = _read_http_response(sock)
    assert status == 413 and body["error"]["code"] == "payload_too_large", body
    assert sent < total / 2, f"the server answered only after {sent} bytes"


def test_slow_upload_times_out_without_blocking_the_server(base_url, client):
    """A client that stops sending mid-body gets a 408 after upload_timeout_s; meanwhile the server answers."""
    port = int(base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: 100000\r\n\r\n\xff\xd8\xff")
        started = time.monotonic()
        assert client.get("/healthz", timeout=2).status_code == 200
        status, body = _read_http_response(sock)
    assert status == 408 and body["error"]["code"] == "request_timeout", body
    assert 1.5 < time.monotonic() - started < 10


@pytest.mark.parametrize(
    "name, data",
    [
        ("png header claiming 100000x100000", png_claiming(100_000, 100_000)),
        ("png header claiming 3000x3000", png_claiming(3000, 3000)),
        ("real 3000x3000 png, 9 KB on disk", _encode(Image.new("L", (3000, 3000)), "PNG", optimize=True)),
        ("gif claiming 65535x65535", b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
         + b"," + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x4c\x01\x00;"),
    ],
)
def test_decompression_bomb_is_refused_before_decoding(client, name, data):
    assert len(data) < 20_000
    started = time.monotonic()
    error = assert_error(post_image(client, data, "bomb.png", "image/png"), 413, "image_too_large")
    assert "pixels" in error["message"] or "limit" in error["message"], error
    assert time.monotonic() - started < 5  # decoding 9 MP would not fit; 10 GP would not even fit in memory


@pytest.mark.parametrize(
    "params",
    [
        {"beam_size": 0}, {"beam_size": 11}, {"temperature": -0.1}, {"temperature": 6}, {"top_p": 0},
        {"top_p": 1.5}, {"top_k": -1}, {"max_length": 0}, {"max_length": 51}, {"num_captions": 0},
        {"num_captions": 11}, {"method": "telepathy"}, {"seed": -1}, {"beam_size": "three"},
        {"attention": "maybe"}, {"beamsize": 3},
    ],
    ids=lambda p: "&".join(f"{k}={v}" for k, v in p.items()),
)
def test_out_of_range_parameters_are_422(client, photo, params):
    error = assert_error(post_image(client, photo, params=params), 422, "invalid_parameters")
    assert error["details"] and error["details"][0]["loc"][-1] == next(iter(params))


def test_parameter_combinations_and_form_fields_are_validated(client, photo):
    error = assert_error(post_image(client, photo, params={"method": "beam", "beam_size": 2, "num_captions": 5}),
                         422, "invalid_parameters")
    assert "beam_size" in error["message"]
    form = assert_error(post_image(client, photo, fields={"beam_size": "0"}), 422, "invalid_parameters")
    assert form["details"][0]["loc"] == ["form", "beam_size"]


def test_server_is_healthy_after_bad_input(client, photo):
    assert client.get("/readyz").status_code == 200
    assert post_image(client, photo, params={"method": "greedy"}).status_code == 200


# --------------------------------------------------------------------------------------------------------------
# Micro-batching.


def test_concurrent_requests_are_micro_batched(base_url, coco_mini):
    photos = sorted((coco_mini / "val").glob("*.jpg"))[:8]
    methods = ["greedy", "beam"] * 4  # one batch, two decoding groups

    def send(i: int) -> httpx.Response:
        return httpx.post(f"{base_url}/v1/captions", files={"image": (photos[i].name, photos[i].read_bytes())},
                          params={"method": methods[i], "num_captions": 1}, timeout=120)

    before = httpx.get(f"{base_url}/v1/stats").json()
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, range(8)))
    after = httpx.get(f"{base_url}/v1/stats").json()
    for method, response in zip(methods, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["decoding"]["method"] == method
    assert max(r.json()["batch_size"] for r in responses) > 1
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8
    assert after["max_batch_size_seen"] > 1


def test_batched_and_single_results_agree(client, base_url, coco_mini):
    """Batching must not change what an image gets: the greedy caption alone equals the one from a batch."""
    path = coco_mini / "val" / PHOTO
    alone = post_image(client, path.read_bytes(), params={"method": "greedy"}).json()
    others = sorted((coco_mini / "val").glob("*.jpg"))[:3]

    def send(p: Path) -> httpx.Response:
        return httpx.post(f"{base_url}/v1/captions", files={"image": (p.name, p.read_bytes())},
                          params={"method": "greedy"}, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(send, [path, *others]))
    assert together[0].json()["caption"] == alone["caption"]


def test_batcher_routes_results_and_errors_to_their_callers():
    def run(items: list[int]) -> list[int | BaseException]:
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    async def main() -> tuple[list, list[int]]:
        batcher: MicroBatcher[int, int] = MicroBatcher(run, max_batch=4, max_wait_ms=50)
        batcher.start()
        outcomes = await asyncio.gather(*(batcher.submit(i) for i in [1, -2, 3, 4, 5]), return_exceptions=True)
        await batcher.stop()
        return outcomes, sorted(batcher.stats.sizes.elements())

    outcomes, sizes = asyncio.run(main())
    assert [o.value for o in outcomes if not isinstance(o, BaseException)] == [10, 30, 40, 50]
    assert isinstance(outcomes[1], ValueError) and str(outcomes[1]) == "bad -2"
    assert sizes == [1, 4]  # max_batch caps a batch; the rest makes the next one


def test_batcher_waits_only_for_requests_on_their_way():
    """A lone request goes straight to the model despite a long max_wait_ms; one still arriving is waited for."""

    async def main() -> tuple[float, list[int]]:
        batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: items, max_batch=4, max_wait_ms=5000)
        batcher.start()
        started = time.perf_counter()
        await batcher.submit(1)
        alone = time.perf_counter() - started

        async def late_arrival() -> int:
            with batcher.arriving():
                await asyncio.sleep(0.2)  # receiving and decoding its image
                future = batcher.enqueue(3)
            return (await future).batch_size

        arrival = asyncio.create_task(late_arrival())
        await asyncio.sleep(0)  # the late request is now on its way
        first = (await batcher.submit(2)).batch_size
        sizes = [first, await arrival]
        await batcher.stop()
        return alone, sizes

    alone, sizes = asyncio.run(main())
    assert alone < 1.0
    assert sizes == [2, 2]


def test_batcher_survives_a_failing_runner_and_max_batch_1_means_no_batching():
    calls: list[int] = []

    def run(items: list[int]) -> list[int]:
        calls.append(len(items))
        if items[0] == 0:
            raise RuntimeError("boom")
        return items

    async def main() -> tuple[list, object]:
        batcher: MicroBatcher[int, int] = MicroBatcher(run, max_batch=1, max_wait_ms=50)
        batcher.start()
        failed = await asyncio.gather(batcher.submit(0), return_exceptions=True)
        outcomes = await asyncio.gather(*(batcher.submit(i) for i in [1, 2, 3]))
        await batcher.stop()
        stopped = await asyncio.gather(batcher.submit(9), return_exceptions=True)
        return [failed[0], *outcomes], stopped[0]

    outcomes, stopped = asyncio.run(main())
    assert isinstance(outcomes[0], RuntimeError)
    assert [o.value for o in outcomes[1:]] == [1, 2, 3]
    assert calls == [1, 1, 1, 1]
    assert isinstance(stopped, NotRunning)


# --------------------------------------------------------------------------------------------------------------
# Start-up paths.


def test_importing_the_module_app_loads_no_model(monkeypatch, tmp_path):
    import service.app as module

    monkeypatch.setenv("CAPTIONER_CHECKPOINT", str(tmp_path / "absent.pt"))
    monkeypatch.setenv("CAPTIONER_MAX_BATCH", "3")
    monkeypatch.setattr(module, "_default_app", None)
    app = module.app  # builds the app from the environment; the model would only load in the lifespan
    assert app.state.settings.max_batch == 3 and app.state.batcher is None


def test_captioner_serve_command(lite0_checkpoint):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "CAPTIONER_MAX_BATCH": "2"}
    command = [sys.executable, "-m", "captioner.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--checkpoint", str(lite0_checkpoint)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "captioner serve did not become ready"
            time.sleep(0.25)
        assert ready.json()["model"]["name"] == "lite0-untrained"
        assert httpx.get(f"http://127.0.0.1:{port}/v1/stats").json()["max_batch"] == 2
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_captioner_serve_refuses_a_missing_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-m", "captioner.cli", "serve", "--checkpoint", str(tmp_path / "x.pt")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "x.pt" in result.stderr


# --------------------------------------------------------------------------------------------------------------
# Issue 33: one set of defaults, and responses that tell the truth.


def test_the_page_is_served_with_the_servers_decoding_defaults(client):
    page = client.get("/").text
    defaults = Settings(max_length=12).default_decoding()
    assert "{{" not in page
    assert f'id="beam-size" type="number" min="1" max="10" value="{defaults.beam_size}"' in page
    assert f'id="num-captions" type="number" min="1" max="10" value="{defaults.num_captions}"' in page
    assert f'value="{defaults.temperature:g}"' in page
    assert f'<option value="{defaults.method}" selected>' in page and page.count(" selected>") == 1


def test_greedy_gives_one_caption_and_says_so(client, photo):
    error = assert_error(post_image(client, photo, params={"method": "greedy", "num_captions": 3}), 422,
                         "invalid_parameters")
    assert "greedy decoding gives one caption" in error["message"]
    body = post_image(client, photo, params={"method": "greedy"}).json()
    assert len(body["candidates"]) == 1 and body["decoding"]["num_captions"] == 1


def test_nan_is_refused_as_not_finite(client, photo):
    error = assert_error(post_image(client, photo, params={"temperature": "nan"}), 422, "invalid_parameters")
    assert "finite number" in json.dumps(error) and "less than or equal" not in json.dumps(error)


def test_mean_log_prob_and_the_uncertain_floor(client, photo):
    body = post_image(client, photo, params={"num_captions": 2}).json()
    assert body["uncertain"] is False  # no floor set
    for candidate in body["candidates"]:
        words = len(candidate["caption"].split()) + 1  # <end> counts
        assert candidate["mean_log_prob"] == pytest.approx(candidate["log_prob"] / words, abs=1e-3)
    best = body["candidates"][0]["mean_log_prob"]
    for floor, uncertain in ((best + 0.01, True), (best - 0.01, False)):
        flagged = post_image(client, photo, params={"uncertain_below": floor}).json()
        assert flagged["uncertain"] is uncertain and flagged["decoding"]["uncertain_below"] == floor


def test_redoc_is_served_from_this_server_only(client):
    page = client.get("/redoc")
    assert page.status_code == 200 and "/redoc-assets/redoc.standalone.js" in page.text
    assert "https://" not in page.text.split("<body>")[0]  # no CDN script, font or icon in the head
    script = client.get("/redoc-assets/redoc.standalone.js")
    assert script.status_code == 200 and "cdn.redoc.ly" not in script.text and "Redoc" in script.text


def test_a_jpeg_damaged_in_the_middle_is_400(client, photo):
    damaged = bytearray(photo)
    damaged[len(photo) // 2 : len(photo) // 2 + 2000] = bytes(2000)  # Pillow alone would decode grey blocks
    error = assert_error(post_image(client, bytes(damaged)), 400, "invalid_image")
    assert "corrupt" in error["message"]
