import argparse
import math
import os
import signal
import sys
import time
from unittest.mock import patch

import pytest
import torch

from captioner import train
from captioner.checkpoint import load_checkpoint
from captioner.coco import collate_captions
from captioner.decoding import DecodingOptions, generate
from captioner.encoder import Encoder
from captioner.images import open_image
from captioner.model import AttentionDecoder, caption_loss
from captioner.train import Progress, noticing_ctrl_c
from captioner.vocab import Vocabulary
from tests.helpers import metrics_rows, save_tiny_checkpoint, tiny_config, train_args


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


def test_training_run_logs_perplexity_skips_corrupt_images_and_saves(tmp_path, coco_mini, caplog):
    out = tmp_path / "run"
    train.main(train_args(tmp_path, coco_mini, out, epochs=3))
    rows = metrics_rows(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isclose(r["train_perplexity"], math.exp(r["train_cross_entropy"]), rel_tol=1e-9)
        assert math.isclose(r["val_perplexity"], math.exp(r["val_cross_entropy"]), rel_tol=1e-9)
        assert {"BLEU-4", "CIDEr", "CHAIR-s", "CHAIR-i", "lr", "max_grad_norm_before_clip"} <= set(r)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert "skipping unreadable image" in caplog.text
    best = load_checkpoint(out / "best.pt")
    assert best.training is None and best.metrics["CIDEr"] == max(r["CIDEr"] for r in rows)
    assert load_checkpoint(out / "last.pt").training["epoch"] == 3
    assert (out / "training_curves.png").stat().st_size > 0 and (out / "train.log").exists()


def test_resume_continues_on_the_same_trajectory(tmp_path, coco_mini):
    """A run killed after an epoch's checkpoint and before its metrics row, then resumed, ends where one
    straight run does: the same weights and the same rows (last.pt carries the rows)."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train.main(train_args(tmp_path, coco_mini, straight, epochs=3))
    train.main(train_args(tmp_path, coco_mini, interrupted, epochs=2))  # "killed" after epoch 2
    metrics = interrupted / "metrics.jsonl"  # ... after last.pt was written, before epoch 2's row was
    metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])
    train.main(train_args(tmp_path, coco_mini, interrupted, epochs=3, resume=True))
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(interrupted / "last.pt")
    for (name, x), (_, y) in zip(a.decoder.state_dict().items(), b.decoder.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in metrics_rows(straight)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in metrics_rows(interrupted)]


def test_resume_refuses_a_different_encoder(tmp_path, coco_mini, vocab):
    from captioner.checkpoint import CheckpointError

    out = tmp_path / "run"
    out.mkdir()
    save_tiny_checkpoint(out / "last.pt", vocab, "efficientnet-lite0", image_size=64)  # as a lite0 run leaves it
    with pytest.raises(CheckpointError, match="efficientnet-lite0"):
        train.main(train_args(tmp_path, coco_mini, out, epochs=2, resume=True, encoder="efficientnet-lite2"))


def test_init_from_refuses_an_ensemble(tmp_path, coco_mini, vocab):
    from captioner.checkpoint import CheckpointError, ensemble_checkpoints, save_checkpoint

    members = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for seed, path in enumerate(members):
        save_tiny_checkpoint(path, vocab, "efficientnet-lite0", image_size=64, seed=seed)
    ensemble = ensemble_checkpoints(members)
    save_checkpoint(tmp_path / "ens.pt", ensemble.decoder, vocab, "efficientnet-lite0", ensemble.preprocessing)
    with pytest.raises(CheckpointError, match="is an ensemble"):
        train.main(train_args(tmp_path, coco_mini, tmp_path / "run", epochs=1, init_from=tmp_path / "ens.pt",
                              encoder="efficientnet-lite0"))


def test_training_step_clips_the_global_gradient_norm(vocab):
    """train_one_epoch's own clipping: with plain SGD (lr 1) the update *is* the clipped gradient, so its global
    L2 norm over all parameters must be at most --grad-clip, while the unclipped gradient is far larger."""
    features, captions = torch.randn(4, 10, 16) * 100, torch.randint(4, len(vocab), (4, 7))
    captions[:, 0] = vocab.start_id
    loader = [(features, captions)]

    def update_norm(grad_clip: float) -> tuple[float, float]:
        torch.manual_seed(0)
        decoder = AttentionDecoder(tiny_config(len(vocab)))
        before = [p.detach().clone() for p in decoder.parameters()]
        optimizer = torch.optim.SGD(decoder.parameters(), lr=1.0)
        args = argparse.Namespace(no_progress=True, attention_reg=1.0, label_smoothing=0.0, grad_clip=grad_clip)
        row = train.train_one_epoch(train.CaptionModel(decoder), loader, optimizer, args, epoch=1)
        step = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach() - b)
                                                     for p, b in zip(decoder.parameters(), before, strict=True)]))
        return float(step), row["max_grad_norm_before_clip"]

    clipped, norm_before = update_norm(grad_clip=0.5)
    unclipped, _ = update_norm(grad_clip=1e9)
    assert norm_before > 5 and unclipped == pytest.approx(norm_before, rel=1e-3)
    assert clipped == pytest.approx(0.5, rel=1e-3)  # scaled down to the bound, not zeroed or skipped


def test_fine_tuning_the_encoder_caches_its_frozen_part_validates_the_tuned_one_and_ships_its_weights(
    tmp_path, coco_mini
):
    from captioner.api import load_captioner
    from captioner.coco import load_coco_captions
    from captioner.evaluate import validate

    out = tmp_path / "tuned"
    train.main(train_args(tmp_path, coco_mini, out, epochs=1, fine_tune_blocks=1, encoder_lr=1e-2))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.encoder_state is not None
    torch.manual_seed(0)  # what train.main seeds before it builds the encoder
    fresh = Encoder("efficientnet-lite0", pretrained=False, image_size=64).cnn.state_dict()
    changed = [k for k, v in ckpt.encoder_state.items() if v.is_floating_point() and not torch.equal(v, fresh[k])]
    assert changed and all(k.startswith(("net._conv_head", "net._bn1")) for k in changed)  # only the last block
    # What is cached is the frozen blocks' output (the head's input), for the training and validation photos.
    caches = sorted(folder.name for folder in (tmp_path / "cache").iterdir())
    assert len(caches) == 2 and all("-frozen17-" in name for name in caches), caches
    captioner = load_captioner(out / "last.pt", pretrained_encoder=False)
    torch.testing.assert_close(captioner.encoder.cnn.state_dict()["net._conv_head.weight"],
                               ckpt.encoder_state["net._conv_head.weight"])

    # Validation saw the tuned encoder, not the one the run started from: the logged val cross-entropy is what
    # the saved checkpoint's whole encoder gives (the cached part is stored in float16), and the untuned one's
    # is another number.
    val = load_coco_captions(tmp_path / "data" / "captions_val.json", tmp_path / "data" / "val")

    def val_cross_entropy(encoder: Encoder) -> float:
        with torch.no_grad():
            grids = {r.image_id: encoder.eval()(captioner.preprocessing(open_image(r.path))[None])[0] for r in val}
        store = type("Store", (), {"has": lambda self, i: i in grids, "get": lambda self, i: grids[i]})()
        return validate(ckpt.decoder, val, store, ckpt.vocab)[0]["val_cross_entropy"]

    untuned = Encoder("efficientnet-lite0", pretrained=False, image_size=64)
    untuned.cnn.load_state_dict(fresh)
    logged = metrics_rows(out)[-1]["val_cross_entropy"]
    assert logged == pytest.approx(val_cross_entropy(captioner.encoder), rel=1e-4)  # 5.5937 here
    assert abs(val_cross_entropy(untuned) - logged) > 0.1  # 6.30 here

    # Both engines run the fine-tuned weights: ONNX Runtime exports its own graph of them (keyed by a hash of
    # the weights), gives eager torch's features and the same caption on a real photo, and not the features of
    # the encoder before fine-tuning.
    engines = {name: load_captioner(out / "last.pt", pretrained_encoder=False, engine=name, quantize_decoder=False,
                                    cache_dir=tmp_path / "graphs") for name in ("torch", "onnx")}
    photo = engines["torch"].open(coco_mini / "val" / "000000024585.jpg")
    features = {name: c.encode([photo]) for name, c in engines.items()}
    torch.testing.assert_close(features["onnx"], features["torch"], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        before = untuned(engines["torch"].preprocessing(photo)[None])
    assert before.shape == features["torch"].shape and (before - features["torch"]).abs().max() > 1e-2
    captions = {name: c.caption(photo, method="greedy").caption for name, c in engines.items()}
    assert captions["onnx"] == captions["torch"] and captions["torch"]


def test_a_ctrl_c_dropped_inside_a_destructor_still_stops_training():
    """Python drops a KeyboardInterrupt raised while a destructor runs; training must stop at the next batch."""

    class InterruptedWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands while this destructor runs
            time.sleep(0.2)

    progress = Progress()
    dropped = []  # what Python reports as "Exception ignored in ...", kept here instead of pytest's warning
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (CI may ignore it)
    try:
        with (pytest.raises(KeyboardInterrupt), noticing_ctrl_c(progress),
              patch.object(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))):
            victim = InterruptedWhileCollected()
            del victim
            assert dropped == [KeyboardInterrupt]  # the interrupt is gone ...
            assert progress.ctrl_c  # ... and training knows of it all the same
            for _ in progress.count([1, 2, 3]):
                pytest.fail("a batch was handed out after Ctrl-C")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_a_ctrl_c_while_last_pt_and_the_metrics_row_are_written_waits_for_both():
    progress, written = Progress(), []
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), noticing_ctrl_c(progress), progress.uninterrupted():
            written.append("last.pt")
            signal.raise_signal(signal.SIGINT)
            written.append("metrics row")
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert written == ["last.pt", "metrics row"]

