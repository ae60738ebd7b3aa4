"""The torch-free captioner: a bundle of exported graphs (encoder, each decoder member's init/step), its
vocabulary and preprocessing, decoded by `captioner.inference.decoding`.

A bundle is a folder with `manifest.json` (written by `captioner.engine.export_bundle`; the shipped model's is
captioner/weights/onnx/) listing its graphs with their sha256, so a damaged file is refused in one line:

    captioner = load_bundle()                         # the shipped model's graphs
    result = captioner.caption("photo.jpg")           # the recommended decoding (options.RECOMMENDED)
    result.caption, result.candidates[0].alphas       # (T, L) attention maps, grid (h, w)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from ..images import DEFAULT_MAX_PIXELS, open_image, resize_square
from ..options import DecodingOptions, recommended_options
from ..vocab import Vocabulary
from .decoding import Hypothesis, generate
from .onnx_decoder import OnnxDecoder, OnnxEncoder, OnnxEnsemble

BUNDLE_FORMAT = "captioner-onnx-bundle"
BUNDLE_VERSION = 1


class BundleError(ValueError):
    """A folder that is not a usable bundle of exported graphs; the message says why."""


def shipped_bundle_path() -> Path:
    """$CAPTIONER_BUNDLE, else the shipped model's graphs inside the package (captioner/weights/onnx/)."""
    if override := os.environ.get("CAPTIONER_BUNDLE"):
        return Path(override)
    return Path(str(resources.files("captioner") / "weights" / "onnx"))


