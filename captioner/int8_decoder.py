"""The int8 CPU decoder: `AttentionDecoder.step` with int8 weights, its matrix products regrouped.

At batch 1-16 a decoding step on CPU is bound by reading weights (~4.5M per step) and by the fixed cost of each
op, not by arithmetic. So the CPU decoder keeps its weights in int8 (dynamic quantisation: activations are
quantised on the fly, one scale per tensor; weights one scale per output channel) and makes as few products
per step as the maths allows. For the shipped kind of decoder (soft attention, one LSTM layer) the step is
regrouped; every regrouping is exact in real arithmetic, only the int8 rounding differs from the fp32 model:

- the LSTM's input is [E y_{t-1}; z_t], so W_ih [E y; z] = (E W_ih_y^T)[y] + W_ih_z z: the word's share of
  the gates is one row of a (V, 4H) table built once, looked up instead of multiplied;
- everything that reads h_{t-1} (the LSTM's W_hh, the attention's W_h, the gate f_beta) is one product;
- everything that reads the gated context z_t (the LSTM's W_ih_z, the deep output's L_z) is one product;
- W_a a_i, once per image (L x D x A, the largest product of decoding), is int8 too;
- the attention's w^T tanh(x) = 2 w^T sigmoid(2x) - sum(w), and softmax ignores the constant: W_a, W_h and their
  biases are doubled and w too, so the B x L x A activation each step is one sigmoid (CPU tanh is ~4x slower).

That is four int8 products a step (from h_{t-1}, from z_t, L_h h_t, L_o) instead of seven. `model.py` stays the
definition; `tests/test_engine.py` checks this step against it on real photos, and docs/performance.md has the
val CIDEr of both (within 0.01). Other decoders (GRU, hard attention, several layers) get torch's module-by-module
dynamic quantisation of their step layers instead. Greedy decoding, sampling and beam search are unchanged:
they only see `init_state` / `step`.
"""

from __future__ import annotations

import copy
import warnings
from itertools import chain

import torch
from torch import nn

from .ensemble import EnsembleDecoder
from .model import AttentionDecoder, CaptionerConfig, DecoderState

# For decoders that are not regrouped: the layers every step runs whose weights dominate its bytes. Left in fp32:
# the attention scorer and gate (a few hundred weights applied to every location: quantising their input each
# step costs more than it saves) and what runs once per image (h0/c0, class head).
QUANTIZED_STEP_LAYERS = ("cells", "attention.hidden_proj", "attention.feature_proj", "out_hidden", "out_context",
                         "out_vocab")


def quantize_decoder_for_cpu(decoder: nn.Module) -> nn.Module:
    """An int8 copy of `decoder` (a single decoder or an ensemble) for decoding on CPU, with the same
    `init_state` / `step` interface. The original decoder is left untouched."""
    if isinstance(decoder, EnsembleDecoder):
        return EnsembleDecoder([quantize_decoder_for_cpu(member) for member in decoder.members]).eval()
    if not isinstance(decoder, AttentionDecoder):
        raise TypeError(f"cannot quantise a {type(decoder).__name__}")
    if Int8LstmDecoder.supports(decoder.config):
        return Int8LstmDecoder(decoder)
    quantized = _copy_sharing_tensors(decoder)
    kinds = (nn.Linear, nn.LSTMCell, nn.GRUCell)
    return _quantize(quantized, {name for name, module in quantized.named_modules()
                                 if isinstance(module, kinds) and _is_step_layer(name)})


