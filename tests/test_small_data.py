"""Small-data levers: caption LM pretraining, the semantic (class-probability) input, checkpoint averaging."""

import math

import torch

from captioner import lm
from captioner.checkpoint import load_checkpoint
from captioner.coco import load_caption_texts
from captioner.model import AttentionDecoder
from tests.helpers import tiny_config


def test_lm_pretraining_lowers_perplexity_on_held_out_caption_text(coco_mini, tmp_path):
    """Pretrain on COCO caption text (no photos); the coco-mini *val* captions were never seen by it."""
    text = tmp_path / "text.json"
    full = (coco_mini / "annotations" / "captions_text_only.json").read_text()
    import json

    data = json.loads(full)
    data["annotations"] = data["annotations"][:4000]
    text.write_text(json.dumps(data))
    args = lm.get_args_parser().parse_args([
        "--text", str(text), "--output-dir", str(tmp_path / "lm"), "--epochs", "2", "--embed-dim", "32",
        "--hidden-dim", "64", "--attention-dim", "16", "--dropout", "0.1", "--min-word-count", "3",
        "--batch-size", "64", "--lr", "3e-3", "--no-progress", "--device", "cpu",
    ])
    lm.main(args)
    pretrained = load_checkpoint(tmp_path / "lm" / "lm.pt")
    vocab = pretrained.vocab
    held_out = [vocab.encode(c) for c in load_caption_texts(coco_mini / "annotations" / "captions_val.json")]
    torch.manual_seed(0)
    fresh = AttentionDecoder(pretrained.config)
    ppl_fresh = math.exp(lm.lm_epoch(fresh, held_out, None, 64))
    ppl_pretrained = math.exp(lm.lm_epoch(pretrained.decoder, held_out, None, 64))
    assert ppl_pretrained < 0.25 * ppl_fresh, (ppl_pretrained, ppl_fresh)
    assert ppl_pretrained < 80


def test_semantic_input_has_class_probabilities_and_can_be_switched_off():
    on = AttentionDecoder(tiny_config(30, feature_dim=16, semantic_classes=10)).eval()
    features = torch.randn(3, 5, 16)
    probs = on.semantic_input(features)
    assert probs.shape == (3, 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    assert on.init_h.in_features == 16 + 10
    assert not on.class_head.weight.requires_grad  # a frozen copy of the backbone's classifier
    with torch.no_grad():
        on.class_head.weight.zero_()
        on.class_head.bias.copy_(torch.arange(10.0) * 5)
    h_a = on.init_state(features).h
    with torch.no_grad():
        on.class_head.bias.copy_(-torch.arange(10.0) * 5)  # different "classes in the photo"
    assert not torch.allclose(h_a, on.init_state(features).h)  # h0 depends on the class probabilities

    off = AttentionDecoder(tiny_config(30, feature_dim=16))
    assert not hasattr(off, "class_head") and off.init_h.in_features == 16


def test_flipped_view_swaps_left_and_right_in_its_captions(train_records):
    from captioner.coco import CaptionDataset, ImageRecord, flip_caption
    from captioner.vocab import Vocabulary

    vocab = Vocabulary.build(["a man on the left of a dog", "right"], min_count=1)

    assert flip_caption("A dog on the Left of a man, right?") == "A dog on the right of a man, left?"
    assert flip_caption("leftover bright lights") == "leftover bright lights"  # whole words only

    class Store:
        def __init__(self, value):
            self.value = value

        def has(self, image_id):
            return True

        def get(self, image_id):
            return torch.full((2, 3), self.value)

    record = ImageRecord(1, train_records[0].path, ("a man on the left of a dog",))
    dataset = CaptionDataset([record], Store(0.0), vocab, views=[("flip", Store(1.0))], seed=0)
    seen = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        features, ids = dataset[0]
        words = vocab.decode(ids)
        if features[0, 0] == 1.0:  # the mirrored photo
            assert words == "a man on the right of a dog"
        else:
            assert words == "a man on the left of a dog"
        seen.add(float(features[0, 0]))
    assert seen == {0.0, 1.0}  # both views are used across epochs


def test_semantic_input_can_be_added_on_top_of_a_language_model():
    from captioner.train import _with_semantic_input

    lm_decoder = AttentionDecoder(tiny_config(30, feature_dim=16))
    widened = _with_semantic_input(lm_decoder, classes=10)
    assert widened.config.semantic_classes == 10 and widened.init_h.in_features == 26
    torch.testing.assert_close(widened.embedding.weight, lm_decoder.embedding.weight)
    torch.testing.assert_close(widened.cells[0].weight_hh, lm_decoder.cells[0].weight_hh)


def _saved_decoder(path, vocab, seed, **overrides):
    from captioner.checkpoint import save_checkpoint
    from captioner.encoder import Preprocessing

    torch.manual_seed(seed)
    decoder = AttentionDecoder(tiny_config(len(vocab), feature_dim=1280, **overrides))
    save_checkpoint(path, decoder, vocab, "efficientnet-lite0", Preprocessing())
    return decoder


def test_checkpoint_averaging_is_the_elementwise_mean_and_refuses_other_models(tmp_path, vocab):
    import pytest

    from captioner.checkpoint import CheckpointError, average_checkpoints
    from captioner.cli import main as cli_main

    a = _saved_decoder(tmp_path / "a.pt", vocab, seed=0)
    b = _saved_decoder(tmp_path / "b.pt", vocab, seed=1)
    assert cli_main(["average", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "-o", str(tmp_path / "m.pt")]) == 0
    mean = load_checkpoint(tmp_path / "m.pt").decoder.state_dict()
    for name, value in a.state_dict().items():
        torch.testing.assert_close(mean[name], (value + b.state_dict()[name]) / 2)
    _saved_decoder(tmp_path / "gru.pt", vocab, seed=2, cell="gru")
    with pytest.raises(CheckpointError, match="cannot be averaged"):
        average_checkpoints([tmp_path / "a.pt", tmp_path / "gru.pt"])


def test_training_keeps_the_n_best_epochs_and_validates_their_average(tmp_path, coco_mini):
    from captioner import train
    from tests.helpers import metrics_rows, train_args

    out = tmp_path / "run"
    train.main(train_args(tmp_path, coco_mini, out, epochs=4, average_best=2, lr=1e-2))
    rows = metrics_rows(out)
    ranked = sorted(rows, key=lambda r: (-r["CIDEr"], r["epoch"]))[:2]
    kept = sorted((out / "top-epochs").iterdir())
    assert [p.name for p in kept] == [f"epoch-{r['epoch']:03d}.pt" for r in sorted(ranked, key=lambda r: r["epoch"])]
    averaged = load_checkpoint(out / "averaged.pt")
    assert averaged.metrics["averaged_epochs"] == sorted(r["epoch"] for r in ranked)
    assert {"CIDEr", "BLEU-4", "val_perplexity"} <= set(averaged.metrics)
    states = [load_checkpoint(p).decoder.state_dict() for p in kept]
    for name, value in averaged.decoder.state_dict().items():
        torch.testing.assert_close(value, (states[0][name] + states[1][name]) / 2)
