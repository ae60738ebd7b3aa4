"""The Python API: `load_captioner(path).caption(images, method=...)`. No global state."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from .checkpoint import Checkpoint, CheckpointError, checkpoint_digest, load_checkpoint
from .decoding import DecodingOptions, Hypothesis, generate
from .encoder import Encoder, prepare_cpu_inference
from .images import DEFAULT_MAX_PIXELS, open_image
from .options import recommended_options


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
    log_prob: float
    words: list[str]  # generated words, END included as "<end>" (one per attention map)
    alphas: torch.Tensor = field(repr=False)  # (T, L)
    betas: torch.Tensor = field(repr=False)  # (T,)


@dataclass
class CaptionResult:
    caption: str
    candidates: list[Candidate]
    grid: tuple[int, int]  # (h, w) of the attention maps: alphas reshape to (T, h, w)


class Captioner:
    """Encoder + decoder + vocabulary, ready to caption PIL images or image files."""

    def __init__(self, checkpoint: Checkpoint, encoder: Encoder, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.checkpoint = checkpoint
        self.vocab = checkpoint.vocab
        self.decoder = checkpoint.decoder.to(self.device).eval()
        self.encoder = encoder.to(self.device).eval()
        self.grid = self.encoder.grid_size()
        self.name = checkpoint.path.stem if checkpoint.path else "captioner"
        self.version = checkpoint_digest(checkpoint.path) if checkpoint.path else "unsaved"

    @property
    def preprocessing(self):
        return self.encoder.preprocessing

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> features (B, L, D)."""
        batch = torch.stack([self.preprocessing(im) for im in images]).to(self.device)
        return self.encoder.encode(batch)

    def caption(
        self,
        images: Sequence[Image.Image | str | Path],
        options: DecodingOptions | None = None,
        **decoding,
    ) -> list[CaptionResult]:
        """Caption images (PIL images or paths). Decoding keywords as in DecodingOptions (method=...), on top of
        the recommended settings (`decoding.RECOMMENDED`); pass `options` to control every field."""
        if options is None:
            options = recommended_options(**decoding)
        elif decoding:
            raise TypeError("pass either options or decoding keywords, not both")
        pil = [im if isinstance(im, Image.Image) else open_image(im, DEFAULT_MAX_PIXELS) for im in images]
        if not pil:
            return []
        return self.caption_features(self.encode(pil), options)

    def caption_features(self, features: torch.Tensor, options: DecodingOptions) -> list[CaptionResult]:
        """features (B, L, D) -> one CaptionResult per image."""
        results = []
        for hyps in generate(self.decoder, features, self.vocab, options):
            candidates = [self._candidate(h) for h in hyps]
            results.append(CaptionResult(candidates[0].caption, candidates, self.grid))
        return results

    def _candidate(self, hyp: Hypothesis) -> Candidate:
        return Candidate(
            caption=self.vocab.decode(hyp.tokens),
            log_prob=float(hyp.log_prob),
            words=[self.vocab.itos[t] for t in hyp.tokens],
            alphas=hyp.alphas,
            betas=hyp.betas,
        )


def load_captioner(
    path: str | Path | None = None, device: str | torch.device = "cpu", pretrained_encoder: bool = True
) -> Captioner:
    """Load a checkpoint (default: the shipped model) with its encoder. `pretrained_encoder=False` builds the
    backbone with random weights (tests); a fine-tuned encoder's weights always come from the checkpoint."""
    path = Path(path) if path is not None else default_checkpoint_path()
    if not path.exists() and path == default_checkpoint_path():
        raise CheckpointError(
            f"no checkpoint given and the default model {path} is missing: pass --checkpoint "
            "or set CAPTIONER_CHECKPOINT"
        )
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
    return Captioner(checkpoint, encoder, device)
