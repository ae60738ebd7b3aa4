"""One checkpoint file: decoder state_dict + config + vocabulary + encoder name + preprocessing.

An ensemble file (format 2) holds a list of members, each a decoder config + state_dict, instead of one;
everything else (vocabulary, encoder, preprocessing) is shared, and `load_checkpoint` returns an
`EnsembleDecoder` for it.

Plain tensors, dicts, lists and numbers only, so `torch.load(weights_only=True)` reads it and no pickled
module ever has to match the code that loads it. Writes are atomic: a killed run leaves the previous file.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .encoder import Preprocessing, get_backbone
from .ensemble import EnsembleDecoder
from .model import AttentionDecoder, CaptionerConfig
from .vocab import Vocabulary

FORMAT = "captioner-checkpoint"
FORMAT_VERSION = 2  # 2: ensembles ("members"); single-model files are still written as 1, readable by older code


class CheckpointError(ValueError):
    """A file that is not a usable captioner checkpoint; the message says why."""


@dataclass
class Checkpoint:
    decoder: AttentionDecoder | EnsembleDecoder
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

    @property
    def is_ensemble(self) -> bool:
        return isinstance(self.decoder, EnsembleDecoder)


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file in `path`'s folder for the block to write. If the block ends without an exception, the
    file is fsynced, made readable by all (0644, not mkstemp's 0600) and renamed over `path` (atomic on POSIX);
    otherwise it is removed and `path` is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise _write_error(exc, path) from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_error(exc, path) from exc
    finally:
        tmp.unlink(missing_ok=True)


# What a full disk, a quota or a read-only folder raises: the message then names the file that was being written.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _write_error(exc: OSError, path: Path) -> OSError:
    if exc.errno not in DISK_ERRORS:
        return exc
    return OSError(exc.errno, f"cannot write {path}: {exc.strerror}; {path.name} is unchanged")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` that a killed process can never leave half-written (`atomic_path`). Serialised in memory
    first (a checkpoint is tens of MB): torch's own file writer reports a full disk as an obscure RuntimeError
    ("unexpected pos"), Python's write as ENOSPC, which `atomic_path` turns into a message naming the file."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def save_checkpoint(
    path: str | Path,
    decoder: AttentionDecoder | EnsembleDecoder,
    vocab: Vocabulary,
    encoder_name: str,
    preprocessing: Preprocessing,
    *,
    encoder_state: dict[str, torch.Tensor] | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    half: bool = False,
) -> None:
    """Write a checkpoint (one decoder, or an ensemble's members). `half=True` stores float weights as fp16
    (for shipping; they load back as fp32)."""
    payload: dict[str, Any] = {"format": FORMAT}
    if isinstance(decoder, EnsembleDecoder):
        payload["format_version"] = 2
        payload["members"] = [_decoder_payload(m, half) for m in decoder.members]
    else:
        payload["format_version"] = 1
        payload.update(_decoder_payload(decoder, half))
    payload.update({
        "vocab": vocab.to_json(),
        "encoder": {"name": encoder_name, "preprocessing": preprocessing.to_json()},
        "metrics": metrics or {},
    })
    if encoder_state is not None:
        payload["encoder_state"] = {k: v.detach().cpu() for k, v in encoder_state.items()}
    if training is not None:
        payload["training"] = training
    atomic_torch_save(payload, path)


def _decoder_payload(decoder: AttentionDecoder, half: bool) -> dict[str, Any]:
    state = {k: v.detach().cpu() for k, v in decoder.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return {"model_config": decoder.config.to_json(), "model_state": state}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a checkpoint; every way it can be wrong raises CheckpointError with the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickled objects, a truncated file, a photo: unusable, each said in one line
        # Never pass on PyTorch's advice to retry with weights_only=False: that would run the file's code.
        if isinstance(exc, pickle.UnpicklingError) and zipfile.is_zipfile(path):  # torch.save's own container
            reason = "it holds pickled Python objects, which captioner never loads: they could run code"
        else:
            reason = "not a PyTorch file, or a truncated one"
        raise CheckpointError(f"{path}: not a captioner checkpoint ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a captioner checkpoint (no '{FORMAT}' header)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {payload['format_version']} is newer than this captioner "
            f"({FORMAT_VERSION}); upgrade captioner"
        )
    try:
        vocab = Vocabulary.from_json(payload["vocab"])
        encoder_name = payload["encoder"]["name"]
        preprocessing = Preprocessing.from_json(payload["encoder"]["preprocessing"])
        members = payload["members"] if "members" in payload else [payload]
        configs = [CaptionerConfig.from_json(m["model_config"]) for m in members]
        states = [m["model_state"] for m in members]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: incomplete checkpoint ({exc})") from exc
    if not configs:
        raise CheckpointError(f"{path}: an ensemble checkpoint without members")
    try:
        backbone = get_backbone(encoder_name)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    decoders = [_build_decoder(path, config, state, len(vocab), encoder_name, backbone.feature_dim)
                for config, state in zip(configs, states, strict=True)]
    decoder = EnsembleDecoder(decoders) if "members" in payload else decoders[0]
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


def _build_decoder(
    path: Path, config: CaptionerConfig, state: dict, vocab_size: int, encoder_name: str, feature_dim: int
) -> AttentionDecoder:
    """One decoder from its stored config and weights, checked against the vocabulary and the backbone."""
    if config.vocab_size != vocab_size:
        raise CheckpointError(
            f"{path}: vocabulary mismatch: the model predicts {config.vocab_size} words but the stored "
            f"vocabulary has {vocab_size}"
        )
    if feature_dim != config.feature_dim:
        raise CheckpointError(
            f"{path}: encoder mismatch: {encoder_name} gives {feature_dim}-d features but the "
            f"decoder was built for {config.feature_dim}-d"
        )
    decoder = AttentionDecoder(config)
    try:
        decoder.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the stored model config: {exc}") from exc
    return decoder


def ensemble_checkpoints(paths: list[str | Path]) -> Checkpoint:
    """One ensemble from several checkpoints over the same backbone and vocabulary (seeds or epochs of a
    recipe; architectures may differ). Ensembles among them contribute their members."""
    if not paths:
        raise ValueError("nothing to ensemble: give at least one checkpoint")
    checkpoints = [load_checkpoint(p) for p in paths]
    first = checkpoints[0]
    for other in checkpoints[1:]:
        if other.vocab != first.vocab or other.encoder_name != first.encoder_name:
            raise CheckpointError(
                f"{other.path} cannot join an ensemble with {first.path}: vocabulary or encoder differ"
            )
        if other.preprocessing != first.preprocessing:
            raise CheckpointError(f"{other.path} and {first.path}: preprocessing differs")
    if any(c.encoder_state is not None for c in checkpoints):
        raise CheckpointError("ensembles share the frozen backbone: checkpoints with a fine-tuned encoder cannot join")
    members = [m for c in checkpoints for m in (c.decoder.members if c.is_ensemble else [c.decoder])]
    return Checkpoint(decoder=EnsembleDecoder(members), vocab=first.vocab, encoder_name=first.encoder_name,
                      preprocessing=first.preprocessing,
                      metrics={"ensemble_of": [str(c.path) for c in checkpoints]})


def average_checkpoints(paths: list[str | Path]) -> Checkpoint:
    """Checkpoint averaging: one model whose weights are the element-wise mean of these checkpoints'.

    They must share the model config, vocabulary and encoder (epochs of one run, typically). Averaging the
    weights of nearby epochs smooths out the noise of the last updates, a cheap ensemble (Vaswani et al. 2017,
    Izmailov et al. 2018). Integer buffers are taken from the first checkpoint."""
    if not paths:
        raise ValueError("nothing to average: give at least one checkpoint")
    checkpoints = [load_checkpoint(p) for p in paths]
    first = checkpoints[0]
    if any(c.is_ensemble for c in checkpoints):
        raise CheckpointError("ensembles cannot be weight-averaged: average each member's run instead")
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
