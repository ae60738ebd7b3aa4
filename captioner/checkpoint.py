"""One checkpoint file: decoder state_dict + config + vocabulary + encoder name + preprocessing.

Plain tensors, dicts, lists and numbers only, so `torch.load(weights_only=True)` reads it and no pickled
module ever has to match the code that loads it. Writes are atomic: a killed run leaves the previous file.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .encoder import Preprocessing, get_backbone
from .model import AttentionDecoder, CaptionerConfig
from .vocab import Vocabulary

FORMAT = "captioner-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a usable captioner checkpoint; the message says why."""


@dataclass
class Checkpoint:
    decoder: AttentionDecoder
    vocab: Vocabulary
    encoder_name: str
    preprocessing: Preprocessing
    encoder_state: dict[str, torch.Tensor] | None = None  # only when the encoder was fine-tuned
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] | None = None  # optimizer, scheduler, epoch, RNG: what --resume needs
    path: Path | None = None

    @property
    def config(self) -> CaptionerConfig:
        return self.decoder.config


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Save to a temporary file in the same folder, fsync, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    path: str | Path,
    decoder: AttentionDecoder,
    vocab: Vocabulary,
    encoder_name: str,
    preprocessing: Preprocessing,
    *,
    encoder_state: dict[str, torch.Tensor] | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    half: bool = False,
) -> None:
    """Write a checkpoint. `half=True` stores float weights as fp16 (for shipping; loads back as fp32)."""
    state = {k: v.detach().cpu() for k, v in decoder.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": decoder.config.to_json(),
        "model_state": state,
        "vocab": vocab.to_json(),
        "encoder": {"name": encoder_name, "preprocessing": preprocessing.to_json()},
        "metrics": metrics or {},
    }
    if encoder_state is not None:
        payload["encoder_state"] = {k: v.detach().cpu() for k, v in encoder_state.items()}
    if training is not None:
        payload["training"] = training
    atomic_torch_save(payload, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a checkpoint; every way it can be wrong raises CheckpointError with the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickled module, random bytes: all unusable the same way
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a captioner checkpoint (no '{FORMAT}' header)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {payload['format_version']} is newer than this captioner "
            f"({FORMAT_VERSION}); upgrade captioner"
        )
    try:
        config = CaptionerConfig.from_json(payload["model_config"])
        vocab = Vocabulary.from_json(payload["vocab"])
        encoder_name = payload["encoder"]["name"]
        preprocessing = Preprocessing.from_json(payload["encoder"]["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: incomplete checkpoint ({exc})") from exc
    if config.vocab_size != len(vocab):
        raise CheckpointError(
            f"{path}: vocabulary mismatch: the model predicts {config.vocab_size} words but the stored "
            f"vocabulary has {len(vocab)}"
        )
    try:
        backbone = get_backbone(encoder_name)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    if backbone.feature_dim != config.feature_dim:
        raise CheckpointError(
            f"{path}: encoder mismatch: {encoder_name} gives {backbone.feature_dim}-d features but the "
            f"decoder was built for {config.feature_dim}-d"
        )
    decoder = AttentionDecoder(config)
    try:
        decoder.load_state_dict(payload["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the stored model config: {exc}") from exc
    return Checkpoint(
        decoder=decoder,
        vocab=vocab,
        encoder_name=encoder_name,
        preprocessing=preprocessing,
        encoder_state=payload.get("encoder_state"),
        metrics=payload.get("metrics", {}),
        training=payload.get("training"),
        path=path,
    )


def average_checkpoints(paths: list[str | Path]) -> Checkpoint:
    """Checkpoint averaging: one model whose weights are the element-wise mean of these checkpoints'.

    They must share the model config, vocabulary and encoder (epochs of one run, typically). Averaging the
    weights of nearby epochs smooths out the noise of the last updates, a cheap ensemble (Vaswani et al. 2017,
    Izmailov et al. 2018). Integer buffers are taken from the first checkpoint."""
    if not paths:
        raise ValueError("nothing to average: give at least one checkpoint")
    checkpoints = [load_checkpoint(p) for p in paths]
    first = checkpoints[0]
    for other in checkpoints[1:]:
        if other.config != first.config or other.vocab != first.vocab or other.encoder_name != first.encoder_name:
            raise CheckpointError(
                f"{other.path} cannot be averaged with {first.path}: model config, vocabulary or encoder differ"
            )
        if (other.encoder_state is None) != (first.encoder_state is None):
            raise CheckpointError(f"{other.path} and {first.path}: only one has a fine-tuned encoder")
    decoder = AttentionDecoder(first.config)
    decoder.load_state_dict(_mean_state([c.decoder.state_dict() for c in checkpoints]))
    encoder_state = (_mean_state([c.encoder_state for c in checkpoints])  # type: ignore[misc]
                     if first.encoder_state is not None else None)
    return Checkpoint(decoder=decoder, vocab=first.vocab, encoder_name=first.encoder_name,
                      preprocessing=first.preprocessing, encoder_state=encoder_state,
                      metrics={"averaged": [str(c.path) for c in checkpoints]})


def _mean_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        key: (torch.stack([s[key].float() for s in states]).mean(dim=0).to(value.dtype)
              if value.is_floating_point() else value.clone())
        for key, value in states[0].items()
    }


def checkpoint_digest(path: str | Path) -> str:
    """Short content hash that names a checkpoint's version (service responses, model cards)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]
