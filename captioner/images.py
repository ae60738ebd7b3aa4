"""Safe image opening shared by the CLI, training and the service.

Every image becomes an 8-bit RGB PIL image: EXIF orientation applied, first frame of animations, any mode
(grayscale, palette, RGBA, CMYK, 16-bit) converted, and a pixel cap checked *before* decoding so a tiny
file that claims a gigapixel size is refused without allocating it.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

# Phone photos: HEIC/HEIF (the iPhone's default) through pillow-heif, registered once for every reader (CLI, API,
# service, training); AVIF is Pillow's own (its wheels carry libavif). pillow-heif applies the HEIF rotation itself
# and resets the EXIF orientation, so exif_transpose below never turns a HEIC twice.
register_heif_opener()

DEFAULT_MAX_PIXELS = 50_000_000  # well above any photo, well below what fills memory

# libjpeg's warnings that mean the picture itself is damaged (Pillow silences them and returns grey or smeared
# blocks). Others, such as "N extraneous bytes before marker" (junk after the data, common from some cameras),
# leave every pixel intact and are not refused.
_DAMAGED_JPEG = ("bad huffman code", "premature end", "instead of rst", "huffman table")


class ImageError(ValueError):
    """An image that cannot be used. `kind` tells callers (e.g. the HTTP service) which status fits."""

    def __init__(self, message: str, kind: str = "corrupt"):
        super().__init__(message)
        self.kind = kind  # "not_image" | "corrupt" | "too_large"


def open_image(
    source: str | Path | bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    square_resize_follows: bool = False,
) -> Image.Image:
    """Open a path or bytes as RGB, raising ImageError with a clear message when it cannot be used.

    `draft_size` (the model's input side, for callers that only need that much): a JPEG at least twice as large
    on both sides is decoded at a reduced DCT scale (1/2, 3/8, 1/4 or 1/8) that keeps both sides >= draft_size.
    A 12-megapixel phone photo then decodes in a fraction of the time, and the resize that follows starts from
    ~1000 px instead of ~4000. Smaller images decode exactly as without it. `square_resize_follows` (the model's
    own `open`, whose image only goes to `resize_square`): a reduced-scale decode is then also averaged over
    whole blocks to under 2 x draft_size per side, which changes its aspect ratio (never use it for display)."""
    name = "upload" if isinstance(source, bytes | bytearray) else str(source)
    if not isinstance(source, bytes | bytearray):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: no such file", kind="missing")
        source = path.read_bytes()
    try:
        with warnings.catch_warnings():
            # PIL warns (and past 2x errors) on big images; we apply our own cap below instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source))
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a recognised image format", kind="not_image") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: image is over the limit of {max_pixels} pixels ({exc})", kind="too_large") from exc
    except OSError as exc:
        raise ImageError(f"{name}: cannot read image header ({exc})") from exc

    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: {width}x{height} = {width * height} pixels is over the limit of {max_pixels}",
            kind="too_large",
        )
    if width == 0 or height == 0:
        raise ImageError(f"{name}: image has no pixels")
    # One decision for both JPEG decoders below: a reduced DCT scale only where it keeps both sides >= draft_size.
    scaled_to = draft_size if draft_size and min(width, height) >= 2 * draft_size and image.format == "JPEG" else None
    decoded = _decode_jpeg(source, image, name, scaled_to) if image.format == "JPEG" else None
    if decoded is None:
        decoded = _decode_with_pillow(image, name, scaled_to)
    return _block_average(decoded, scaled_to) if scaled_to and square_resize_follows else decoded


def _decode_with_pillow(image: Image.Image, name: str, scaled_to: int | None) -> Image.Image:
    """Every format, and the JPEGs simplejpeg declines: first frame, EXIF orientation, RGB."""
    try:
        image.seek(0)  # first frame of GIF/WebP/APNG animations
        if scaled_to:
            image.draft("RGB", (scaled_to, scaled_to))  # before load(); EXIF still applies below
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise ImageError(f"{name}: corrupt or truncated image data ({exc})") from exc


def _decode_jpeg(data: bytes, header: Image.Image, name: str, scaled_to: int | None) -> Image.Image | None:
    """A JPEG in one strict libjpeg-turbo pass (simplejpeg): the same pixels as Pillow's decoder (checked in
    tests/test_images.py), with damaged data refused in the same pass instead of a second, checking one (which
    cost a 12 MP photo ~40% of its decode). `scaled_to`: decode at the smallest DCT scale keeping both sides
    >= it, as Pillow's `draft` does. None when simplejpeg declines a file that is not damaged (CMYK, or a
    harmless warning such as extraneous bytes before a marker): Pillow decodes those."""
    try:
        array = simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            min_height=scaled_to or 0,
            min_width=scaled_to or 0,
            min_factor=2 if scaled_to else 1,
            strict=True,
        )
    except ValueError as exc:
        if any(sign in str(exc).lower() for sign in _DAMAGED_JPEG):
            raise ImageError(f"{name}: corrupt or truncated image data ({exc})") from None
        return None
    image = Image.fromarray(array)
    if header.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        # exif_transpose reads the orientation (EXIF, or XMP where Pillow finds it) from the image it turns.
        image.info.update({key: header.info[key] for key in ("exif", "xmp") if key in header.info})
        image = ImageOps.exif_transpose(image)
    return image


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """RGB image -> size x size, bicubic: the one resize of training, the torch engine and the torch-free one."""
    return image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def _block_average(image: Image.Image, size: int) -> Image.Image:
    """A reduced-scale decode still >= 2 x size along a side (a 12 MP photo at 1/4 scale: ~1000 x 750) averaged
    over whole n-pixel blocks along that side, so the bicubic resize that follows starts from < 2 x size (what
    Pillow's `reducing_gap=1` does): ~1.5 of ~7 ms less per 12 MP photo, pixels after the resize within ~1/255
    on average of resampling directly. Only reduced-scale decodes come here: photos decoded in full (training's,
    and any photo under 2 x size on a side) keep exactly the direct resize."""
    factors = (max(1, image.width // size), max(1, image.height // size))
    return image.reduce(factors) if factors != (1, 1) else image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha is composited on white (transparent logos stay readable)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale by the real range rather than clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 0 else 1.0
        scale = 255.0 / (65535.0 if peak > 255 else max(peak, 255.0))
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        array = (array - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(array)
        image = Image.fromarray(array.astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")
