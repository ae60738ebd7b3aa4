import json
import math

import torch

from captioner import train
from captioner.checkpoint import load_checkpoint
from captioner.coco import collate_captions
from captioner.decoding import DecodingOptions, generate
from captioner.encoder import Encoder
from captioner.images import open_image
from captioner.model import AttentionDecoder, caption_loss
from captioner.vocab import Vocabulary
from tests.conftest import tiny_config
from tests.helpers import write_coco_subset


def test_tiny_model_memorises_real_coco_captions(train_records):
    """Overfit: 4 real photos, one real caption each; greedy decoding must give back each caption."""
    torch.manual_seed(0)
    records = train_records[:4]
    captions = [r.captions[0] for r in records]
    vocab = Vocabulary.build(captions, min_count=1)
    encoder = Encoder("efficientnet-lite0", pretrained=False, image_size=64).eval()
    with torch.no_grad():
        features = encoder(torch.stack([encoder.preprocessing(open_image(r.path)) for r in records]))  # (4, 4, 1280)
    decoder = AttentionDecoder(tiny_config(len(vocab), feature_dim=1280, hidden_dim=64))
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    batch = collate_captions([(f, torch.tensor(vocab.encode(c))) for f, c in zip(features, captions, strict=True)])
    for _ in range(300):
        out = decoder(*batch)
        loss, ce = caption_loss(out.logits, batch[1], out.alphas, attention_reg=0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(ce) < 0.05
    decoded = generate(decoder.eval(), features, vocab, DecodingOptions(max_length=30))
    assert [vocab.decode(h[0].tokens) for h in decoded] == [" ".join(vocab.decode_words(vocab.encode(c)))
                                                            for c in captions]


def _args(tmp_path, coco_mini, out, epochs, **overrides):
    data = tmp_path / "data"
    if not data.exists():
        write_coco_subset(coco_mini, "train", 8, data, corrupt=1)
        write_coco_subset(coco_mini, "val", 3, data)
    argv = [
        "--train-images", str(data / "train"), "--train-captions", str(data / "captions_train.json"),
        "--val-images", str(data / "val"), "--val-captions", str(data / "captions_val.json"),
        "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"),
        "--random-encoder", "--image-size", "64", "--min-word-count", "1",
        "--embed-dim", "16", "--hidden-dim", "32", "--attention-dim", "16", "--dropout", "0.3",
        "--batch-size", "8", "--epochs", str(epochs), "--lr", "3e-3", "--no-progress", "--patience", "100",
        "--device", "cpu",
    ]
    args = train.get_args_parser().parse_args(argv)
    vars(args).update(overrides)
    return args


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_run_logs_perplexity_skips_corrupt_images_and_saves(tmp_path, coco_mini, caplog):
    out = tmp_path / "run"
    train.main(_args(tmp_path, coco_mini, out, epochs=3))
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isclose(r["train_perplexity"], math.exp(r["train_cross_entropy"]), rel_tol=1e-9)
        assert math.isclose(r["val_perplexity"], math.exp(r["val_cross_entropy"]), rel_tol=1e-9)
        assert {"BLEU-4", "CIDEr", "lr", "max_grad_norm_before_clip"} <= set(r)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert "skipping unreadable image" in caplog.text
    best = load_checkpoint(out / "best.pt")
    assert best.training is None and best.metrics["CIDEr"] == max(r["CIDEr"] for r in rows)
    assert load_checkpoint(out / "last.pt").training["epoch"] == 3
    assert (out / "training_curves.png").stat().st_size > 0 and (out / "train.log").exists()


def test_resume_continues_on_the_same_trajectory(tmp_path, coco_mini):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train.main(_args(tmp_path, coco_mini, straight, epochs=3))
    train.main(_args(tmp_path, coco_mini, interrupted, epochs=2))  # "killed" after epoch 2
    train.main(_args(tmp_path, coco_mini, interrupted, epochs=3, resume=True))
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(interrupted / "last.pt")
    for (name, x), (_, y) in zip(a.decoder.state_dict().items(), b.decoder.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(straight)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(interrupted)]


def test_resume_refuses_a_different_encoder(tmp_path, coco_mini):
    out = tmp_path / "run"
    train.main(_args(tmp_path, coco_mini, out, epochs=1))
    import pytest

    from captioner.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="efficientnet-lite0"):
        train.main(_args(tmp_path, coco_mini, out, epochs=2, resume=True, encoder="efficientnet-lite2"))


def test_fine_tuning_the_encoder_bypasses_the_cache_and_ships_its_weights(tmp_path, coco_mini):
    from captioner.api import load_captioner

    out = tmp_path / "tuned"
    train.main(_args(tmp_path, coco_mini, out, epochs=1, fine_tune_blocks=1, encoder_lr=1e-2))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.encoder_state is not None
    torch.manual_seed(0)  # what train.main seeds before it builds the encoder
    fresh = Encoder("efficientnet-lite0", pretrained=False, image_size=64).cnn.state_dict()
    changed = [k for k, v in ckpt.encoder_state.items() if v.is_floating_point() and not torch.equal(v, fresh[k])]
    assert changed and all(k.startswith(("net._conv_head", "net._bn1")) for k in changed)  # only the last block
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the validation cache only: training bypasses it
    captioner = load_captioner(out / "last.pt", pretrained_encoder=False)
    torch.testing.assert_close(captioner.encoder.cnn.state_dict()["net._conv_head.weight"],
                               ckpt.encoder_state["net._conv_head.weight"])
