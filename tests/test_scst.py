"""Self-critical sequence training: the CIDEr-D reward, the loss, the log-probabilities, a real training stage."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from pycocoevalcap.cider.cider import Cider

from captioner import scst, train
from captioner.checkpoint import load_checkpoint
from captioner.cider import CiderD
from captioner.coco import ImageRecord
from captioner.decoding import DecodingOptions, allowed_logits, generate
from captioner.hallucination import reference_objects
from captioner.model import AttentionDecoder
from captioner.vocab import Vocabulary, tokenize
from tests.helpers import metrics_rows, save_tiny_checkpoint, tiny_config, train_args


def _val_references(coco_mini, n_images):
    data = json.loads((coco_mini / "annotations" / "captions_val.json").read_text())
    refs: dict[int, list[str]] = {}
    for a in data["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    return {i: refs[i] for i in sorted(refs)[:n_images]}


def test_cider_d_reward_matches_pycocoevalcap_on_the_same_captions(coco_mini):
    """Same references for the document frequencies -> the same per-image scores as pycocoevalcap's CIDEr-D,
    for good, bad, repeated and empty-ish candidates."""
    refs = _val_references(coco_mini, 30)
    ids = list(refs)
    gts = {i: [" ".join(tokenize(c)) for c in refs[i][:4]] for i in ids}
    candidates = ["a man riding a a horse on the street", "a a a a", "dog", "a kitchen with a stove and a sink"]
    res = {i: [" ".join(tokenize(refs[i][4]))] if k % 2 else [candidates[k % 4]] for k, i in enumerate(ids)}
    expected_mean, expected = Cider().compute_score(gts, res)
    cider = CiderD([[c.split() for c in gts[i]] for i in ids])
    ours = [cider.score(res[i][0].split(), [c.split() for c in gts[i]]) for i in ids]
    assert ours == pytest.approx(list(expected), abs=1e-9)
    assert sum(ours) / len(ours) == pytest.approx(expected_mean, abs=1e-9)
    assert max(ours) > 0.5  # the held-out human captions score well: the test is not comparing zeros
    prepared = cider.prepare([c.split() for c in gts[ids[0]]])
    assert cider.score(res[ids[0]][0].split(), prepared) == pytest.approx(expected[0], abs=1e-9)


def test_scst_loss_favours_captions_that_beat_the_baseline():
    log_probs = torch.tensor([[-1.0, -2.0], [-1.5, -0.5]], requires_grad=True)  # (N, T)
    mask = torch.ones(2, 2, dtype=torch.bool)
    advantage = torch.tensor([0.7, -0.4])  # caption 0 beat its baseline, caption 1 did not
    scst.scst_loss(log_probs, mask, advantage, normalizer=4.0).backward()
    # Gradient descent moves log p against the gradient: up for caption 0, down for caption 1.
    assert (log_probs.grad[0] < 0).all() and (log_probs.grad[1] > 0).all()
    # And concretely: making the better caption more likely lowers the loss.
    with torch.no_grad():
        before = scst.scst_loss(log_probs, mask, advantage, 4.0)
        raised = log_probs.clone()
        raised[0] += 0.1
        assert scst.scst_loss(raised, mask, advantage, 4.0) < before
        raised_worse = log_probs.clone()
        raised_worse[1] += 0.1
        assert scst.scst_loss(raised_worse, mask, advantage, 4.0) > before
    # Padding never counts.
    padded_mask = torch.tensor([[True, False], [True, True]])
    grad = torch.autograd.grad(scst.scst_loss(log_probs, padded_mask, advantage, 3.0), log_probs)[0]
    assert grad[0, 1] == 0


def _sampler_log_probs(decoder, features: torch.Tensor, captions: torch.Tensor, vocab, max_length: int):
    """Step by step, the log-probability of each sampled word under the distribution the sampler drew from:
    the model's logits with the sampler's masks (blocked tokens, no END first, END forced at max_length)."""
    state, total = decoder.init_state(features), torch.zeros(captions.size(0))
    for t in range(captions.size(1) - 1):
        logits, _, state = decoder.step(state, captions[:, t])
        log_p = F.log_softmax(allowed_logits(logits, vocab, t, max_length), dim=-1)
        target = captions[:, t + 1]
        total += torch.where(target != vocab.pad_id, log_p.gather(1, target.unsqueeze(1)).squeeze(1), 0.0)
    return total


@torch.no_grad()
def test_rescored_log_probs_are_the_samplers(vocab):
    """The gradient pass must score the very distribution the sampler drew from (blocked tokens, no END first,
    END forced at max_length), or REINFORCE optimises the wrong thing."""
    torch.manual_seed(0)
    decoder = AttentionDecoder(tiny_config(len(vocab))).eval()
    features = torch.randn(3, 7, 16)
    for max_length in (3, 12):
        options = DecodingOptions(method="sample", num_captions=4, seed=1, max_length=max_length)
        hyps = [h for image in generate(decoder, features, vocab, options) for h in image]
        captions = scst.captions_tensor(hyps, vocab, features.device)
        repeated = features.repeat_interleave(4, dim=0)
        logits = decoder(repeated, captions).logits
        token_log_probs, mask = scst.sequence_log_probs(logits, captions, vocab, max_length)
        assert mask.sum(1).tolist() == [len(h.tokens) for h in hyps]
        expected = _sampler_log_probs(decoder, repeated, captions, vocab, max_length)
        torch.testing.assert_close(token_log_probs.sum(1), expected, atol=1e-4, rtol=1e-4)
        assert torch.isfinite(token_log_probs).all()
        # At max_length END is the only choice: the sampler's probability of it is 1, not the model's own.
        forced = [row for row, h in enumerate(hyps) if h.truncated]
        assert forced or max_length > 3  # 3 words are too few for this model to end on its own
        assert all(abs(float(token_log_probs[row, max_length])) < 1e-6 for row in forced)


class _MemoryStore:
    def __init__(self, features: dict[int, torch.Tensor]):
        self.features = features

    def has(self, image_id: int) -> bool:
        return image_id in self.features

    def get(self, image_id: int) -> torch.Tensor:
        return self.features[image_id]


@pytest.mark.parametrize("baseline", ["greedy", "mean"])
def test_scst_raises_the_cider_reward_of_samples(baseline):
    """A few SCST epochs on 4 'images' with distinct captions: the mean CIDEr-D of sampled captions rises."""
    captions = ["a dog runs on the grass", "a red bus on a city street", "two people ride horses on a beach",
                "a plate of food with broccoli"]
    vocab = Vocabulary.build(captions, min_count=1)
    torch.manual_seed(0)
    records = [ImageRecord(i, None, (c,)) for i, c in enumerate(captions)]  # type: ignore[arg-type]
    store = _MemoryStore({i: torch.randn(5, 16) for i in range(4)})
    images = scst.ScstImageDataset(records, store)
    cider, references = scst.reward_scorer(images.records)
    decoder = AttentionDecoder(tiny_config(len(vocab), dropout=0.0))
    model = train.CaptionModel(decoder)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    args = argparse.Namespace(scst_samples=6, scst_baseline=baseline, scst_max_length=8, scst_dropout=False,
                              grad_clip=5.0, no_progress=True)
    loader = torch.utils.data.DataLoader(images, batch_size=4, collate_fn=scst.collate_images)
    rewards = [scst.train_one_epoch(model, loader, references, cider, vocab, optimizer, args, e)
               ["train_reward_CIDEr"] for e in range(40)]
    assert sum(rewards[-5:]) > 1.6 * sum(rewards[:5]), rewards


def test_scst_needs_a_trained_model_to_start_from(tmp_path, coco_mini):
    with pytest.raises(SystemExit, match="--init-from"):
        train.main(train_args(tmp_path, coco_mini, tmp_path / "scst", epochs=1, scst=True))
    with pytest.raises(SystemExit, match="needs --scst"):
        train.main(train_args(tmp_path, coco_mini, tmp_path / "xe", epochs=1, scst_hallucination_penalty=1.0))


def test_scst_stage_runs_resumes_and_logs_rewards(tmp_path, coco_mini):
    """`captioner train --scst --init-from`: the CLI path end to end on real COCO captions."""
    xe = tmp_path / "xe"
    train.main(train_args(tmp_path, coco_mini, xe, epochs=2))
    straight, interrupted = tmp_path / "scst", tmp_path / "scst-killed"
    common = dict(scst=True, init_from=xe / "best.pt", batch_size=4, lr=None)
    train.main(train_args(tmp_path, coco_mini, straight, epochs=2, **common))
    rows = metrics_rows(straight)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["train_reward_CIDEr"] and 0 <= r["train_baseline_CIDEr"] and "CIDEr" in r
        assert r["train_invented_objects_per_sample"] >= 0  # logged by every SCST run
    assert rows[0]["lr"] == 1e-5  # the SCST default learning rate
    train.main(train_args(tmp_path, coco_mini, interrupted, epochs=1, **common))
    train.main(train_args(tmp_path, coco_mini, interrupted, epochs=2, resume=True, **common))
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in metrics_rows(interrupted)]


def test_scst_fine_tunes_the_encoder_from_a_fine_tuned_checkpoint(tmp_path, coco_mini):
    """Fine-tuning, then SCST with the same blocks tuned: the stage trains them (and only them) on the cached
    frozen part. Starting from that checkpoint without --fine-tune-blocks is refused: the frozen-encoder
    feature cache would serve the wheel's features, not the checkpoint's."""
    tuned = tmp_path / "tuned"
    train.main(train_args(tmp_path, coco_mini, tuned, epochs=1, fine_tune_blocks=1, encoder_lr=1e-2))
    common = dict(scst=True, init_from=tuned / "best.pt", batch_size=4, lr=1e-4, epochs=1)
    train.main(train_args(tmp_path, coco_mini, tmp_path / "scst", fine_tune_blocks=1, encoder_lr=1e-2, **common))
    before, after = load_checkpoint(tuned / "best.pt"), load_checkpoint(tmp_path / "scst" / "last.pt")
    changed = {k for k, v in after.encoder_state.items() if not torch.equal(v, before.encoder_state[k])}
    assert changed and all(k.startswith(("net._conv_head", "net._bn1")) for k in changed)
    assert metrics_rows(tmp_path / "scst")[0]["train_reward_CIDEr"] >= 0
    with pytest.raises(SystemExit, match="fine-tuned encoder"):
        train.main(train_args(tmp_path, coco_mini, tmp_path / "frozen", **common))


def test_scst_mirrored_views_are_scored_against_mirrored_references():
    captions = ["a dog on the left of a red car", "a man holds a cup in his right hand"]
    records = [ImageRecord(i, None, (c,)) for i, c in enumerate(captions)]  # type: ignore[arg-type]
    original = _MemoryStore({i: torch.zeros(3, 4) for i in range(2)})
    mirrored = _MemoryStore({i: torch.ones(3, 4) for i in range(2)})
    images = scst.ScstImageDataset(records, original, [("flip", mirrored)], seed=0)
    seen = set()
    for epoch in range(8):
        images.set_epoch(epoch)
        for index in range(len(images)):
            features, i, is_mirrored = images[index]
            assert i == index and bool(features.mean() == 1.0) == is_mirrored  # the flag names the view read
            seen.add(is_mirrored)
    assert seen == {False, True}
    cider, references = scst.reward_scorer(images.records)
    as_written, swapped = tokenize(captions[0]), tokenize(captions[0].replace("left", "right"))
    assert cider.score(swapped, references[0][True]) > cider.score(as_written, references[0][True])
    assert cider.score(as_written, references[0][False]) > cider.score(swapped, references[0][False])


def test_scst_dropout_is_refused_for_hard_attention(tmp_path, coco_mini, vocab):
    """Sampling and re-scoring would draw different attention locations: not the sampled captions' gradient."""
    hard = tmp_path / "hard.pt"
    save_tiny_checkpoint(hard, vocab, image_size=64, attention="hard")
    with pytest.raises(SystemExit, match="--scst-dropout"):
        train.main(train_args(tmp_path, coco_mini, tmp_path / "scst", epochs=1, scst=True, init_from=hard,
                              scst_dropout=True, lr=None))
    assert not (tmp_path / "scst" / "last.pt").exists()  # refused before any training


