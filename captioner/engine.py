"""Inference engines for the frozen encoder: eager PyTorch, or the same weights exported to ONNX Runtime on CPU.

The torch `Encoder` stays the source of truth. The ONNX graph is exported from it (opset 17, dynamic batch),
checked against it on a probe batch (the max abs difference is printed; above `tolerance` the graph is refused),
and cached on disk under a key that changes when the backbone, the input size or any weight changes, so a
fine-tuned encoder gets its own graph. Nothing is downloaded. A cached graph that is missing, truncated or
altered (its sidecar holds its sha256) is exported again, never fatal.

    engine = make_encoder_engine(encoder, "auto")   # "auto" | "onnx" | "torch"
    features = engine(images)                       # images (B, 3, S, S) preprocessed -> (B, L, D)

"auto" is ONNX Runtime on CPU when `onnxruntime` is importable (and the export passes its check), torch
otherwise and on other devices. On the shared 2-core machines this repo is developed on, Lite0 at 448 px runs
in ~0.3x the time of eager PyTorch (benchmarks/caption_latency.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .checkpoint import atomic_path
from .encoder import Encoder

log = logging.getLogger(__name__)

EngineName = Literal["auto", "onnx", "torch"]
ENGINES: tuple[str, ...] = ("auto", "onnx", "torch")
OPSET = 17
EXPORT_VERSION = 1  # bump when the way graphs are exported changes: old cache entries are then ignored
DEFAULT_TOLERANCE = 1e-3  # max abs difference to torch, relative to the largest feature of the probe batch


class EngineError(RuntimeError):
    """The requested engine cannot be used (not installed, export failed its check, ...)."""


def default_cache_dir() -> Path:
    """$CAPTIONER_CACHE_DIR, else $XDG_CACHE_HOME/captioner (~/.cache/captioner)."""
    if os.environ.get("CAPTIONER_CACHE_DIR"):
        return Path(os.environ["CAPTIONER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "captioner"


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def resolve_engine(engine: str, device: torch.device | str = "cpu") -> str:
    """"auto" -> "onnx" on CPU when onnxruntime is importable, else "torch"; the others are checked and kept."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    cpu = torch.device(device).type == "cpu"
    if engine == "auto":
        return "onnx" if cpu and onnxruntime_available() else "torch"
    if engine == "onnx":
        if not cpu:
            raise EngineError(f"the onnx engine runs on CPU only, not on {device}: use engine='torch' there")
        if not onnxruntime_available():
            raise EngineError("the onnx engine needs onnxruntime: pip install onnxruntime (or use engine='torch')")
    return engine


# --------------------------------------------------------------------------------------------------------------
# Engines: callables images (B, 3, S, S) -> features (B, L, D), both on the encoder's device.


class TorchEncoderEngine:
    """Eager PyTorch: `Encoder.encode` (one image per CNN pass on CPU, where batching does not pay)."""

    name = "torch"

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.grid = encoder.grid_size()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(images)


class OnnxEncoderEngine:
    """ONNX Runtime session over the exported encoder graph (CPU)."""

    name = "onnx"

    def __init__(self, path: Path, grid: tuple[int, int], threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()  # the same budget as torch's
        options.inter_op_num_threads = 1
        # Spinning worker threads steal the cores the decoder (torch) needs right after each encoder pass, and
        # other processes' on a shared machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.grid = grid
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name

    # Images per session run. Unlike eager torch (whose big activations are page-faulted in afresh every pass),
    # ONNX Runtime keeps its own memory arena: on an idle 2-core machine one run over 16 images takes 0.73-0.79x
    # the time of 16 single runs (benchmarks/caption_latency.py; 1.19x on a saturated machine at one thread). The
    # service still passes one image at a time on CPU (service/batching.py says why).
    max_batch = 16

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.detach().to("cpu", torch.float32).contiguous().numpy()
        chunks = [self.session.run(None, {self._input: pixels[i : i + self.max_batch]})[0]
                  for i in range(0, len(pixels), self.max_batch)]
        return torch.from_numpy(np.concatenate(chunks) if len(chunks) > 1 else chunks[0])


def make_encoder_engine(
    encoder: Encoder,
    engine: str = "auto",
    cache_dir: str | Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> TorchEncoderEngine | OnnxEncoderEngine:
    """The engine that runs `encoder` for inference. "onnx" raises EngineError when it cannot be used; "auto" then
    falls back to torch with a warning."""
    device = next(encoder.parameters()).device
    resolved = resolve_engine(engine, device)
    if resolved == "torch":
        return TorchEncoderEngine(encoder)
    try:
        return load_onnx_encoder(encoder, cache_dir, tolerance)
    except EngineError as exc:
        if engine == "onnx":
            raise
        log.warning("onnx engine unavailable, using torch: %s", exc)
        print(f"captioner: onnx engine unavailable, using torch ({exc})", file=sys.stderr)
        return TorchEncoderEngine(encoder)


# --------------------------------------------------------------------------------------------------------------
# The on-disk cache of exported graphs.


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, dtypes, values): any changed weight changes it."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def graph_key(encoder: Encoder) -> str:
    """Cache key: backbone name, input size, weights, opset and export version."""
    fields = [encoder.name, encoder.preprocessing.image_size, weights_digest(encoder.cnn), OPSET, EXPORT_VERSION]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:20]


