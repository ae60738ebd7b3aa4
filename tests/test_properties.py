"""Property tests (hypothesis): the image reader turns any bytes into an RGB image or an ImageError, never anything
else; and every valid decoding-options combination gives, with the shipped model on a real photo, captions that
stop and never hold PAD, START or UNK."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.api import Captioner, load_captioner
from captioner.images import ImageError, open_image
from captioner.options import DecodingOptions
from captioner.vocab import END, PAD, START, UNK

hypothesis = pytest.importorskip("hypothesis", reason="property tests need the dev extra: pip install -e '.[dev]'")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PHOTO = "val/000000000790.jpg"  # coco-mini
MAX_PIXELS = 4_000_000


def bounded(examples: int) -> settings:
    """A fixed number of examples, derandomized (same cases every run), no time deadline on busy cores."""
    return settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def read(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image | ImageError:
    """open_image's outcome; any exception other than ImageError fails the test that calls this."""
    try:
        image = open_image(data, max_pixels)
    except ImageError as exc:
        assert str(exc) and exc.kind in ("not_image", "corrupt", "too_large"), exc
        return exc
    assert image.mode == "RGB" and image.width * image.height > 0
    return image


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


@pytest.fixture(scope="module")
def real_files(coco_mini) -> dict[str, bytes]:
    """The real COCO photo as its own JPEG, and re-encoded as PNG and HEIC (pillow-heif)."""
    jpeg = (coco_mini / PHOTO).read_bytes()
    photo = Image.open(io.BytesIO(jpeg)).convert("RGB")
    small = photo.resize((photo.width // 2, photo.height // 2))  # HEIC encoding is slow; half size is enough
    return {"jpeg": jpeg, "png": encoded(photo, "PNG"), "heic": encoded(small, "HEIF", quality=60)}


@bounded(150)
@given(st.binary(max_size=4096))
def test_random_bytes_are_an_image_or_one_image_error(data):
    read(data)


@pytest.mark.parametrize("kind", ["jpeg", "png", "heic"])
def test_truncated_and_corrupted_real_files(real_files, kind):
    original = real_files[kind]
    size = read(original).size

    @bounded(40)
    @given(cut=st.integers(0, len(original) - 1),
           flips=st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(1, 255)), max_size=8))
    def check(cut: int, flips: list[tuple[int, int]]) -> None:
        damaged = bytearray(original)
        for position, mask in flips:
            damaged[position] ^= mask
        for data in (original[:cut], bytes(damaged)):
            outcome = read(data)
            if isinstance(outcome, Image.Image) and data == original[:cut]:
                assert outcome.size == size  # a truncated file that still decodes is the whole picture

    check()
    assert isinstance(read(original[: len(original) // 2]), ImageError)  # half a file is never a picture


MODES: dict[str, Callable[[int, int, np.random.Generator], Image.Image]] = {
    "1": lambda w, h, r: Image.fromarray(r.integers(0, 2, (h, w), dtype=np.uint8).astype(bool)),
    "L": lambda w, h, r: Image.fromarray(r.integers(0, 256, (h, w), dtype=np.uint8), "L"),
    "P": lambda w, h, r: Image.fromarray(r.integers(0, 256, (h, w, 3), dtype=np.uint8)).quantize(16),
    "RGBA": lambda w, h, r: Image.fromarray(r.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA"),
    "LA": lambda w, h, r: Image.fromarray(r.integers(0, 256, (h, w, 2), dtype=np.uint8), "LA"),
    "CMYK": lambda w, h, r: Image.fromarray(r.integers(0, 256, (h, w, 4), dtype=np.uint8), "CMYK"),
    "I;16": lambda w, h, r: Image.fromarray(r.integers(0, 65536, (h, w), dtype=np.uint16), "I;16"),
    "I": lambda w, h, r: Image.fromarray(r.integers(-2**20, 2**20, (h, w), dtype=np.int32), "I"),
    "F": lambda w, h, r: Image.fromarray(r.normal(0, 1e6, (h, w)).astype(np.float32), "F"),
}
FORMATS = {"PNG": ("1", "L", "P", "RGBA", "LA", "I;16"), "TIFF": tuple(MODES), "JPEG": ("L", "CMYK"),
           "WEBP": ("RGBA",), "GIF": ("L", "P"), "BMP": ("1", "L", "P")}


@bounded(60)
@given(fmt_mode=st.sampled_from([(fmt, mode) for fmt, modes in FORMATS.items() for mode in modes]),
       width=st.integers(1, 4000), height=st.integers(1, 4000), seed=st.integers(0, 2**16))
def test_extreme_sizes_and_modes_become_rgb_or_are_refused_by_size(fmt_mode, width, height, seed):
    fmt, mode = fmt_mode
    if width * height > 600_000:  # a 4000 x 1 strip is fine; a big square only costs time to encode
        width, height = width, max(1, 600_000 // width)
    data = encoded(MODES[mode](width, height, np.random.default_rng(seed)), fmt)
    image = read(data)
    assert isinstance(image, Image.Image) and image.size == (width, height), (mode, fmt, image)
    refused = read(data, max_pixels=width * height - 1) if width * height > 1 else None
    assert refused is None or (isinstance(refused, ImageError) and refused.kind == "too_large")


# --------------------------------------------------------------------------------------------------------------
# Decoding options, with the shipped model on one real photo's features (encoded once).


@pytest.fixture(scope="module")
def shipped(shipped_checkpoint) -> Captioner:
    return load_captioner(shipped_checkpoint)


@pytest.fixture(scope="module")
def features(shipped, coco_mini) -> torch.Tensor:
    return shipped.encode([shipped.open(coco_mini / PHOTO)])  # (1, L, D)


# allow_subnormal=False: a model loaded earlier in the session (captioner.api.load_captioner ->
# prepare_cpu_inference) turns on flush-to-zero for pytest's thread, and hypothesis refuses to draw subnormal
# floats it cannot represent (tests/test_fuzz_service.py's `ieee_floats` turns it off instead).
@st.composite
def valid_options(draw) -> DecodingOptions:
    method = draw(st.sampled_from(["greedy", "sample", "beam"]))
    values = dict(
        method=method,
        max_length=draw(st.integers(1, 50)),
        beam_size=draw(st.integers(1, 10)),
        length_penalty=draw(st.floats(0, 5, allow_subnormal=False)),
        no_repeat_ngram_size=draw(st.integers(0, 10)),
        temperature=draw(st.sampled_from([0.0, 5.0]) | st.floats(0, 5, allow_subnormal=False)),
        top_k=draw(st.sampled_from([0, 1]) | st.integers(0, 1000)),
        top_p=draw(st.sampled_from([1.0]) | st.floats(1e-6, 1, allow_subnormal=False)),
        num_captions=draw(st.integers(1, 10)),
        seed=draw(st.none() | st.integers(0, 2**63 - 1)),
        uncertain_below=draw(st.none() | st.floats(-20, 0, allow_subnormal=False)),
    )
    try:
        return DecodingOptions(**values)
    except ValueError:  # an invalid combination (more captions than beams, several greedy captions)
        assume(False)


@bounded(60)
@given(options=valid_options())
def test_every_valid_decoding_combination_stops_without_special_words(shipped, features, options):
    result = shipped.caption_features(features, options)[0]
    assert 1 <= len(result.candidates) <= options.num_captions
    if options.method == "sample" and not options.one_caption:
        assert len(result.candidates) == options.num_captions
    for candidate in result.candidates:
        assert candidate.words and candidate.words[-1] == END, candidate.words  # it stopped
        assert len(candidate.words) <= options.max_length + 1  # within max_length words (+ END)
        assert not {PAD, START, UNK, END} & set(candidate.words[:-1]), candidate.words
        assert candidate.caption == " ".join(candidate.words[:-1])
        assert np.isfinite(candidate.log_prob) and candidate.log_prob <= 0
