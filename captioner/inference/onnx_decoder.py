"""ONNX Runtime sessions: the encoder graph and each decoder member's `init_state` / `step` graphs, on numpy.

The graphs are exported from the torch model by `captioner.engine` (checked against torch there); this module
only runs them. Inputs and outputs (B images, N = B * K rows):

    encoder:  images (B, 3, S, S)                                  -> features (B, L, D)
    init:     features (B, L, D)                                   -> h, c (B, layers, H), projected (B, L, A)
    step:     h, c, features, projected, location (N,), tokens (N,) -> logits (N, V), alpha (N, L), h, c,
                                                                        beta (N, 1), location (N,)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .decoding import log_softmax


def session(path: str | Path, threads: int | None = None):
    """A CPU InferenceSession with the options the torch install's encoder engine uses."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    options.inter_op_num_threads = 1
    # Spinning worker threads steal the cores the next session needs, and other processes' on a shared machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """images (B, 3, S, S) float32, preprocessed -> features (B, L, D), a few images per run."""

    max_batch = 16  # see captioner/engine.py OnnxEncoderEngine.max_batch

    def __init__(self, path: str | Path, threads: int | None = None):
        self.session = session(path, threads)
        self._input = self.session.get_inputs()[0].name

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        chunks = [self.session.run(None, {self._input: pixels[i : i + self.max_batch]})[0]
                  for i in range(0, len(pixels), self.max_batch)]
        return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]


@dataclass
class ArrayState:
    """DecoderState (captioner/model.py) on numpy arrays, batch-first."""

    h: np.ndarray  # (N, layers, H)
    c: np.ndarray  # (N, layers, H)
    features: np.ndarray  # (N, L, D)
    projected_features: np.ndarray  # (N, L, A)
    beta: np.ndarray  # (N, 1)
    location: np.ndarray  # (N,) int64, -1: the expected context

    def select(self, index: np.ndarray, same_image: bool = False) -> ArrayState:
        """Rows `index` (N,); `same_image=True` (beam reordering within an image) keeps the feature arrays."""
        if same_image:
            return ArrayState(self.h[index], self.c[index], self.features, self.projected_features,
                              self.beta[index], self.location[index])
        return ArrayState(*(getattr(self, f.name)[index] for f in fields(self)))


class OnnxDecoder:
    """One decoder's `init_state` / `step` over its two exported graphs."""

    def __init__(self, init_path: str | Path, step_path: str | Path, threads: int | None = None):
        self.init_session = session(init_path, threads)
        self.step_session = session(step_path, threads)

    def init_state(self, features: np.ndarray) -> ArrayState:
        features = np.ascontiguousarray(features, dtype=np.float32)
        h, c, projected = self.init_session.run(None, {"features": features})
        b = len(features)
        return ArrayState(h, c, features, projected, np.ones((b, 1), np.float32), np.full(b, -1, np.int64))

    def step(self, state: ArrayState, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, ArrayState]:
        logits, alpha, h, c, beta, location = self.step_session.run(None, {
            "h": state.h, "c": state.c, "features": state.features, "projected": state.projected_features,
            "location": state.location, "tokens": np.asarray(tokens, dtype=np.int64),
        })
        return logits, alpha, ArrayState(h, c, state.features, state.projected_features, beta, location)


@dataclass
class EnsembleArrayState:
    members: list[ArrayState]

    @property
    def beta(self) -> np.ndarray:
        return np.mean([s.beta for s in self.members], axis=0)

    def select(self, index: np.ndarray, same_image: bool = False) -> EnsembleArrayState:
        return EnsembleArrayState([s.select(index, same_image) for s in self.members])


class OnnxEnsemble:
    """Members decoded as one model, as captioner/ensemble.py: mean log-probabilities, mean alpha and beta."""

    def __init__(self, members: list[OnnxDecoder]):
        self.members = members

    def init_state(self, features: np.ndarray) -> EnsembleArrayState:
        return EnsembleArrayState([m.init_state(features) for m in self.members])

    def step(self, state: EnsembleArrayState, tokens: np.ndarray):
        outputs = [m.step(s, tokens) for m, s in zip(self.members, state.members, strict=True)]
        log_probs = np.mean([log_softmax(logits) for logits, _, _ in outputs], axis=0)
        alpha = np.mean([a for _, a, _ in outputs], axis=0)
        return log_probs, alpha, EnsembleArrayState([s for _, _, s in outputs])
