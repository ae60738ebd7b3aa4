"""Invariants of greedy, sampling and beam search, on a small model with the real COCO vocabulary."""

import pytest
import torch

from captioner.decoding import DecodingOptions, _banned_ngram_tokens, generate
from captioner.model import AttentionDecoder
from tests.helpers import tiny_config

B, L, D = 4, 12, 16


@pytest.fixture
def features():
    return torch.randn(B, L, D, generator=torch.Generator().manual_seed(1))


# Every invariant holds for each recurrent cell and attention kind: they all decode through the same `step`.
VARIANTS = [dict(cell="lstm", attention="soft"), dict(cell="gru", attention="soft"),
            dict(cell="lstm", attention="hard"), dict(cell="gru", attention="hard")]


@pytest.fixture(params=VARIANTS, ids=lambda v: f"{v['cell']}-{v['attention']}")
def peaky_decoder(vocab, request):
    """Larger output weights make the distribution peaky, so END happens and captions vary by image."""
    torch.manual_seed(3)
    decoder = AttentionDecoder(tiny_config(len(vocab), **request.param)).eval()
    with torch.no_grad():
        decoder.out_vocab.weight.mul_(40)
        decoder.out_vocab.bias[2] += 4.0  # make END likely enough that most captions end on their own
    return decoder


def _tokens(results):
    return [[h.tokens for h in hyps] for hyps in results]


def test_greedy_ends_with_end_and_respects_max_length(peaky_decoder, vocab, features):
    for max_length in (1, 3, 20):
        results = generate(peaky_decoder, features, vocab, DecodingOptions(max_length=max_length))
        for (hyp,) in results:
            assert hyp.tokens[-1] == vocab.end_id
            assert 1 <= len(hyp.tokens) - 1 <= max_length  # words, END excluded
            assert hyp.alphas.shape == (len(hyp.tokens), L) and hyp.betas.shape == (len(hyp.tokens),)


def test_never_emits_pad_start_or_unk(peaky_decoder, vocab, features):
    with torch.no_grad():
        peaky_decoder.out_vocab.bias[list(vocab.blocked_ids)] += 100.0  # the model *wants* to say them
    for options in (
        DecodingOptions(),
        DecodingOptions(method="sample", num_captions=5, seed=0),
        DecodingOptions(method="beam", beam_size=4, num_captions=4),
    ):
        for hyps in generate(peaky_decoder, features, vocab, options):
            for h in hyps:
                assert not set(h.tokens) & set(vocab.blocked_ids)
                assert len(h.tokens) >= 2  # never an empty caption


def test_beam_size_one_equals_greedy(peaky_decoder, vocab, features):
    greedy = generate(peaky_decoder, features, vocab, DecodingOptions(method="greedy"))
    beam = generate(peaky_decoder, features, vocab, DecodingOptions(method="beam", beam_size=1, length_penalty=0.7))
    assert _tokens(beam) == _tokens(greedy)
    for g, b in zip(greedy, beam, strict=True):
        assert b[0].log_prob == pytest.approx(g[0].log_prob, abs=1e-4)
        torch.testing.assert_close(b[0].alphas, g[0].alphas)


def test_low_temperature_sampling_equals_greedy(peaky_decoder, vocab, features):
    greedy = generate(peaky_decoder, features, vocab, DecodingOptions())
    for temperature in (0.0, 1e-4):
        sampled = generate(peaky_decoder, features, vocab, DecodingOptions(method="sample", temperature=temperature))
        assert _tokens(sampled) == _tokens(greedy)


def test_top_k_one_equals_greedy(peaky_decoder, vocab, features):
    greedy = generate(peaky_decoder, features, vocab, DecodingOptions())
    sampled = generate(peaky_decoder, features, vocab, DecodingOptions(method="sample", top_k=1, seed=5))
    assert _tokens(sampled) == _tokens(greedy)


def test_tiny_top_p_equals_greedy(peaky_decoder, vocab, features):
    greedy = generate(peaky_decoder, features, vocab, DecodingOptions())
    sampled = generate(peaky_decoder, features, vocab, DecodingOptions(method="sample", top_p=1e-6, seed=5))
    assert _tokens(sampled) == _tokens(greedy)


def test_same_seed_same_samples_and_different_seeds_differ(vocab, features):
    torch.manual_seed(0)
    decoder = AttentionDecoder(tiny_config(len(vocab))).eval()  # flat distribution: samples vary a lot
    options = dict(method="sample", num_captions=3, max_length=8)
    a = generate(decoder, features, vocab, DecodingOptions(**options, seed=7))
    b = generate(decoder, features, vocab, DecodingOptions(**options, seed=7))
    c = generate(decoder, features, vocab, DecodingOptions(**options, seed=8))
    assert _tokens(a) == _tokens(b)
    assert _tokens(a) != _tokens(c)
    assert all(len(hyps) == 3 for hyps in a)
    assert len({tuple(h.tokens) for h in a[0]}) > 1  # N different captions for one image


