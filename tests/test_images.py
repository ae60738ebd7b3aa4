"""Odd but valid images are captioned; bad ones give a clear ImageError of the right kind."""

import io

import numpy as np
import pytest
from PIL import Image

from captioner.images import ImageError, open_image


def _bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo(coco_mini) -> Image.Image:
    return Image.open(coco_mini / "val" / "000000024585.jpg").convert("RGB")


@pytest.mark.parametrize(
    "mode,fmt",
    [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("RGB", "WEBP"), ("LA", "PNG"), ("1", "PNG")],
)
def test_any_mode_becomes_rgb(photo, mode, fmt):
    image = open_image(_bytes(photo.convert(mode), fmt))
    assert image.mode == "RGB" and image.size == photo.size


def test_16_bit_grayscale_keeps_its_contrast(photo):
    gray16 = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)  # 16-bit: mode I;16
    image = open_image(_bytes(gray16, "PNG"))
    values = np.asarray(image)
    assert image.mode == "RGB" and values.max() > 200 and values.min() < 60  # not clipped to white


def test_exif_orientation_is_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image = open_image(_bytes(photo, "JPEG", exif=exif.tobytes()))
    assert image.size == (photo.height, photo.width)


def test_animated_gif_gives_first_frame(photo):
    frames = [photo.resize((64, 48)), Image.new("RGB", (64, 48), "red")]
    data = _bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    image = open_image(data)
    assert image.size == (64, 48) and np.asarray(image)[..., 0].mean() < 250


def test_transparent_pixels_become_white():
    image = open_image(_bytes(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG"))
    assert np.asarray(image).min() == 255


def test_truncated_image_is_corrupt(coco_mini):
    data = (coco_mini / "val" / "000000024585.jpg").read_bytes()
    with pytest.raises(ImageError) as err:
        open_image(data[: len(data) // 3])
    assert err.value.kind == "corrupt" and "truncated" in str(err.value)


def test_not_an_image():
    with pytest.raises(ImageError) as err:
        open_image(b"hello, I am text")
    assert err.value.kind == "not_image"


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file") as err:
        open_image(tmp_path / "nope.jpg")
    assert err.value.kind == "missing"


def test_decompression_bomb_refused_before_decoding():
    # A 1-bit 40000 x 40000 PNG compresses to a few hundred KB but decodes to 1.6 gigapixels.
    data = _bytes(Image.new("1", (40_000, 40_000)), "PNG")
    assert len(data) < 1_000_000
    with pytest.raises(ImageError) as err:
        open_image(data, max_pixels=50_000_000)
    assert err.value.kind == "too_large" and "over the limit" in str(err.value)


def _pillow_decode(data: bytes, draft_size: int | None = None) -> np.ndarray:
    """The reference: Pillow's own JPEG decoder (draft like open_image's), EXIF orientation applied."""
    from PIL import ImageOps

    image = Image.open(io.BytesIO(data))
    if draft_size:
        image.draft("RGB", (draft_size, draft_size))
    return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


@pytest.mark.parametrize("name", ["000000024585.jpg", "000000113588.jpg"])
@pytest.mark.parametrize("size", [None, (4000, 3000), (1300, 900)])
def test_jpeg_pixels_match_pillows_decoder(coco_mini, name, size):
    """open_image decodes a JPEG in one strict simplejpeg pass: the pixels must be Pillow's, at full size and at
    the reduced DCT scale a big photo is decoded at, so that neither engine's captions move."""
    data = (coco_mini / "val" / name).read_bytes()
    if size:
        data = _bytes(Image.open(io.BytesIO(data)).convert("RGB").resize(size), "JPEG", quality=90)
    got = np.asarray(open_image(data, draft_size=448 if size else None))
    want = _pillow_decode(data, draft_size=448 if size else None)
    assert got.shape == want.shape and np.array_equal(got, want)
    assert size is None or 448 <= min(got.shape[:2]) < min(size) / 1.5  # scaled, never below the input side


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_like_pillow(photo, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _bytes(photo.resize((96, 64)), "JPEG", exif=exif.tobytes())
    assert np.array_equal(np.asarray(open_image(data)), _pillow_decode(data))


def test_grayscale_jpeg_matches_pillow(photo):
    data = _bytes(photo.convert("L"), "JPEG")
    image = open_image(data)
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), _pillow_decode(data))