@dataclass
class GraphFiles:
    graph: Path  # the .onnx file
    sidecar: Path  # .json: sha256 of the graph, grid, the export check's result

    @classmethod
    def for_encoder(cls, encoder: Encoder, cache_dir: str | Path | None = None) -> GraphFiles:
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        stem = f"{encoder.name}-{encoder.preprocessing.image_size}px-{graph_key(encoder)}"
        return cls(folder / f"{stem}.onnx", folder / f"{stem}.json")


def load_onnx_encoder(
    encoder: Encoder, cache_dir: str | Path | None = None, tolerance: float = DEFAULT_TOLERANCE
) -> OnnxEncoderEngine:
    """The cached graph of this encoder if it is intact, else a fresh export (checked, then cached)."""
    if not onnxruntime_available():
        raise EngineError("onnxruntime is not installed")
    files = GraphFiles.for_encoder(encoder, cache_dir)
    meta = _intact_sidecar(files)
    if meta is not None:
        try:
            return OnnxEncoderEngine(files.graph, tuple(meta["grid"]))
        except Exception as exc:  # unreadable by this onnxruntime: export again
            log.warning("cached encoder graph %s unusable (%s): exporting again", files.graph, exc)
    meta = export_encoder(encoder, files, tolerance)
    return OnnxEncoderEngine(files.graph, tuple(meta["grid"]))


def _intact_sidecar(files: GraphFiles) -> dict | None:
    """The sidecar of a complete, unaltered cache entry, else None (and the reason is logged)."""
    if not files.graph.is_file() or not files.sidecar.is_file():
        return None
    try:
        meta = json.loads(files.sidecar.read_text())
        if meta["sha256"] == _file_sha256(files.graph):
            return meta
        reason = "its content does not match its recorded sha256"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = f"unreadable sidecar ({exc})"
    log.warning("cached encoder graph %s is corrupt (%s): exporting again", files.graph, reason)
    print(f"captioner: cached encoder graph {files.graph.name} is corrupt ({reason}): exporting again",
          file=sys.stderr)
    return None


def export_encoder(encoder: Encoder, files: GraphFiles, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Export `encoder` to ONNX, check it against torch on a probe batch, then move it into the cache atomically.
    Returns the sidecar's content. Raises EngineError when the export fails or differs beyond `tolerance`."""

    encoder = encoder.eval()
    size = encoder.preprocessing.image_size
    generator = torch.Generator().manual_seed(0)
    # A probe batch of two (so the dynamic batch axis is exercised) in the normalised range real photos have.
    probe = encoder.preprocessing.normalize(torch.rand(2, 3, size, size, generator=generator))
    with atomic_path(files.graph, suffix=".onnx.tmp") as tmp:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's shape-inference chatter
                torch.onnx.export(
                    encoder, (probe[:1],), str(tmp), opset_version=OPSET, dynamo=False,
                    input_names=["images"], output_names=["features"],
                    dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
                )
        except Exception as exc:  # e.g. the `onnx` package missing, an operator without an ONNX equivalent
            raise EngineError(f"exporting {encoder.name} to ONNX failed: {type(exc).__name__}: {exc}") from exc
        # Checked through the session inference will use (same options), in one pass of two images so that the
        # dynamic batch axis is exercised.
        engine = OnnxEncoderEngine(tmp, encoder.grid_size())
        engine.max_batch = len(probe)
        got = engine(probe)
        with torch.no_grad():
            expected = encoder(probe)
        diff = float((got - expected).abs().max())
        scale = max(1.0, float(expected.abs().max()))
        print(f"captioner: exported {encoder.name} at {size} px to ONNX: max abs difference to torch {diff:.2e} "
              f"(tolerance {tolerance * scale:.1e})", file=sys.stderr)
        if not np.isfinite(diff) or diff > tolerance * scale:
            raise EngineError(f"the ONNX graph of {encoder.name} differs from torch by {diff:.2e} "
                              f"(> {tolerance * scale:.1e}): refused")
        del engine
        meta = {
            "sha256": _file_sha256(tmp),
            "backbone": encoder.name,
            "image_size": size,
            "grid": list(encoder.grid_size()),
            "feature_dim": encoder.feature_dim,
            "opset": OPSET,
            "max_abs_diff": diff,
            "torch": torch.__version__,
        }
    with atomic_path(files.sidecar) as tmp:  # last: its presence completes the entry
        tmp.write_text(json.dumps(meta, indent=1))
    return meta


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
