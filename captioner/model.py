"""Show, Attend and Tell: an LSTM (or GRU) decoder with soft or stochastic hard attention over a grid of CNN
features.

Shape legend (used in every comment of the project):
    B batch, L feature locations (L = h * w, the feature grid's rows and columns), D feature dim, E embedding dim,
    H hidden dim, A attention dim, T time steps, V vocabulary size, K beam size, N rows of a flattened batch
    (B * K beams, B * samples), S the square input side of the backbone in px (images (B, 3, S, S)), C classes
    of the backbone's classifier. H is only ever the hidden size: an image's size is written (height, width).

The decoder is driven one word at a time through two calls, which training, greedy decoding, sampling and
beam search all share:

    state = decoder.init_state(features)                # features (B, L, D)
    logits, alpha, state = decoder.step(state, tokens)  # tokens (B,) -> logits (B, V), alpha (B, L)

Attention (`CaptionerConfig.attention`):
- "soft" (section 4.2): the context is the alpha-weighted mean of the L feature vectors.
- "hard" (section 4.1): in training, one location s_t ~ Multinoulli(alpha_t) is the context (with probability
  0.5 the expected context is used instead, as in the paper); `hard_attention_loss` adds the REINFORCE and
  entropy terms that train alpha. At inference (eval mode) the context is the argmax location, so greedy
  decoding is deterministic. `step` returns the distribution alpha either way: its peak is the location used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CaptionerConfig:
    vocab_size: int  # V
    feature_dim: int  # D
    embed_dim: int = 256  # E
    hidden_dim: int = 512  # H
    attention_dim: int = 256  # A
    num_layers: int = 1  # stacked LSTM layers; attention reads the top one
    dropout: float = 0.5
    tie_weights: bool = False  # share the embedding matrix with the output projection (V x E)
    # >0: the backbone's own ImageNet classifier (a frozen copy, C classes) turns the mean feature into class
    # probabilities that feed h0/c0 beside it: a free, offline "what is in the photo" signal for small data.
    semantic_classes: int = 0
    cell: str = "lstm"  # "lstm" or "gru" (a GRU has no memory cell: DecoderState.c stays zeros)
    attention: str = "soft"  # "soft" (deterministic, section 4.2) or "hard" (stochastic, section 4.1)

    def __post_init__(self) -> None:
        if self.cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', not {self.cell!r}")
        if self.attention not in ("soft", "hard"):
            raise ValueError(f"attention must be 'soft' or 'hard', not {self.attention!r}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CaptionerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}: checkpoint from a newer version?")
        return cls(**data)


class DecoderOutput(NamedTuple):
    """What teacher-forced `AttentionDecoder.forward` returns."""

    logits: torch.Tensor  # (B, T, V), predicting captions[:, 1:]
    alphas: torch.Tensor  # (B, T, L)
    locations: torch.Tensor  # (B, T) long: hard attention's sampled location, -1 for the expected context


@dataclass
class DecoderState:
    """Everything the decoder carries between steps. Every tensor is batch-first, so beam search can reorder
    or repeat hypotheses with `select` without knowing what is inside."""

    h: torch.Tensor  # (B, num_layers, H)
    c: torch.Tensor  # (B, num_layers, H); zeros for a GRU
    features: torch.Tensor  # (B, L, D)
    projected_features: torch.Tensor  # (B, L, A), W_a a_i computed once per image
    beta: torch.Tensor  # (B, 1), gate of the last step (for visualisation)
    location: torch.Tensor  # (B,) long: hard attention's location at the last step; -1: the expected context

    def select(self, index: torch.Tensor, same_image: bool = False) -> DecoderState:
        """Rows `index` (N,) of every tensor: reorders beams or repeats images for sampling.

        `same_image=True` promises that every row is replaced by a row of the same image (beam search
        reordering within an image's block): the feature tensors, by far the largest, are then left as they
        are instead of being copied at every step."""
        if same_image:
            return DecoderState(self.h.index_select(0, index), self.c.index_select(0, index), self.features,
                                self.projected_features, self.beta.index_select(0, index),
                                self.location.index_select(0, index))
        return DecoderState(*(getattr(self, f.name).index_select(0, index) for f in fields(self)))


def fast_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh(x) = 2 sigmoid(2x) - 1, to ~1e-7 absolute. At inference the attention applies tanh to B x L x A values
    every step, the largest elementwise op of a step, and this torch build's CPU tanh is ~4x slower than its
    sigmoid (measured: 856 vs 201 us on 2 x 196 x 256). Only without autograd (decoding): whatever computes a
    gradient (training, SCST's sampled captions in eval mode) keeps torch.tanh."""
    return torch.sigmoid(x * 2).mul_(2).sub_(1)


class SoftAttention(nn.Module):
    """e_ti = w^T tanh(W_a a_i + W_h h_{t-1}), alpha_t = softmax_i(e_ti) (Bahdanau-style MLP)."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, attention_dim)  # W_a
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim)  # W_h
        # No bias: softmax ignores a constant, so its gradient is pure rounding noise that Adam would amplify.
        self.score = nn.Linear(attention_dim, 1, bias=False)  # w

    def forward(
        self, features: torch.Tensor, projected_features: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # features (B, L, D), projected_features (B, L, A), hidden (B, H)
        pre_activation = projected_features + self.hidden_proj(hidden).unsqueeze(1)  # (B, L, A)
        activated = torch.tanh(pre_activation) if torch.is_grad_enabled() else fast_tanh(pre_activation)
        energy = self.score(activated)  # (B, L, 1)
        alpha = F.softmax(energy.squeeze(2), dim=1)  # (B, L)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (B, D)
        return context, alpha


def hard_context(
    features: torch.Tensor, alpha: torch.Tensor, expected_context: torch.Tensor, sample: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic hard attention's context: one feature vector a_s instead of the mean.

    features (B, L, D), alpha (B, L), expected_context (B, D) -> context (B, D), location (B,).
    sample=True (training): s ~ Multinoulli(alpha), except that with probability 0.5 a row keeps the expected
    context (location -1), the paper's variance reduction. sample=False (inference): s = argmax alpha.
    Only alpha's log-probability at s carries a gradient to the attention (see `hard_attention_loss`).
    """
    if sample:
        location = torch.multinomial(alpha.detach(), 1).squeeze(1)  # (B,)
        keep_expected = torch.rand(location.shape, device=alpha.device) < 0.5
        location = location.masked_fill(keep_expected, -1)
    else:
        location = alpha.argmax(dim=1)
    rows = torch.arange(features.size(0), device=features.device)
    chosen = features[rows, location.clamp(min=0)]  # (B, D)
    return torch.where((location >= 0).unsqueeze(1), chosen, expected_context), location


class AttentionDecoder(nn.Module):
    """LSTM (or GRU) with soft or hard attention, gating scalar beta and the paper's deep output layer (eq. 7)."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim)
        self.attention = SoftAttention(c.feature_dim, c.hidden_dim, c.attention_dim)
        self.gate = nn.Linear(c.hidden_dim, 1)  # beta_t = sigmoid(f_beta(h_{t-1}))
        if c.semantic_classes:
            self.class_head = nn.Linear(c.feature_dim, c.semantic_classes).requires_grad_(False)
        init_dim = c.feature_dim + c.semantic_classes
        self.init_h = nn.Linear(init_dim, c.num_layers * c.hidden_dim)
        if c.cell == "lstm":
            self.init_c = nn.Linear(init_dim, c.num_layers * c.hidden_dim)
        cell_type = nn.LSTMCell if c.cell == "lstm" else nn.GRUCell
        self.cells = nn.ModuleList(
            cell_type(c.embed_dim + c.feature_dim if i == 0 else c.hidden_dim, c.hidden_dim)
            for i in range(c.num_layers)
        )
        if c.attention == "hard":
            # Moving average of the per-word log-likelihood: REINFORCE's baseline. A buffer, so checkpoints
            # and --resume keep it and DDP keeps it the same on every rank.
            self.register_buffer("reinforce_baseline", torch.zeros(()))
            self.register_buffer("reinforce_updates", torch.zeros((), dtype=torch.long))
        self.dropout = nn.Dropout(c.dropout)
        # Deep output: p(y_t) ~ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t)).
        self.out_hidden = nn.Linear(c.hidden_dim, c.embed_dim)  # L_h
        self.out_context = nn.Linear(c.feature_dim, c.embed_dim)  # L_z
        self.out_vocab = nn.Linear(c.embed_dim, c.vocab_size)  # L_o
        if c.tie_weights:
            self.out_vocab.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        for cell in self.cells if self.config.cell == "lstm" else ():
            # Gates are ordered (input, forget, cell, output): a forget bias of 1 keeps memory early in
            # training (Jozefowicz et al. 2015). bias_ih + bias_hh are summed, so set one to 1, the other 0.
            h = cell.hidden_size
            with torch.no_grad():
                cell.bias_ih.zero_()
                cell.bias_hh.zero_()
                cell.bias_ih[h : 2 * h].fill_(1.0)
        nn.init.zeros_(self.out_vocab.bias)

    def semantic_input(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, L, D) -> class probabilities (B, C) from the frozen classifier head."""
        return F.softmax(self.class_head(features.mean(dim=1)), dim=-1)

    def init_state(self, features: torch.Tensor) -> DecoderState:
        """features (B, L, D) -> initial state; h0, c0 from the mean feature (and class probabilities)."""
        b = features.size(0)
        summary = features.mean(dim=1)  # (B, D)
        if self.config.semantic_classes:
            summary = torch.cat([summary, self.semantic_input(features)], dim=1)
        h = torch.tanh(self.init_h(summary)).view(b, self.config.num_layers, self.config.hidden_dim)
        c = torch.tanh(self.init_c(summary)).view_as(h) if self.config.cell == "lstm" else torch.zeros_like(h)
        return DecoderState(
            h=h,
            c=c,
            features=features,
            projected_features=self.attention.feature_proj(features),  # W_a a_i (B, L, A), once per image
            beta=features.new_ones(b, 1),
            location=torch.full((b,), -1, dtype=torch.long, device=features.device),
        )

    def step(self, state: DecoderState, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, DecoderState]:
        """tokens (B,) = previous words -> logits (B, V) for the next word, alpha (B, L), new state."""
        top_h = state.h[:, -1]  # (B, H)
        context, alpha = self.attention(state.features, state.projected_features, top_h)  # (B, D), (B, L)
        location = state.location
        if self.config.attention == "hard":
            context, location = hard_context(state.features, alpha, context, sample=self.training)
        beta = torch.sigmoid(self.gate(top_h))  # (B, 1)
        context = beta * context
        embedded = self.embedding(tokens)  # (B, E)
        x = torch.cat([embedded, context], dim=1)
        hs, cs = [], []
        for layer, cell in enumerate(self.cells):
            if self.config.cell == "lstm":
                h, c = cell(x, (state.h[:, layer], state.c[:, layer]))
            else:
                h, c = cell(x, state.h[:, layer]), state.c[:, layer]
            hs.append(h)
            cs.append(c)
            x = self.dropout(h)
        out = embedded + self.out_hidden(self.dropout(h)) + self.out_context(context)  # (B, E)
        logits = self.out_vocab(self.dropout(out))  # (B, V)
        new_state = DecoderState(
            h=torch.stack(hs, dim=1),
            c=torch.stack(cs, dim=1),
            features=state.features,
            projected_features=state.projected_features,
            beta=beta,
            location=location,
        )
        return logits, alpha, new_state

    def forward(self, features: torch.Tensor, captions: torch.Tensor) -> DecoderOutput:
        """Teacher forcing. features (B, L, D), captions (B, T+1) = START w1 .. wn END PAD..

        Returns logits (B, T, V) predicting captions[:, 1:], alphas (B, T, L) and hard attention's locations
        (B, T) (-1: expected context; all -1 for soft attention), which `hard_attention_loss` needs.
        Padded positions are computed too (cheap, and no sort-and-pack); the loss masks them out.
        """
        state = self.init_state(features)
        inputs = captions[:, :-1]  # (B, T)
        logits, alphas, locations = [], [], []
        for t in range(inputs.size(1)):
            step_logits, alpha, state = self.step(state, inputs[:, t])
            logits.append(step_logits)
            alphas.append(alpha)
            locations.append(state.location)
        return DecoderOutput(torch.stack(logits, dim=1), torch.stack(alphas, dim=1), torch.stack(locations, dim=1))


def caption_loss(
    logits: torch.Tensor,
    captions: torch.Tensor,
    alphas: torch.Tensor,
    pad_id: int = 0,
    attention_reg: float = 1.0,
    label_smoothing: float = 0.0,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked cross-entropy + doubly stochastic attention regularisation.

    logits (B, T, V), captions (B, T+1), alphas (B, T, L). Returns (loss to optimise, mean cross-entropy per
    real token, detached). The regulariser lambda * sum_i (1 - sum_t alpha_ti)^2 pushes the model to look at
    every location over the caption; only real (unpadded) steps count in sum_t. The loss is a sum over real
    tokens divided by `normalizer` (default: their count); distributed training passes the global count.
    """
    targets = captions[:, 1:]  # (B, T)
    mask = targets != pad_id  # (B, T)
    n_tokens = mask.sum().clamp(min=1)
    flat_logits, flat_targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    ce = F.cross_entropy(flat_logits, flat_targets, reduction="none", label_smoothing=label_smoothing)
    loss_sum = (ce.view_as(targets) * mask).sum()
    # Perplexity must be exp(true cross-entropy), so report it without label smoothing.
    if label_smoothing:
        with torch.no_grad():
            plain = F.cross_entropy(flat_logits, flat_targets, reduction="none").view_as(targets)
            cross_entropy = (plain * mask).sum() / n_tokens
    else:
        cross_entropy = loss_sum.detach() / n_tokens
    if attention_reg:
        attention_sum = (alphas * mask.unsqueeze(2)).sum(dim=1)  # (B, L)
        # The paper adds lambda * sum_i(...) per caption to the *summed* negative log-likelihood; the same
        # normaliser divides both, so lambda keeps its meaning.
        loss_sum = loss_sum + attention_reg * ((1.0 - attention_sum) ** 2).sum()
    return loss_sum / (n_tokens if normalizer is None else normalizer), cross_entropy


def hard_attention_loss(
    logits: torch.Tensor,
    captions: torch.Tensor,
    alphas: torch.Tensor,
    locations: torch.Tensor,
    baseline: torch.Tensor | float | None,
    reinforce_weight: float = 1.0,
    entropy_weight: float = 0.01,
    pad_id: int = 0,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The extra terms that train stochastic hard attention (Show, Attend and Tell eq. 12), to add to
    `caption_loss`: REINFORCE on the sampled locations and an entropy bonus on alpha.

    logits (B, T, V), captions (B, T+1), alphas (B, T, L), locations (B, T) (-1: expected context, no sample).
    The reward of a caption is its mean per-word log-likelihood given the sampled locations (per word, so
    long captions do not get systematically lower rewards); `baseline` is its moving average (None: this
    batch's mean reward). Returns
    (loss to add, mean reward of the batch, detached, for updating the baseline).
    """
    targets = captions[:, 1:]  # (B, T)
    mask = targets != pad_id  # (B, T)
    token_nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    token_logp = -token_nll.view_as(targets) * mask
    reward = (token_logp.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).detach()  # (B,)
    if baseline is None:
        baseline = reward.mean()
    sampled = (locations >= 0) & mask  # (B, T)
    chosen_alpha = alphas.gather(2, locations.clamp(min=0).unsqueeze(2)).squeeze(2)  # (B, T)
    location_logp = torch.log(chosen_alpha.clamp_min(1e-12)) * sampled
    # Minimising -(r - b) log p(s) raises the probability of locations that explained the caption better
    # than usual; the entropy bonus keeps alpha from collapsing onto one location too early.
    reinforce = -((reward - baseline).unsqueeze(1) * location_logp).sum()
    entropy = -(alphas * torch.log(alphas.clamp_min(1e-12))).sum(dim=2)  # (B, T)
    loss_sum = reinforce_weight * reinforce - entropy_weight * (entropy * mask).sum()
    n_tokens = mask.sum().clamp(min=1)
    return loss_sum / (n_tokens if normalizer is None else normalizer), reward.mean()
