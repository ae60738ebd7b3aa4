import dataclasses

import torch

from captioner.model import AttentionDecoder, caption_loss
from tests.helpers import tiny_config


def _batch(vocab_size, b=3, t=6, l=10, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, l, d, generator=g)
    captions = torch.randint(4, vocab_size, (b, t + 1), generator=g)
    captions[:, 0] = 1  # START
    return features, captions


def test_attention_weights_sum_to_one_over_locations():
    decoder = AttentionDecoder(tiny_config(50))
    features, captions = _batch(50)
    logits, alphas, locations = decoder(features, captions)
    assert locations.shape == (3, 6) and (locations == -1).all()  # soft attention: the expected context
    assert logits.shape == (3, 6, 50) and alphas.shape == (3, 6, 10)
    torch.testing.assert_close(alphas.sum(-1), torch.ones(3, 6))
    assert (alphas >= 0).all()


def test_forget_gate_bias_starts_at_one():
    decoder = AttentionDecoder(tiny_config(50, num_layers=2))
    for cell in decoder.cells:
        h = cell.hidden_size
        total = cell.bias_ih + cell.bias_hh  # the LSTM adds both biases
        torch.testing.assert_close(total[h : 2 * h], torch.ones(h))
        torch.testing.assert_close(total[:h], torch.zeros(h))
        torch.testing.assert_close(total[2 * h :], torch.zeros(2 * h))


def test_step_api_matches_teacher_forced_forward():
    decoder = AttentionDecoder(tiny_config(50, num_layers=2)).eval()
    features, captions = _batch(50)
    logits, alphas, _ = decoder(features, captions)
    state = decoder.init_state(features)
    for t in range(captions.size(1) - 1):
        step_logits, alpha, state = decoder.step(state, captions[:, t])
        torch.testing.assert_close(step_logits, logits[:, t])
        torch.testing.assert_close(alpha, alphas[:, t])
    assert state.h.shape == (3, 2, 32) and state.beta.shape == (3, 1)


def test_masked_loss_ignores_padding():
    decoder = AttentionDecoder(tiny_config(50)).eval()
    features, captions = _batch(50, t=4)
    padded = torch.cat([captions, torch.zeros(3, 5, dtype=torch.long)], dim=1)  # PAD after the caption
    loss_short, ce_short = caption_loss(*_forward(decoder, features, captions), attention_reg=0.0)
    loss_long, ce_long = caption_loss(*_forward(decoder, features, padded), attention_reg=0.0)
    torch.testing.assert_close(ce_short, ce_long)
    torch.testing.assert_close(loss_short, loss_long)
    # With the attention term too: padded steps must not count in sum_t alpha_ti.
    torch.testing.assert_close(
        caption_loss(*_forward(decoder, features, captions), attention_reg=1.0)[0],
        caption_loss(*_forward(decoder, features, padded), attention_reg=1.0)[0],
    )


def _forward(decoder, features, captions):
    out = decoder(features, captions)
    return out.logits, captions, out.alphas


def test_doubly_stochastic_term_is_zero_when_each_location_gets_total_attention_one():
    b, t, l, v = 2, 4, 4, 10
    logits = torch.zeros(b, t, v)
    captions = torch.full((b, t + 1), 5)
    alphas = torch.eye(l).expand(b, t, l)  # step t looks only at location t: sum_t alpha_ti = 1 for all i
    with_reg, _ = caption_loss(logits, captions, alphas, attention_reg=1.0)
    without, _ = caption_loss(logits, captions, alphas, attention_reg=0.0)
    torch.testing.assert_close(with_reg, without)
    focused = torch.zeros(b, t, l)
    focused[..., 0] = 1.0  # all steps on one location: penalised
    assert caption_loss(logits, captions, focused, attention_reg=1.0)[0] > without


def test_perplexity_ignores_label_smoothing():
    decoder = AttentionDecoder(tiny_config(50)).eval()
    features, captions = _batch(50)
    args = _forward(decoder, features, captions)
    _, ce_plain = caption_loss(*args, attention_reg=0.0)
    loss_smooth, ce_smooth = caption_loss(*args, attention_reg=0.0, label_smoothing=0.1)
    torch.testing.assert_close(ce_plain, ce_smooth)
    assert not torch.isclose(loss_smooth, ce_smooth)


def test_weight_tying_shares_one_tensor():
    decoder = AttentionDecoder(tiny_config(50, tie_weights=True))
    assert decoder.out_vocab.weight is decoder.embedding.weight
    n_tied = sum(p.numel() for p in decoder.parameters())
    n_untied = sum(p.numel() for p in AttentionDecoder(tiny_config(50)).parameters())
    assert n_untied - n_tied == 50 * 24


def test_gate_scales_context():
    """beta = sigmoid(f_beta(h)) multiplies the attended context: at beta ~ 0 the next word cannot depend on
    what the features say (same state, other features: same logits), at beta ~ 1 it does."""
    decoder = AttentionDecoder(tiny_config(50)).eval()
    features, _ = _batch(50)
    other = torch.randn_like(features)
    tokens = torch.ones(3, dtype=torch.long)
    state = decoder.init_state(features)
    # The same recurrent state (h, c) looking at other features: only the context differs.
    swapped = dataclasses.replace(state, features=other, projected_features=decoder.attention.feature_proj(other))
    with torch.no_grad():
        decoder.gate.weight.zero_()
        for bias, depends_on_image in ((-30.0, False), (30.0, True)):
            decoder.gate.bias.fill_(bias)
            logits, _, next_state = decoder.step(state, tokens)
            other_logits, _, _ = decoder.step(swapped, tokens)
            torch.testing.assert_close(next_state.beta, torch.full((3, 1), torch.sigmoid(torch.tensor(bias)).item()))
            assert torch.allclose(logits, other_logits, atol=1e-6) != depends_on_image