def test_invented_objects_counts_mentions_no_reference_names():
    truth = reference_objects(["A man rides a horse on the beach.", "A person on a brown horse."])
    assert truth == {"person", "horse"}
    assert scst.invented_objects(tokenize("a woman riding horses on a beach"), truth) == 0  # synonyms, plurals
    assert scst.invented_objects(tokenize("a man and a dog with a frisbee"), truth) == 2
    assert scst.invented_objects(tokenize("a motorbike and a bike"), truth) == 2  # motorcycle and bicycle


def test_the_hallucination_penalty_makes_samples_invent_fewer_objects():
    """The same toy SCST run with and without the penalty: each image's references name one object, the
    vocabulary holds the others' objects too. With the penalty the samples name fewer objects their image lacks."""
    captions = ["a dog on the grass", "a bus on the street", "a horse on the beach", "a pizza on the table"]
    vocab = Vocabulary.build(captions, min_count=1)
    records = [ImageRecord(i, None, (c,)) for i, c in enumerate(captions)]  # type: ignore[arg-type]
    invented = {}
    for penalty in (0.0, 2.0):
        torch.manual_seed(0)
        store = _MemoryStore({i: torch.randn(5, 16) for i in range(4)})
        images = scst.ScstImageDataset(records, store)
        cider, references = scst.reward_scorer(images.records)
        truths = [reference_objects(r.captions) for r in images.records]
        decoder = AttentionDecoder(tiny_config(len(vocab), dropout=0.0))
        optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
        args = argparse.Namespace(scst_samples=6, scst_baseline="mean", scst_max_length=8, scst_dropout=False,
                                  grad_clip=5.0, no_progress=True, scst_hallucination_penalty=penalty)
        loader = torch.utils.data.DataLoader(images, batch_size=4, collate_fn=scst.collate_images)
        rows = [scst.train_one_epoch(train.CaptionModel(decoder), loader, references, cider, vocab, optimizer, args,
                                     e, truths=truths) for e in range(20)]
        invented[penalty] = sum(r["train_invented_objects_per_sample"] for r in rows)
    # Measured: 35.4 invented objects per sample summed over 20 epochs without the penalty, 11.9 with it.
    assert invented[2.0] < 0.7 * invented[0.0], invented
    with pytest.raises(ValueError, match="reference objects"):
        scst.train_one_epoch(train.CaptionModel(decoder), loader, references, cider, vocab, optimizer, args, 0)

