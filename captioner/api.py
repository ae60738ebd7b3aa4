"""The Python API: `load_captioner(path).caption(images, method=...)`. No global state."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import overload

import torch
from PIL import Image

from .checkpoint import Checkpoint, CheckpointError, checkpoint_digest, load_checkpoint
from .decoding import DecodingOptions, Hypothesis, generate
from .encoder import Encoder, prepare_cpu_inference
from .engine import make_encoder_engine
from .images import DEFAULT_MAX_PIXELS, open_image
from .int8_decoder import quantize_decoder_for_cpu
from .options import recommended_options

ImageInput = Image.Image | str | os.PathLike  # one image: a PIL image, or the path of an image file


def default_checkpoint_path(environ: Mapping[str, str] | None = None) -> Path:
    """$CAPTIONER_CHECKPOINT, else the model shipped inside the package (captioner/weights/, package data: it
    travels with a wheel or a non-editable install). `environ={}` gives the shipped model whatever is set."""
    environ = os.environ if environ is None else environ
    if override := environ.get("CAPTIONER_CHECKPOINT"):
        return Path(override)
    # Installed packages live on the file system (wheels are unpacked), so the resource is a real file.
    return Path(str(resources.files(__package__) / "weights" / "captioner-default.pt"))


@dataclass
class Candidate:
    caption: str
    log_prob: float  # sum of the model's log p(word) over `words`
    words: list[str]  # generated words, END included as "<end>" (one per attention map)
    alphas: torch.Tensor = field(repr=False)  # (T, L)
    betas: torch.Tensor = field(repr=False)  # (T,)

    @property
    def mean_log_prob(self) -> float:
        """log p per word (<end> included): the model's confidence, comparable across caption lengths."""
        return self.log_prob / max(len(self.words), 1)


@dataclass
class CaptionResult:
    caption: str
    candidates: list[Candidate]
    grid: tuple[int, int]  # (h, w) of the attention maps: alphas reshape to (T, h, w)
    uncertain: bool = False  # the best caption's mean_log_prob is below DecodingOptions.uncertain_below

    @property
    def mean_log_prob(self) -> float:
        return self.candidates[0].mean_log_prob


def is_uncertain(candidate: Candidate, options: DecodingOptions) -> bool:
    """Whether a caption is below the confidence floor the caller set (none set: never)."""
    return options.uncertain_below is not None and candidate.mean_log_prob < options.uncertain_below