def test_beams_sorted_by_score_and_n_best(peaky_decoder, vocab, features):
    results = generate(
        peaky_decoder, features, vocab, DecodingOptions(method="beam", beam_size=5, num_captions=5, length_penalty=0.5)
    )
    for hyps in results:
        assert 1 <= len(hyps) <= 5
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        for h in hyps:
            assert h.score == pytest.approx(h.log_prob / len(h.tokens) ** 0.5, rel=1e-5)
        assert len({tuple(h.tokens) for h in hyps}) == len(hyps)


def test_beam_search_finds_at_least_greedys_log_prob(peaky_decoder, vocab, features):
    greedy = generate(peaky_decoder, features, vocab, DecodingOptions())
    beam = generate(peaky_decoder, features, vocab, DecodingOptions(method="beam", beam_size=5))
    for g, b in zip(greedy, beam, strict=True):
        assert b[0].log_prob >= g[0].log_prob - 1e-4


def test_beam_search_survives_when_no_beam_ever_ends(vocab, features):
    """The classic crash: END never chosen within max_length. We force END and return full beams."""
    torch.manual_seed(0)
    decoder = AttentionDecoder(tiny_config(len(vocab))).eval()
    with torch.no_grad():
        decoder.out_vocab.bias[vocab.end_id] = -1e4  # the model never wants to stop
    results = generate(decoder, features, vocab, DecodingOptions(method="beam", beam_size=3, num_captions=3,
                                                                 max_length=7))
    for hyps in results:
        assert len(hyps) == 3
        for h in hyps:
            assert h.truncated and len(h.tokens) == 8 and h.tokens[-1] == vocab.end_id


def test_batch_and_single_image_decoding_agree(peaky_decoder, vocab, features):
    for options in (DecodingOptions(), DecodingOptions(method="beam", beam_size=3, num_captions=2)):
        batched = generate(peaky_decoder, features, vocab, options)
        for i in range(B):
            single = generate(peaky_decoder, features[i : i + 1], vocab, options)
            assert _tokens(single) == _tokens(batched[i : i + 1])
            for s, bt in zip(single[0], batched[i], strict=True):
                assert s.log_prob == pytest.approx(bt.log_prob, abs=1e-4)


def test_no_repeat_ngram_blocks_repeats(vocab, features):
    torch.manual_seed(0)
    decoder = AttentionDecoder(tiny_config(len(vocab))).eval()
    with torch.no_grad():
        decoder.out_vocab.bias[vocab.end_id] = -1e4
        decoder.out_vocab.bias[4] = 50.0  # the model loves one word: "a a a a ..."
    plain = generate(decoder, features, vocab, DecodingOptions(method="beam", beam_size=2, max_length=10))
    assert plain[0][0].tokens.count(4) > 2
    for options in (
        DecodingOptions(method="beam", beam_size=2, max_length=10, no_repeat_ngram_size=2),
        DecodingOptions(method="greedy", max_length=10, no_repeat_ngram_size=2),
        DecodingOptions(method="sample", max_length=10, no_repeat_ngram_size=2, num_captions=3, seed=0),
    ):
        for hyps in generate(decoder, features, vocab, options):
            for h in hyps:
                words = h.tokens[:-1]
                bigrams = list(zip(words, words[1:], strict=False))
                assert len(bigrams) == len(set(bigrams)), options.method
                assert len(words) == 10 and h.tokens[-1] == vocab.end_id  # blocking never stops END


def test_banned_ngram_tokens():
    assert _banned_ngram_tokens([5, 6, 5], 2) == {6}
    assert _banned_ngram_tokens([5, 6, 7], 2) == set()
    assert _banned_ngram_tokens([5, 5], 1) == {5}


def test_options_validate():
    with pytest.raises(ValueError):
        DecodingOptions(method="nucleus")
    with pytest.raises(ValueError):
        DecodingOptions(top_p=0)
    with pytest.raises(ValueError):
        DecodingOptions(method="beam", beam_size=2, num_captions=3)


def test_updated_widens_the_beam_only_when_beam_size_is_not_given():
    base = DecodingOptions(method="beam", beam_size=2)
    assert base.updated(num_captions=4).beam_size == 4
    assert base.updated(temperature=0.5) == DecodingOptions(method="beam", beam_size=2, temperature=0.5)
    with pytest.raises(ValueError, match="at most beam_size"):
        base.updated(beam_size=2, num_captions=4)
