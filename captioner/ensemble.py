"""Ensembles: several decoders trained over one backbone decode as one model.

Each step every member reads the same image features and the same previous word; the ensemble's next-word
distribution is the mean of the members' log-probabilities (a normalised geometric mean once decoding applies
its log-softmax), and its attention map alpha and gate beta are the members' means, so figures and the web page
work unchanged. Greedy decoding, sampling and beam search run on top of `init_state` / `step` exactly as they do
for one decoder (`captioner.decoding`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .model import AttentionDecoder, CaptionerConfig, DecoderOutput, DecoderState


@dataclass
class EnsembleState:
    """One DecoderState per member; `beta` (B, 1) is their mean, for visualisation."""

    members: list[DecoderState]

    @property
    def beta(self) -> torch.Tensor:
        return torch.stack([s.beta for s in self.members]).mean(dim=0)

    def select(self, index: torch.Tensor, same_image: bool = False) -> EnsembleState:
        """Rows `index` (N,) of every member's state (see DecoderState.select)."""
        return EnsembleState([s.select(index, same_image=same_image) for s in self.members])


class EnsembleDecoder(nn.Module):
    """Decoders that share a backbone (feature size) and a vocabulary, decoded as one model."""

    def __init__(self, members: Sequence[AttentionDecoder]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one decoder")
        first = members[0].config
        for member in members[1:]:
            if (member.config.vocab_size, member.config.feature_dim) != (first.vocab_size, first.feature_dim):
                raise ValueError(
                    "ensemble members must share the vocabulary size and feature size: "
                    f"{member.config.vocab_size}/{member.config.feature_dim} vs {first.vocab_size}/{first.feature_dim}"
                )
        self.members = nn.ModuleList(members)

    @property
    def config(self) -> CaptionerConfig:
        """The first member's config: what the members share (vocabulary and feature size) is read from it."""
        return self.members[0].config

    @property
    def configs(self) -> list[CaptionerConfig]:
        return [m.config for m in self.members]

    def init_state(self, features: torch.Tensor) -> EnsembleState:
        """features (B, L, D) -> every member's initial state."""
        return EnsembleState([m.init_state(features) for m in self.members])

    def step(self, state: EnsembleState, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, EnsembleState]:
        """tokens (B,) -> mean log-probabilities (B, V), mean alpha (B, L), new state."""
        log_probs, alphas, states = [], [], []
        for member, member_state in zip(self.members, state.members, strict=True):
            logits, alpha, new_state = member.step(member_state, tokens)
            log_probs.append(F.log_softmax(logits.float(), dim=-1))
            alphas.append(alpha)
            states.append(new_state)
        return torch.stack(log_probs).mean(dim=0), torch.stack(alphas).mean(dim=0), EnsembleState(states)

    def forward(self, features: torch.Tensor, captions: torch.Tensor) -> DecoderOutput:
        """Teacher-forced, for perplexity: features (B, L, D), captions (B, T+1) -> mean log-probabilities
        (B, T, V) as logits and mean alphas (B, T, L), the same combination as `step`; the first member's
        locations (hard attention only)."""
        outputs = [member(features, captions) for member in self.members]
        log_probs = torch.stack([F.log_softmax(out.logits.float(), dim=-1) for out in outputs]).mean(dim=0)
        alphas = torch.stack([out.alphas for out in outputs]).mean(dim=0)
        return DecoderOutput(log_probs, alphas, outputs[0].locations)
