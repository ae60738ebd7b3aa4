"""Service settings, read from `CAPTIONER_*` environment variables (or passed to `create_app`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from captioner.options import DecodingOptions, decoding_fields

from .schemas import decoding_model

# Decoding defaults, used for every parameter a request leaves out: captioner's recommended ones (chosen on val),
# with the same bounds and limits as the request parameters. No server-wide seed: every sample would be the same.
DecodingDefaults = decoding_model(
    "DecodingDefaults", "The server's decoding defaults (CAPTIONER_METHOD, CAPTIONER_BEAM_SIZE, ...).",
    defaults={spec.name: spec.recommended for spec in decoding_fields()}, exclude=("seed",),
)


class Settings(BaseSettings, DecodingDefaults):
    """Every field is also an environment variable: `max_batch` <- `CAPTIONER_MAX_BATCH`, and so on (the decoding
    defaults, `method` <- `CAPTIONER_METHOD` ..., come from DecodingOptions through `DecodingDefaults`)."""

    model_config = SettingsConfigDict(env_prefix="CAPTIONER_", extra="ignore")

    # Model.
    # engine (service/model.py): slim = the exported graphs on ONNX Runtime, no PyTorch; onnx = the torch side's
    # ONNX Runtime encoder + int8 decoder; torch = eager fp32 throughout. auto: onnx when PyTorch is installed or
    # a checkpoint is given, else slim (the torch-free install).
    engine: Literal["auto", "slim", "onnx", "torch"] = "auto"
    checkpoint: Path | None = None  # torch side; None: captioner.api.default_checkpoint_path() (the shipped model)
    bundle: Path | None = None  # slim; None: captioner.inference.shipped_bundle_path() (the shipped model's graphs)
    device: str = "cpu"
    pretrained_encoder: bool = True  # False only for tests that build a backbone without its weights
    threads: int | None = Field(None, ge=1)  # intra-op threads of torch or ONNX Runtime; None: one per core

    # Input limits: refused before they cost memory or CPU.
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1)  # whole request body, multipart framing included
    max_pixels: int = Field(40_000_000, ge=1)  # width * height, checked from the header before decoding
    upload_timeout_s: float = Field(30.0, gt=0)  # a client that trickles its body is cut off (408)
    # After an early answer (413, 401, ...), the unread rest of the body is read and discarded, never kept, up to
    # these bounds, so that clients that send everything before reading (urllib) see the answer (service/draining.py).
    drain_max_bytes: int = Field(128 * 1024 * 1024, ge=0)
    drain_timeout_s: float = Field(30.0, ge=0)

    # Access: with keys set, /v1/* needs `Authorization: Bearer KEY` or `X-API-Key: KEY` (service/auth.py); the
    # health probes, the web page and its static files stay open. CAPTIONER_API_KEYS="key1,key2". Empty: open.
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field((), repr=False)

    # Micro-batching: collect up to max_batch requests, waiting at most max_wait_ms after the first.
    max_batch: int = Field(8, ge=1, le=256)  # 1: no batching, one request through the model at a time
    max_wait_ms: float = Field(10.0, ge=0, le=10_000)
    # Requests waiting for the model; beyond that: 503 + Retry-After, so overload is refused at once instead of
    # growing everyone's latency: 64 is ~3 s of work for the shipped model on 2 CPU cores (~20 captions/s).
    max_queue: int = Field(64, ge=1)
    # Images per CNN pass within a batch. None: 1 on CPU (measured faster in the service, see service/batching.py),
    # the whole batch on other devices. The decoder always runs the whole batch.
    encoder_batch: int | None = Field(None, ge=1, le=256)
    request_timeout_s: float = Field(120.0, gt=0)  # waiting for the model longer than this: 503

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, value: object) -> object:
        """A comma-separated string (the environment variable) or a list; blanks around keys are dropped."""
        keys = value.split(",") if isinstance(value, str) else value
        return tuple(k.strip() for k in keys if k.strip()) if isinstance(keys, list | tuple) else keys

    def resolved_encoder_batch(self) -> int:
        if self.encoder_batch is not None:
            return self.encoder_batch
        return 1 if self.device.split(":")[0] == "cpu" else self.max_batch

    def default_decoding(self) -> DecodingOptions:
        return DecodingOptions(**{name: getattr(self, name) for name in DecodingDefaults.model_fields})