class Int8LstmDecoder(nn.Module):
    """The regrouped int8 step of a soft-attention, one-layer LSTM `AttentionDecoder` (inference only)."""

    @staticmethod
    def supports(config: CaptionerConfig) -> bool:
        return config.attention == "soft" and config.cell == "lstm" and config.num_layers == 1

    def __init__(self, decoder: AttentionDecoder):
        super().__init__()
        if not self.supports(decoder.config):
            raise ValueError("Int8LstmDecoder needs soft attention and one LSTM layer")
        self.config = decoder.config
        e, h = decoder.config.embed_dim, decoder.config.hidden_dim
        cell, attention = decoder.cells[0], decoder.attention
        # LSTMCell's gate rows are (input, forget, cell, output); reordered to (input, forget, output, cell), the
        # three sigmoid gates are one slice and take one call.
        order = torch.cat([torch.arange(0, 2 * h), torch.arange(3 * h, 4 * h), torch.arange(2 * h, 3 * h)])
        with torch.no_grad():
            # init_state is the model's own, with 2 W_a in int8 (h0/c0 and the class head stay fp32: once per image).
            initial = _copy_sharing_tensors(decoder, except_under=("attention.feature_proj.",))
            initial.attention.feature_proj.weight.mul_(2)
            initial.attention.feature_proj.bias.mul_(2)
            self.initial = _quantize(initial, {"attention.feature_proj"})
            weight_ih, weight_hh = cell.weight_ih[order], cell.weight_hh[order]
            weight_y, weight_z = weight_ih[:, :e], weight_ih[:, e:]  # (4H, E), (4H, D)
            embedding = decoder.embedding.weight.detach().float().cpu().clone()  # (V, E)
            self.register_buffer("embedding", embedding)
            # The word's share of the gates, with both LSTM biases: (V, 4H).
            bias = (cell.bias_ih + cell.bias_hh)[order]
            self.register_buffer("word_gates", embedding @ weight_y.float().cpu().T + bias)
            self.register_buffer("score", 2 * attention.score.weight.detach().float().cpu().view(-1))  # 2w (A,)
            self.from_hidden = _int8_linear(  # h_{t-1} -> [W_hh h (4H); 2 W_h h (A); f_beta(h) (1)]
                torch.cat([weight_hh, 2 * attention.hidden_proj.weight, decoder.gate.weight]),
                torch.cat([torch.zeros(4 * h), 2 * attention.hidden_proj.bias, decoder.gate.bias]),
            )
            self.from_context = _int8_linear(  # z_t -> [W_ih_z z (4H); L_z z (E)]
                torch.cat([weight_z, decoder.out_context.weight]),
                torch.cat([torch.zeros(4 * h), decoder.out_context.bias]),
            )
            self.out_hidden = _int8_linear(decoder.out_hidden.weight, decoder.out_hidden.bias)  # L_h
            self.out_vocab = _int8_linear(decoder.out_vocab.weight, decoder.out_vocab.bias)  # L_o
        # Each step calls the int8 op on the packed weights directly: through the module wrapper a call costs
        # ~15 us more, a tenth of a step at batch 1.
        self._packed = tuple(m._packed_params._packed_params
                             for m in (self.from_hidden, self.from_context, self.out_hidden, self.out_vocab))
        self.eval()

    def init_state(self, features: torch.Tensor) -> DecoderState:
        """features (B, L, D) -> the model's initial state (see AttentionDecoder.init_state)."""
        return self.initial.init_state(features)

    def step(self, state: DecoderState, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, DecoderState]:
        """tokens (B,) -> logits (B, V), alpha (B, L), new state: AttentionDecoder.step in eval mode."""
        hidden_size, attention_size = self.config.hidden_dim, self.config.attention_dim
        gates_size = 4 * hidden_size
        packed_hidden, packed_context, packed_out_hidden, packed_out_vocab = self._packed
        from_hidden = _int8_matmul(state.h[:, 0], packed_hidden)  # (B, 4H + A + 1)
        hidden_gates = from_hidden[:, :gates_size]
        hidden_attention = from_hidden[:, gates_size : gates_size + attention_size]  # 2 W_h h (B, A)
        beta = torch.sigmoid(from_hidden[:, gates_size + attention_size :])  # (B, 1)
        # e_ti + sum(w): softmax gives the model's alpha (see the module docstring).
        energy = torch.sigmoid(state.projected_features + hidden_attention.unsqueeze(1)) @ self.score  # (B, L)
        alpha = energy.softmax(dim=1)
        context = torch.bmm(alpha.unsqueeze(1), state.features).squeeze(1) * beta  # z_t (B, D)
        from_context = _int8_matmul(context, packed_context)  # (B, 4H + E)
        gates = self.word_gates.index_select(0, tokens) + hidden_gates + from_context[:, :gates_size]
        input_gate, forget_gate, output_gate = gates[:, : 3 * hidden_size].sigmoid().chunk(3, dim=1)
        c = forget_gate * state.c[:, 0] + input_gate * gates[:, 3 * hidden_size :].tanh()
        h = output_gate * torch.tanh(c)  # (B, H)
        # The deep output (B, E): E y_{t-1} + L_h h_t + L_z z_t.
        out = self.embedding.index_select(0, tokens) + _int8_matmul(h, packed_out_hidden) + from_context[:, gates_size:]
        new_state = DecoderState(h.unsqueeze(1), c.unsqueeze(1), state.features, state.projected_features, beta,
                                 state.location)
        return _int8_matmul(out, packed_out_vocab), alpha, new_state


def _int8_matmul(x: torch.Tensor, packed: torch.ScriptObject) -> torch.Tensor:
    """What a dynamic int8 `Linear` computes (activations quantised per tensor, reduce_range as it does)."""
    return torch.ops.quantized.linear_dynamic.default(x, packed, True)


def _copy_sharing_tensors(decoder: nn.Module, except_under: tuple[str, ...] = ()) -> nn.Module:
    """A CPU copy of `decoder` in eval mode whose modules are new but whose CPU tensors are the decoder's own, except
    those under the `except_under` prefixes (copied, for the caller to change in place). Quantising replaces
    modules and only reads the float weights, so the int8 decoder then costs the memory of what it quantises, not
    of a second fp32 decoder (`Captioner` keeps both: the fp32 one scores perplexity)."""
    tensors = chain(decoder.named_parameters(), decoder.named_buffers())
    shared = {id(t): t for name, t in tensors if t.device.type == "cpu" and not name.startswith(except_under)}
    return copy.deepcopy(decoder, memo=shared).cpu().eval()


def _is_step_layer(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in QUANTIZED_STEP_LAYERS)


def _int8_linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    linear = nn.Linear(weight.size(1), weight.size(0))
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return _quantize(nn.Sequential(linear), {"0"})[0]


def _quantize(module: nn.Module, names: set[str]) -> nn.Module:
    """torch's dynamic int8 quantisation of the named submodules (per-channel weight scales), in place."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization's move notice
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor", category=UserWarning)
        return quantize_dynamic(module.eval(), dict.fromkeys(names, per_channel_dynamic_qconfig),
                                dtype=torch.qint8, inplace=True)
