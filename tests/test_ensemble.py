"""Ensembles decode as one model: on the real shipped model's decoder(s) and real photos."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from captioner.api import load_captioner
from captioner.checkpoint import CheckpointError, ensemble_checkpoints, load_checkpoint, save_checkpoint
from captioner.cli import main
from captioner.decoding import DecodingOptions, generate
from captioner.ensemble import EnsembleDecoder
from captioner.images import open_image
from captioner.model import AttentionDecoder
from captioner.vocab import Vocabulary
from tests.helpers import tiny_config

OPTIONS = [
    DecodingOptions(),
    DecodingOptions(no_repeat_ngram_size=2),
    DecodingOptions(method="beam", beam_size=3, num_captions=2, length_penalty=0.5, no_repeat_ngram_size=2),
    DecodingOptions(method="sample", num_captions=2, seed=3, top_p=0.9),
]
IDS = ["greedy", "greedy-blocking", "beam", "sample"]


@pytest.fixture(scope="module")
def shipped(shipped_checkpoint):
    return load_checkpoint(shipped_checkpoint)


@pytest.fixture(scope="module")
def member(shipped) -> AttentionDecoder:
    decoder = shipped.decoder.members[0] if shipped.is_ensemble else shipped.decoder
    return decoder.eval()


@pytest.fixture(scope="module")
def other_member(member) -> AttentionDecoder:
    """A second decoder over the same backbone and vocabulary: the shipped one with its weights perturbed."""
    other = copy.deepcopy(member)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            if p.numel() > 1:
                p.add_(0.05 * p.std() * torch.randn(p.shape, generator=generator))
    return other.eval()


@pytest.fixture(scope="module")
def features(shipped_checkpoint, coco_mini):
    captioner = load_captioner(shipped_checkpoint)
    photos = sorted((coco_mini / "val").glob("*.jpg"))[:6]
    return captioner.encode([open_image(p) for p in photos])


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_an_ensemble_of_one_equals_its_member(member, shipped, features, options):
    alone = generate(member, features, shipped.vocab, options)
    ensemble = generate(EnsembleDecoder([member]).eval(), features, shipped.vocab, options)
    for a, e in zip(alone, ensemble, strict=True):
        assert [h.tokens for h in e] == [h.tokens for h in a]
        assert [h.log_prob for h in e] == pytest.approx([h.log_prob for h in a], abs=1e-4)
        for ha, he in zip(a, e, strict=True):
            torch.testing.assert_close(he.alphas, ha.alphas)
            torch.testing.assert_close(he.betas, ha.betas)


@torch.no_grad()
def test_a_step_averages_the_members_log_probabilities_alphas_and_betas(member, other_member, features):
    ensemble = EnsembleDecoder([member, other_member]).eval()
    tokens = torch.ones(features.size(0), dtype=torch.long)  # START
    log_p, alpha, state = ensemble.step(ensemble.init_state(features), tokens)
    outputs = [m.step(m.init_state(features), tokens) for m in (member, other_member)]
    expected = torch.stack([F.log_softmax(logits, dim=-1) for logits, _, _ in outputs]).mean(dim=0)
    torch.testing.assert_close(log_p, expected)
    torch.testing.assert_close(alpha, torch.stack([a for _, a, _ in outputs]).mean(dim=0))
    torch.testing.assert_close(state.beta, torch.stack([s.beta for _, _, s in outputs]).mean(dim=0))
    assert not torch.equal(outputs[0][0], outputs[1][0])  # the members really differ


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_ensemble_decoding_invariants(member, other_member, shipped, features, options):
    ensemble = EnsembleDecoder([member, other_member]).eval()
    vocab = shipped.vocab
    results = generate(ensemble, features, vocab, options)
    for i, hyps in enumerate(results):
        assert 1 <= len(hyps) <= options.num_captions
        for h in hyps:
            assert h.tokens[-1] == vocab.end_id and len(h.tokens) >= 2
            assert not set(h.tokens) & set(vocab.blocked_ids)
            assert h.alphas.shape == (len(h.tokens), features.size(1))
            torch.testing.assert_close(h.alphas.sum(dim=1), torch.ones(len(h.tokens)))
            assert bool(((h.betas > 0) & (h.betas < 1)).all())
        single = generate(ensemble, features[i : i + 1], vocab, options)[0]
        if options.method != "sample":  # a sample's random numbers depend on the batch
            assert [h.tokens for h in single] == [h.tokens for h in hyps]
    if options.method == "greedy":
        beam = generate(ensemble, features, vocab, DecodingOptions(
            method="beam", beam_size=1, no_repeat_ngram_size=options.no_repeat_ngram_size))
        assert [b[0].tokens for b in beam] == [r[0].tokens for r in results]


def test_export_ensemble_round_trip_and_load_captioner(tmp_path, member, other_member, shipped, coco_mini):
    paths = []
    for k, decoder in enumerate((member, other_member)):
        paths.append(tmp_path / f"seed{k}.pt")
        save_checkpoint(paths[-1], decoder, shipped.vocab, shipped.encoder_name, shipped.preprocessing)
    out = tmp_path / "ensemble.pt"
    assert main(["export", "--ensemble", *map(str, paths), "-o", str(out), "--half"]) == 0
    loaded = load_captioner(out)
    assert isinstance(loaded.decoder, EnsembleDecoder) and len(loaded.decoder.members) == 2
    in_memory = ensemble_checkpoints(paths)
    photo = coco_mini / "val" / "000000024585.jpg"
    features = loaded.encode([open_image(photo)])
    options = DecodingOptions(method="beam", beam_size=2, no_repeat_ngram_size=2)
    from_file = generate(loaded.decoder, features, loaded.vocab, options)
    from_memory = generate(in_memory.decoder.eval(), features, loaded.vocab, options)
    assert from_file[0][0].tokens == from_memory[0][0].tokens  # fp16 storage keeps the caption
    assert loaded.caption([photo])[0].caption  # the whole pipeline runs on an ensemble file


def test_ensembles_refuse_members_that_do_not_fit(tmp_path, member, shipped, train_records):
    good = tmp_path / "good.pt"
    save_checkpoint(good, member, shipped.vocab, shipped.encoder_name, shipped.preprocessing)
    other_vocab = tmp_path / "other-vocab.pt"
    vocab = Vocabulary.build((c for r in train_records[:50] for c in r.captions), min_count=1)
    assert vocab != shipped.vocab
    decoder = AttentionDecoder(tiny_config(len(vocab), feature_dim=member.config.feature_dim))
    save_checkpoint(other_vocab, decoder, vocab, shipped.encoder_name, shipped.preprocessing)
    with pytest.raises(CheckpointError, match="vocabulary or encoder differ"):
        ensemble_checkpoints([good, other_vocab])
    with pytest.raises(SystemExit, match="--ensemble"):
        main(["export", str(good), str(good), "-o", str(tmp_path / "x.pt")])


def test_the_int8_cpu_decoder_quantizes_every_member(member, other_member, shipped, features):
    from captioner.int8_decoder import Int8LstmDecoder, quantize_decoder_for_cpu

    quantized = quantize_decoder_for_cpu(EnsembleDecoder([member, other_member]))
    assert all(isinstance(m, Int8LstmDecoder) for m in quantized.members)  # the regrouped int8 step, each
    for hyps in generate(quantized, features, shipped.vocab, DecodingOptions(method="beam", beam_size=2)):
        assert hyps[0].tokens[-1] == shipped.vocab.end_id


@torch.no_grad()
def test_teacher_forced_perplexity_of_an_ensemble_of_one_is_its_members(member, shipped, features):
    from captioner.evaluate import reference_cross_entropy

    references = [["a man riding a horse on a beach", "two dogs play in the snow"]] * features.size(0)
    alone = reference_cross_entropy(member, features, references, shipped.vocab)
    ensemble = reference_cross_entropy(EnsembleDecoder([member]).eval(), features, references, shipped.vocab)
    assert ensemble[1] == alone[1] and ensemble[0] == pytest.approx(alone[0], abs=1e-4)