@dataclass(frozen=True)
class Preprocessing:
    """captioner.encoder.Preprocessing on numpy: square bicubic resize, [0, 1], then (x - mean) / std."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> np.ndarray:
        """PIL image -> float32 (3, S, S)."""
        resized = resize_square(image, self.image_size)
        # x * 1/(255 std) - mean/std, in place on one channel-first copy: the same numbers as (x/255 - mean)/std to
        # ~1e-7, 2.6 ms less per 448 px photo than four whole-array operations (measured on 16 coco-mini photos).
        x = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1).copy()
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        x *= np.float32(1.0) / (np.float32(255.0) * std)
        x -= np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1) / std
        return x


@dataclass
class Candidate:
    caption: str
    log_prob: float  # sum of the model's log p(word) over `words`
    words: list[str]  # generated words, END included as "<end>" (one per attention map)
    alphas: np.ndarray = field(repr=False)  # (T, L)
    betas: np.ndarray = field(repr=False)  # (T,)

    @property
    def mean_log_prob(self) -> float:
        return self.log_prob / max(len(self.words), 1)


@dataclass
class CaptionResult:
    caption: str
    candidates: list[Candidate]
    grid: tuple[int, int]  # (h, w): alphas reshape to (T, h, w)
    uncertain: bool = False

    @property
    def mean_log_prob(self) -> float:
        return self.candidates[0].mean_log_prob


class SlimCaptioner:
    """Encoder + decoder graphs + vocabulary on ONNX Runtime: the same `caption` as captioner.api.Captioner."""

    def __init__(self, folder: str | Path, threads: int | None = None, decoder_threads: int | None = 1):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        self.manifest = manifest
        self.vocab = Vocabulary(manifest["vocab"])
        self.preprocessing = Preprocessing(int(manifest["preprocessing"]["image_size"]),
                                           tuple(manifest["preprocessing"]["mean"]),
                                           tuple(manifest["preprocessing"]["std"]))
        self.grid = tuple(manifest["grid"])
        self.quantized = bool(manifest["quantized"])
        self.encoder = OnnxEncoder(self.folder / manifest["encoder"], threads)
        # One thread for the decoder by default: its per-step products are too small to share between cores
        # (10% faster than two threads on 2 cores, default decoding, 16 coco-mini photos); None: as `threads`.
        members = [OnnxDecoder(self.folder / m["init"], self.folder / m["step"], decoder_threads or threads)
                   for m in manifest["members"]]
        self.decoder = members[0] if len(members) == 1 else OnnxEnsemble(members)
        self.name = manifest.get("name", "captioner")
        self.version = manifest.get("checkpoint_sha256", "")[:12]
        self.engine = "slim"  # exported graphs on ONNX Runtime (the torch side's engines: "onnx", "torch")

    @property
    def encoder_name(self) -> str:
        return self.manifest["backbone"]

    def open(self, source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """`open_image` at no more resolution than this model uses (big JPEGs decode at reduced scale)."""
        return open_image(source, max_pixels, draft_size=self.preprocessing.image_size, square_resize_follows=True)

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB PIL images -> features (B, L, D)."""
        return self.encode_pixels(np.stack([self.preprocessing(im) for im in images]))

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed images (B, 3, S, S) float32 -> features (B, L, D)."""
        return self.encoder(pixels)

    def caption(self, images, options: DecodingOptions | None = None, **decoding):
        """One image (PIL image or path: one result) or a list of them (a list of results)."""
        if options is None:
            options = recommended_options(**decoding)
        elif decoding:
            raise TypeError("pass either options or decoding keywords, not both")
        if isinstance(images, str | os.PathLike | Image.Image):
            return self.caption([images], options)[0]
        pil = [im if isinstance(im, Image.Image) else self.open(im) for im in images]
        return self.caption_features(self.encode(pil), options) if pil else []

    def caption_features(self, features: np.ndarray, options: DecodingOptions) -> list[CaptionResult]:
        """features (B, L, D) -> one CaptionResult per image."""
        if self.quantized:
            # Dynamic int8 quantises each step's activations with one scale per tensor: rows decoded together
            # would shape each other's rounding. One image at a time keeps an image's caption its own.
            generated = [hyps for i in range(len(features))
                         for hyps in generate(self.decoder, features[i : i + 1], self.vocab, options)]
        else:
            generated = generate(self.decoder, features, self.vocab, options)
        results = []
        for hyps in generated:
            candidates = [self._candidate(h) for h in hyps]
            uncertain = options.uncertain_below is not None and candidates[0].mean_log_prob < options.uncertain_below
            results.append(CaptionResult(candidates[0].caption, candidates, self.grid, uncertain))
        return results

    def _candidate(self, hyp: Hypothesis) -> Candidate:
        return Candidate(self.vocab.decode(hyp.tokens), float(hyp.log_prob), [self.vocab.itos[t] for t in hyp.tokens],
                         hyp.alphas, hyp.betas)


def load_bundle(folder: str | Path | None = None, threads: int | None = None,
                decoder_threads: int | None = 1) -> SlimCaptioner:
    """The captioner of a bundle folder (default: the shipped model's, `shipped_bundle_path`). `threads`: ONNX
    Runtime's intra-op threads (None: one per core, or $OMP_NUM_THREADS); the decoder's are `decoder_threads`."""
    return SlimCaptioner(shipped_bundle_path() if folder is None else folder, threads, decoder_threads)


def read_manifest(folder: Path) -> dict:
    """The manifest of an intact bundle; BundleError naming the problem otherwise."""
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{folder}: no exported graphs here (no manifest.json)") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable ({exc})") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a {BUNDLE_FORMAT}")
    if manifest.get("version") != BUNDLE_VERSION:
        raise BundleError(f"{path}: a {BUNDLE_FORMAT} version {manifest.get('version')}, this captioner reads "
                          f"version {BUNDLE_VERSION}: export it again (python scripts/export_onnx_bundle.py "
                          "--checkpoint CHECKPOINT --out FOLDER)")
    for name, digest in manifest["sha256"].items():
        if not (folder / name).is_file():
            raise BundleError(f"{folder}: {name} is missing")
        if file_sha256(folder / name) != digest:
            raise BundleError(f"{folder / name}: damaged (its sha256 does not match the manifest)")
    return manifest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
