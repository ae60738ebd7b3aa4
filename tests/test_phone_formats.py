"""Phone photos: HEIC/HEIF (pillow-heif) and AVIF (Pillow) are read wherever images are read, EXIF orientation
applied; the service takes them as uploads. The files are encoded here from real COCO photos."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image, features

from captioner.api import load_captioner
from captioner.encoder import Preprocessing
from captioner.features import ImageFileDataset
from captioner.images import open_image
from service.settings import Settings
from tests.helpers import running_server

PHOTO = "000000024585.jpg"  # coco-mini/val, landscape 640 x 432
ORIENTATION = 0x0112


def encode(image: Image.Image, fmt: str, orientation: int | None = None, **options) -> bytes:
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        options["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def lossless_heic(image: Image.Image) -> bytes:
    """HEVC lossless in RGB (no YCbCr, no chroma subsampling): the very pixels of the JPEG's decoding."""
    return encode(image, "HEIF", quality=-1, chroma=444, matrix_coefficients=0)


@pytest.fixture(scope="module")
def jpeg_path(coco_mini):
    return coco_mini / "val" / PHOTO


@pytest.fixture(scope="module")
def rgb(jpeg_path) -> Image.Image:
    return open_image(jpeg_path)


def test_pillow_reads_avif():
    assert features.check("avif"), "this Pillow was built without AVIF support (pillow>=11.3 wheels have it)"


def test_lossless_heic_decodes_to_the_jpegs_pixels(rgb):
    data = lossless_heic(rgb)
    assert Image.open(io.BytesIO(data)).format == "HEIF"
    assert np.array_equal(np.asarray(open_image(data)), np.asarray(rgb))


@pytest.mark.parametrize("fmt, options", [("HEIF", {"quality": 90}), ("AVIF", {"quality": 90})])
def test_phone_photo_with_exif_orientation_is_turned_upright(rgb, fmt, options):
    """Orientation 6: the camera held upright, the pixels stored on their side. The upright photo is the stored
    one turned 90 degrees clockwise, as the JPEG path of open_image does it."""
    stored = rgb.transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote (portrait photo stored landscape)
    upright = open_image(encode(stored, "JPEG", orientation=6, quality=95))
    image = open_image(encode(stored, fmt, orientation=6, **options))
    assert image.mode == "RGB" and image.size == upright.size == rgb.size
    difference = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(upright, dtype=np.int16))
    assert difference.mean() < 6, f"{fmt}: not the upright photo (mean difference {difference.mean():.1f})"


def test_api_and_training_read_heic_and_avif_files(rgb, tmp_path, shipped_checkpoint, jpeg_path):
    heic, avif = tmp_path / "photo.heic", tmp_path / "photo.avif"
    heic.write_bytes(lossless_heic(rgb))
    avif.write_bytes(encode(rgb, "AVIF", quality=90))

    # Training: the feature cache's image dataset decodes them like any photo.
    dataset = ImageFileDataset([heic, avif], Preprocessing(448, (0.5,) * 3, (0.5,) * 3), [0, 1])
    for i in range(2):
        _, tensor, error = dataset[i]
        assert error is None and tuple(tensor.shape) == (3, 448, 448)

    # API: a HEIC path gets the JPEG's caption (same pixels), the AVIF one a caption.
    captioner = load_captioner(shipped_checkpoint)
    from_jpeg, from_heic, from_avif = captioner.caption([jpeg_path, heic, avif], max_length=12)
    assert from_heic.caption == from_jpeg.caption
    assert from_avif.caption.strip()


# --------------------------------------------------------------------------------------------------------------
# The service, with the shipped model.


@pytest.fixture(scope="module")
def client(shipped_checkpoint) -> Iterator[httpx.Client]:
    with running_server(Settings(checkpoint=shipped_checkpoint, max_length=12)) as url, \
            httpx.Client(base_url=url, timeout=120) as c:
        yield c


def test_service_captions_heic_like_its_jpeg_and_accepts_avif(client, jpeg_path, rgb):
    jpeg = jpeg_path.read_bytes()
    heic = lossless_heic(rgb)
    avif = encode(rgb, "AVIF", quality=90)

    expected = client.post("/v1/captions", files={"image": ("photo.jpg", jpeg, "image/jpeg")})
    assert expected.status_code == 200, expected.text
    uploads = {
        "multipart heic": dict(files={"image": ("IMG_0001.HEIC", heic, "image/heic")}),
        "raw image/heic": dict(content=heic, headers={"Content-Type": "image/heic"}),
        "raw image/heif": dict(content=heic, headers={"Content-Type": "image/heif"}),
    }
    for name, request in uploads.items():
        response = client.post("/v1/captions", **request)
        assert response.status_code == 200, f"{name}: {response.text}"
        assert response.json()["caption"] == expected.json()["caption"], name

    for request in (dict(files={"image": ("photo.avif", avif, "image/avif")}),
                    dict(content=avif, headers={"Content-Type": "image/avif"})):
        response = client.post("/v1/captions", **request)
        assert response.status_code == 200, response.text
        assert response.json()["caption"].strip()


def test_service_previews_a_heic_as_an_upright_jpeg(client, rgb):
    """What the web page shows when the browser cannot decode the upload: the upright photo, as a JPEG."""
    stored = rgb.transpose(Image.Transpose.ROTATE_90)  # a portrait photo, stored on its side (orientation 6)
    heic = encode(stored, "HEIF", quality=90, orientation=6)
    response = client.post("/v1/previews", params={"max_side": 320},
                           files={"image": ("IMG_0002.HEIC", heic, "image/heic")})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    preview = Image.open(io.BytesIO(response.content))
    assert preview.format == "JPEG" and preview.mode == "RGB"
    assert preview.size == (320, round(320 * rgb.height / rgb.width))  # upright, as wide as rgb, longest side 320
    expected = np.asarray(rgb.resize(preview.size, Image.Resampling.LANCZOS), dtype=np.int16)
    assert np.abs(np.asarray(preview, dtype=np.int16) - expected).mean() < 8

    raw = client.post("/v1/previews", content=heic, headers={"Content-Type": "image/heic"})
    assert raw.status_code == 200 and Image.open(io.BytesIO(raw.content)).size == rgb.size  # never enlarged


def test_service_preview_refuses_what_captions_refuse(client):
    not_an_image = client.post("/v1/previews", files={"image": ("notes.heic", b"not a photo", "image/heic")})
    assert not_an_image.status_code == 415 and not_an_image.json()["error"]["code"] == "unsupported_media_type"
    empty = client.post("/v1/previews", content=b"", headers={"Content-Type": "image/jpeg"})
    assert empty.status_code == 400 and empty.json()["error"]["code"] == "empty_upload"
    tiny = client.post("/v1/previews", params={"max_side": 8}, content=b"x", headers={"Content-Type": "image/jpeg"})
    assert tiny.status_code == 422