class Captioner:
    """Encoder + decoder + vocabulary, ready to caption PIL images or image files.

    `engine` runs the encoder ("auto": ONNX Runtime on CPU when installed, else eager torch; see
    captioner/engine.py). With the onnx engine the decoder used for generation is, unless `quantize_decoder=False`,
    an int8 copy (captioner/int8_decoder.py; within 0.01 CIDEr of fp32, docs/performance.md) that decodes one
    image at a time (`decoder_threads` can pin its thread count); `self.decoder` stays the fp32 model either way
    (perplexity, training tools)."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        encoder: Encoder,
        device: torch.device | str = "cpu",
        engine: str = "auto",
        quantize_decoder: bool | None = None,
        cache_dir: str | Path | None = None,
    ):
        self.device = torch.device(device)
        self.checkpoint = checkpoint
        self.vocab = checkpoint.vocab
        self.decoder = checkpoint.decoder.to(self.device).eval()
        self.encoder = encoder.to(self.device).eval()
        self.encoder_engine = make_encoder_engine(self.encoder, engine, cache_dir)
        self.engine = self.encoder_engine.name  # what "auto" resolved to: "onnx" or "torch"
        fast_cpu = self.engine == "onnx"
        self.quantized = fast_cpu if quantize_decoder is None else quantize_decoder
        if self.quantized and self.device.type != "cpu":
            raise ValueError("the int8 decoder runs on CPU only")
        self.step_decoder = quantize_decoder_for_cpu(self.decoder) if self.quantized else self.decoder
        # None: decode with torch's own thread count. On an idle 2-core machine the int8 decoder is faster on two
        # threads (12 against 15 ms per photo, default decoding); set 1 where many processes share the cores.
        self.decoder_threads: int | None = None
        self.grid = self.encoder_engine.grid
        self.name = checkpoint.path.stem if checkpoint.path else "captioner"
        self.version = checkpoint_digest(checkpoint.path) if checkpoint.path else "unsaved"

    @property
    def preprocessing(self):
        return self.encoder.preprocessing

    @property
    def encoder_name(self) -> str:
        return self.checkpoint.encoder_name

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> features (B, L, D)."""
        return self.encode_pixels(torch.stack([self.preprocessing(im) for im in images]))

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, S, S) -> features (B, L, D) through the engine."""
        return self.encoder_engine(pixels.to(self.device))

    def open(self, source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """`open_image` at no more resolution than this model uses (big JPEGs decode at reduced scale)."""
        return open_image(source, max_pixels, draft_size=self.preprocessing.image_size, square_resize_follows=True)

    @overload
    def caption(self, images: ImageInput, options: DecodingOptions | None = None, **decoding) -> CaptionResult: ...

    @overload
    def caption(self, images: Sequence[ImageInput], options: DecodingOptions | None = None,
                **decoding) -> list[CaptionResult]: ...

    def caption(self, images, options=None, **decoding):
        """Caption one image (a PIL image or a path: one CaptionResult) or a list of them (a list of results).
        Decoding keywords as in DecodingOptions (method=...), on top of the recommended settings
        (`options.RECOMMENDED`); pass `options` to control every field."""
        if options is None:
            options = recommended_options(**decoding)
        elif decoding:
            raise TypeError("pass either options or decoding keywords, not both")
        if isinstance(images, str | os.PathLike | Image.Image):  # one image, never a string's characters
            return self.caption([images], options)[0]
        pil = [im if isinstance(im, Image.Image) else self.open(im) for im in images]
        if not pil:
            return []
        return self.caption_features(self.encode(pil), options)

    def caption_features(self, features: torch.Tensor, options: DecodingOptions) -> list[CaptionResult]:
        """features (B, L, D) -> one CaptionResult per image."""
        results = []
        features = features.to(self.device)
        with torch.inference_mode(), self._decoding_threads():
            if self.quantized:
                # Dynamic int8 quantises each step's activations with one scale per tensor, so rows decoded
                # together would shape each other's rounding: an image's caption would depend on its batch-mates
                # (the service's micro-batches). One image at a time (its beams together) keeps it its own.
                generated = [hyps for image in features.split(1)
                             for hyps in generate(self.step_decoder, image, self.vocab, options)]
            else:
                generated = generate(self.step_decoder, features, self.vocab, options)
        for hyps in generated:
            candidates = [self._candidate(h) for h in hyps]
            results.append(CaptionResult(candidates[0].caption, candidates, self.grid,
                                         uncertain=is_uncertain(candidates[0], options)))
        return results

    @contextmanager
    def _decoding_threads(self) -> Iterator[None]:
        if self.decoder_threads is None or self.device.type != "cpu":
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(min(before, self.decoder_threads))
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _candidate(self, hyp: Hypothesis) -> Candidate:
        return Candidate(
            caption=self.vocab.decode(hyp.tokens),
            log_prob=float(hyp.log_prob),
            words=[self.vocab.itos[t] for t in hyp.tokens],
            alphas=hyp.alphas,
            betas=hyp.betas,
        )


def load_captioner(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    pretrained_encoder: bool = True,
    engine: str = "auto",
    quantize_decoder: bool | None = None,
    cache_dir: str | Path | None = None,
    grounding: float = 0.0,
    concepts: str | Path | None = None,
) -> Captioner:
    """Load a checkpoint (default: the shipped model) with its encoder. `pretrained_encoder=False` builds the
    backbone with random weights (tests); a fine-tuned encoder's weights always come from the checkpoint.

    `engine`: "auto" (ONNX Runtime on CPU when installed, else torch), "onnx" or "torch" (eager PyTorch, fp32
    throughout: the reference). `quantize_decoder`: None = int8 decoder with the onnx engine only; False keeps
    fp32. `cache_dir`: where exported encoder graphs are kept (default $CAPTIONER_CACHE_DIR or
    ~/.cache/captioner). `grounding` > 0 decodes grounded in the concept head `concepts` (default: the shipped
    one for efficientnet-lite0 at 448 px; captioner/grounding.py): object words the image does not show become
    less likely, by this strength (1: fewer invented objects for a little CIDEr, docs/training-log.md)."""
    if path is None:  # name the setting the user actually gave, never "pass --checkpoint" to one who did
        path = default_checkpoint_path()
        if os.environ.get("CAPTIONER_CHECKPOINT") and not path.exists():
            raise CheckpointError(f"CAPTIONER_CHECKPOINT {path}: no such checkpoint file")
        if not path.exists():
            raise CheckpointError(f"the shipped model {path} is missing (reinstall captioner), or pass --checkpoint")
    path = Path(path)
    checkpoint = load_checkpoint(path)
    if torch.device(device).type == "cpu":
        prepare_cpu_inference()
    encoder = Encoder(
        checkpoint.encoder_name,
        pretrained=pretrained_encoder and checkpoint.encoder_state is None,
        image_size=checkpoint.preprocessing.image_size,
    )
    if checkpoint.encoder_state is not None:
        encoder.cnn.load_state_dict(checkpoint.encoder_state)
    if encoder.preprocessing != checkpoint.preprocessing:
        raise CheckpointError(
            f"{path}: preprocessing mismatch: checkpoint expects {checkpoint.preprocessing}, "
            f"backbone {checkpoint.encoder_name} provides {encoder.preprocessing}"
        )
    captioner = Captioner(checkpoint, encoder, device, engine, quantize_decoder, cache_dir)
    if grounding:
        from .grounding import SHIPPED_CONCEPTS, grounded, load_concept_head

        head = load_concept_head(concepts or SHIPPED_CONCEPTS, encoder.name, encoder.preprocessing)
        captioner.step_decoder = grounded(captioner.step_decoder, head.to(captioner.device), captioner.vocab,
                                          grounding)
    return captioner
