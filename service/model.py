"""The model the service runs, whichever engine loaded it: `load_model(settings)` and what routes may use of it.

Two engines give the same `CaptionModel`:
- "slim": the shipped model's exported graphs on ONNX Runtime (captioner.inference.load_bundle), no PyTorch; what
  `auto` picks in the torch-free install (`pip install .`, the Dockerfile's).
- the torch side (captioner.api.load_captioner): any checkpoint, any device; "onnx" is its ONNX Runtime encoder +
  int8 decoder, "torch" eager PyTorch. `auto` picks it when PyTorch is installed, or when a checkpoint is given.

Nothing in the service imports torch itself: in the torch-free install this module is the only way in, and it
never takes the torch branch there (tests/test_inference_slim.py serves a photo with torch blocked).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from PIL import Image

from captioner.inference import CaptionResult
from captioner.options import DecodingOptions

from .settings import Settings

TORCH_INSTALL = 'pip install "captioner[train]"'


class ModelLoadError(RuntimeError):
    """The settings ask for a model this install cannot load; the message says what to change."""


class CaptionModel(Protocol):
    """What the service uses of a captioner (captioner.api.Captioner and captioner.inference.SlimCaptioner both)."""

    name: str
    version: str  # the checkpoint's sha256 prefix
    engine: str  # "slim" (exported graphs), "onnx" or "torch"

    @property
    def encoder_name(self) -> str: ...

    @property
    def preprocessing(self) -> Callable[[Image.Image], Any]: ...  # PIL image -> pixels (3, S, S)

    def open(self, source: bytes, max_pixels: int) -> Image.Image: ...

    def encode_pixels(self, pixels: Any) -> Any: ...  # (B, 3, S, S) -> features (B, L, D)

    def caption_features(self, features: Any, options: DecodingOptions) -> Sequence[CaptionResult]: ...


def load_model(settings: Settings) -> CaptionModel:
    """The model the settings name; ModelLoadError if this install cannot run it."""
    if serving_engine(settings) == "slim":
        return _load_slim(settings)
    return _load_torch_side(settings)


def serving_engine(settings: Settings) -> str:
    """What `auto` means here: "slim" or the torch side's engine ("auto", "onnx", "torch"). ModelLoadError, in one
    line, for settings this install cannot serve (`captioner serve` checks before it starts the server)."""
    if settings.engine == "slim" or (settings.engine == "auto" and settings.checkpoint is None
                                     and not _torch_installed()):
        if settings.checkpoint is not None:
            raise ModelLoadError(f"the slim engine serves exported graphs (CAPTIONER_BUNDLE), not the checkpoint "
                                 f"{settings.checkpoint}: export them with scripts/export_onnx_bundle.py, or use "
                                 "another engine")
        if settings.device.split(":")[0] != "cpu":
            raise ModelLoadError(f"the slim engine runs on the CPU, not {settings.device}")
        return "slim"
    if not _torch_installed():
        wanted = f"engine {settings.engine}" if settings.engine != "auto" else f"the checkpoint {settings.checkpoint}"
        raise ModelLoadError(f"{wanted} needs PyTorch, which this install leaves out: {TORCH_INSTALL} (or serve the "
                             "shipped model's exported graphs: leave CAPTIONER_CHECKPOINT unset)")
    return settings.engine


def _load_slim(settings: Settings) -> CaptionModel:
    from captioner.inference import BundleError, load_bundle

    try:
        return load_bundle(settings.bundle, threads=settings.threads)
    except BundleError as exc:
        raise ModelLoadError(str(exc)) from None


def _load_torch_side(settings: Settings) -> CaptionModel:
    import torch

    from captioner.api import load_captioner

    if settings.threads:
        torch.set_num_threads(settings.threads)
    return load_captioner(settings.checkpoint, settings.device, settings.pretrained_encoder, settings.engine)


def _torch_installed() -> bool:
    try:  # the torch side imports it anyway, so trying costs nothing there; without torch it fails at once
        import torch  # noqa: F401
    except ImportError:
        return False
    return True
