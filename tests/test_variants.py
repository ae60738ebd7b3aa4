"""Beyond the paper's soft-attention LSTM: stochastic hard attention (section 4.1) and a GRU cell."""

import math

import pytest
import torch

from captioner import train
from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.encoder import get_backbone
from captioner.model import AttentionDecoder, CaptionerConfig, hard_attention_loss, hard_context
from tests.helpers import metrics_rows, tiny_config, train_args


def test_hard_attention_selects_exactly_one_location_per_sampled_row():
    torch.manual_seed(0)
    b, l, d = 4000, 6, 5
    features = torch.randn(b, l, d)
    alpha = torch.softmax(torch.tensor([0.0, 3.0, 0.0, 1.0, 0.0, 0.0]), 0).expand(b, l)
    expected = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)
    context, location = hard_context(features, alpha, expected, sample=True)
    sampled = location >= 0
    rows = torch.arange(b)
    # One-hot selection: a sampled row's context *is* one feature vector, not a mixture.
    torch.testing.assert_close(context[sampled], features[rows[sampled], location[sampled]])
    torch.testing.assert_close(context[~sampled], expected[~sampled])
    assert 0.45 < (~sampled).float().mean() < 0.55  # the paper's 0.5 chance of the expected context
    # Locations follow the multinoulli alpha.
    frequency = torch.bincount(location[sampled], minlength=l).float() / sampled.sum()
    torch.testing.assert_close(frequency, alpha[0], atol=0.03, rtol=0)
    # Inference: the argmax location, deterministically.
    context, location = hard_context(features, alpha, expected, sample=False)
    assert (location == 1).all()
    torch.testing.assert_close(context, features[:, 1])


def test_hard_attention_decoder_samples_in_training_and_is_deterministic_in_eval():
    torch.manual_seed(0)
    decoder = AttentionDecoder(tiny_config(40, attention="hard"))
    features = torch.randn(64, 9, 16)
    captions = torch.randint(4, 40, (64, 6))
    captions[:, 0] = 1
    locations = decoder.train()(features, captions).locations
    assert ((locations >= -1) & (locations < 9)).all() and (locations == -1).any() and (locations >= 0).any()
    decoder.eval()
    first = decoder(features, captions)
    second = decoder(features, captions)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(first.locations, first.alphas.argmax(-1))  # the argmax of the alpha that step returns


def _peaked_alphas(b=2, t=3, l=4):
    scores = torch.zeros(b, t, l, requires_grad=True)
    return scores, torch.softmax(scores, dim=-1)


@pytest.mark.parametrize("better_than_baseline", [True, False])
def test_reinforce_term_raises_the_probability_of_locations_that_paid_off(better_than_baseline):
    """REINFORCE: when the caption's log-likelihood beat the baseline, a gradient step makes the sampled
    locations more likely; when it fell short, less likely."""
    b, t, l, v = 2, 3, 4, 7
    logits = torch.zeros(b, t, v)
    logits[..., 5] = 2.0
    captions = torch.full((b, t + 1), 5)  # the likely word: reward = log p(5) per word
    reward = math.log(math.exp(2.0) / (math.exp(2.0) + v - 1))
    baseline = reward - 1.0 if better_than_baseline else reward + 1.0
    locations = torch.tensor([[2, -1, 2], [2, 2, -1]])
    scores, alphas = _peaked_alphas(b, t, l)
    loss, mean_reward = hard_attention_loss(logits, captions, alphas, locations, baseline, entropy_weight=0.0)
    assert mean_reward == pytest.approx(reward, abs=1e-6)
    loss.backward()
    with torch.no_grad():
        after = torch.softmax(scores - 1.0 * scores.grad, dim=-1)
    went_up = after[locations >= 0][:, 2] > 0.25
    assert went_up.all() if better_than_baseline else (~went_up).all()
    assert scores.grad[0, 1].abs().sum() == 0  # steps that used the expected context sampled nothing


def test_entropy_bonus_pushes_alpha_towards_spreading_out():
    logits, captions = torch.zeros(1, 1, 5), torch.full((1, 2), 4)
    scores = torch.tensor([[[2.0, 0.0, 0.0]]], requires_grad=True)
    loss, _ = hard_attention_loss(logits, captions, torch.softmax(scores, -1), torch.tensor([[-1]]), 0.0,
                                  reinforce_weight=0.0, entropy_weight=1.0)
    loss.backward()
    assert scores.grad[0, 0, 0] > 0  # descending lowers the peak


