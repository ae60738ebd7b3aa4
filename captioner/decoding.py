"""Caption generation for torch decoders: the numpy decoding loop (`captioner.inference.decoding`) driving a torch
`init_state` / `step` through a small adapter, `NumpySteps`.

Decoding (greedy, sampling, beam search, blocking) is written once, on numpy arrays, and serves both engines: the
torch decoders (training, evaluation, SCST, `--engine torch`, the int8 torch decoder) through `NumpySteps`, which
converts at the step boundary, and the ONNX Runtime decoder of the torch-free install natively. Every method:
- never emits PAD, START or UNK, and never ends a caption before its first word;
- stops a caption at END, and at `max_length` words by forcing END on the step after (so every caption
  ends with END, none is empty, and beam search always has finished hypotheses to return);
- returns the attention map (T, L) and gate beta (T,) of every generated token, END included.

One rule for every method: blocked words (PAD/START/UNK, END too early, repeated n-grams) are masked out of the
choice (`choice_logits`), and a caption's `log_prob` is the model's own log-probability of its words (log-softmax
over the whole vocabulary), so the same caption gets the same number from greedy, sampling and beam search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from .inference import decoding as array_decoding
from .inference.decoding import _banned_ngram_tokens  # noqa: F401 (tests read the n-gram rule from here too)
from .model import DecoderState
from .options import RECOMMENDED, DecodingOptions, Method  # noqa: F401 (defined in options.py, used from here too)
from .vocab import Vocabulary

END_ID = Vocabulary.end_id


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids: START excluded, END included
    log_prob: float  # sum of the model's own log p(token) (log-softmax over the whole vocabulary, temperature 1)
    score: float  # what the method ranked by: log_prob for greedy/sampling, / len**length_penalty for beam search
    alphas: torch.Tensor = field(repr=False)  # (T, L)
    betas: torch.Tensor = field(repr=False)  # (T,)
    truncated: bool = False  # END was forced at max_length


class StepDecoder(Protocol):
    """What decoding needs of a torch model: a single decoder, an ensemble (`captioner.ensemble`), the int8 one."""

    def init_state(self, features: torch.Tensor) -> DecoderState: ...

    def step(self, state, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, DecoderState]: ...


class TorchRows:
    """A torch decoder state seen by the numpy loop: rows selected by numpy indices, beta (N, 1) as numpy."""

    def __init__(self, state, device: torch.device):
        self.state, self.device = state, device

    @property
    def beta(self) -> np.ndarray:
        return _numpy(self.state.beta)

    def select(self, index: np.ndarray, same_image: bool = False) -> TorchRows:
        rows = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64)).to(self.device)
        return TorchRows(self.state.select(rows, same_image=same_image), self.device)


class NumpySteps:
    """A torch StepDecoder behind the numpy `init_state` / `step` contract: arrays in and out, the model and its
    state on `device`."""

    def __init__(self, decoder: StepDecoder, features: torch.Tensor):
        self.decoder, self.features, self.device = decoder, features, features.device

    def init_state(self, features: np.ndarray) -> TorchRows:
        # The caller's own tensor (same values): no copy back to the device, and its dtype is kept.
        return TorchRows(self.decoder.init_state(self.features), self.device)

    def step(self, state: TorchRows, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, TorchRows]:
        logits, alpha, new_state = self.decoder.step(state.state, torch.from_numpy(tokens).to(self.device))
        return _numpy(logits), _numpy(alpha), TorchRows(new_state, self.device)


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def generate(
    decoder: StepDecoder,
    features: torch.Tensor,
    vocab: Vocabulary,
    options: DecodingOptions | None = None,
) -> list[list[Hypothesis]]:
    """features (B, L, D) -> for each image, its captions best first (`num_captions` of them)."""
    with torch.no_grad():
        generated = array_decoding.generate(NumpySteps(decoder, features), _numpy(features), vocab, options)
    return [[Hypothesis(h.tokens, h.log_prob, h.score, torch.from_numpy(h.alphas), torch.from_numpy(h.betas),
                        h.truncated) for h in hyps] for hyps in generated]


def allowed_logits(logits: torch.Tensor, vocab: Vocabulary, step: int, max_length: int) -> torch.Tensor:
    """`logits` (N, V) with what may never be said at this step at -inf (`inference.decoding.never_allowed`):
    differentiable (SCST scores its samples through it)."""
    never = torch.from_numpy(array_decoding.never_allowed(logits.size(-1), vocab, step, max_length))
    return logits.masked_fill(never.to(logits.device), float("-inf"))


def choice_logits(
    logits: torch.Tensor, vocab: Vocabulary, step: int, max_length: int, histories: list[list[int]], no_repeat: int
) -> torch.Tensor:
    """The one rule every method chooses by (`inference.decoding.choice_logits`), on a torch tensor (N, V)."""
    allowed = array_decoding.choice_logits(_numpy(logits), vocab, step, max_length, histories, no_repeat)
    return logits.masked_fill(torch.from_numpy(np.isneginf(allowed)).to(logits.device), float("-inf"))