def test_hard_attention_and_gru_train_without_nans_and_resume_exactly(tmp_path, coco_mini):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    variant = dict(attention="hard", cell="gru")
    train.main(train_args(tmp_path, coco_mini, straight, epochs=3, **variant))
    rows = metrics_rows(straight)
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_perplexity"]) for r in rows)
    assert rows[-1]["train_cross_entropy"] < rows[0]["train_cross_entropy"]
    decoder = load_checkpoint(straight / "last.pt").decoder
    assert all(torch.isfinite(p).all() for p in decoder.state_dict().values() if p.is_floating_point())
    assert decoder.config.attention == "hard" and decoder.config.cell == "gru"
    assert int(decoder.reinforce_updates) == 3 * 5  # one update per batch: 35 captions in batches of 8
    assert float(decoder.reinforce_baseline) < 0  # a moving average of log-likelihoods
    train.main(train_args(tmp_path, coco_mini, interrupted, epochs=2, **variant))
    train.main(train_args(tmp_path, coco_mini, interrupted, epochs=3, resume=True, **variant))
    b = load_checkpoint(interrupted / "last.pt").decoder
    for (name, x), (_, y) in zip(decoder.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_gru_decoder_has_no_memory_cell_and_its_step_matches_forward():
    torch.manual_seed(0)
    decoder = AttentionDecoder(tiny_config(30, cell="gru", num_layers=2)).eval()
    assert all(isinstance(c, torch.nn.GRUCell) for c in decoder.cells) and not hasattr(decoder, "init_c")
    features, captions = torch.randn(3, 5, 16), torch.randint(4, 30, (3, 5))
    logits, alphas, _ = decoder(features, captions)
    state = decoder.init_state(features)
    for t in range(4):
        step_logits, alpha, state = decoder.step(state, captions[:, t])
        torch.testing.assert_close(step_logits, logits[:, t])
        torch.testing.assert_close(alpha, alphas[:, t])
        assert not state.c.any()  # c stays zeros: only h carries a GRU's memory
    lstm = AttentionDecoder(tiny_config(30, num_layers=2))
    assert sum(p.numel() for p in decoder.parameters()) < sum(p.numel() for p in lstm.parameters())


def test_variants_survive_a_checkpoint_round_trip(tmp_path, vocab):
    dim = get_backbone("efficientnet-lite0").feature_dim
    decoder = AttentionDecoder(CaptionerConfig(vocab_size=len(vocab), feature_dim=dim, embed_dim=8, hidden_dim=8,
                                               attention_dim=8, cell="gru", attention="hard"))
    decoder.reinforce_baseline.fill_(-2.5)
    from captioner.encoder import Preprocessing

    save_checkpoint(tmp_path / "v.pt", decoder, vocab, "efficientnet-lite0", Preprocessing(448, (0.5,) * 3, (0.5,) * 3))
    loaded = load_checkpoint(tmp_path / "v.pt").decoder
    assert loaded.config == decoder.config and float(loaded.reinforce_baseline) == -2.5


def test_unknown_cell_or_attention_is_refused():
    with pytest.raises(ValueError, match="cell"):
        tiny_config(10, cell="rnn")
    with pytest.raises(ValueError, match="attention"):
        tiny_config(10, attention="sparse")


def test_hard_attention_maps_go_through_the_same_visualisation(tmp_path, vocab, coco_mini):
    """`captioner visualize` on a hard-attention GRU checkpoint with the real lite0 encoder: one map per word,
    each a distribution over the 14 x 14 grid (its argmax is the location the decoder used: tested above)."""
    import json

    import numpy as np
    from PIL import Image

    from captioner.cli import main
    from captioner.encoder import Preprocessing

    torch.manual_seed(0)
    spec = get_backbone("efficientnet-lite0")
    decoder = AttentionDecoder(tiny_config(len(vocab), feature_dim=spec.feature_dim, cell="gru", attention="hard"))
    checkpoint = tmp_path / "hard.pt"
    save_checkpoint(checkpoint, decoder, vocab, spec.name, Preprocessing(448, spec.mean, spec.std))
    photo = sorted((coco_mini / "val").glob("*.jpg"))[0]
    figure = tmp_path / "hard.png"
    assert main(["visualize", str(photo), "-o", str(figure), "--checkpoint", str(checkpoint), "--json",
                 "--method", "greedy", "--max-length", "5", "--dpi", "40"]) == 0
    with Image.open(figure) as im:
        im.verify()
    data = json.loads(figure.with_suffix(".json").read_text())
    alphas = np.asarray(data["alphas"])
    assert alphas.shape == (len(data["tokens"]), 14, 14)
    np.testing.assert_allclose(alphas.sum(axis=(1, 2)), 1.0, atol=1e-3)
