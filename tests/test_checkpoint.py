import pickle

import pytest
import torch

from captioner.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint, save_checkpoint
from captioner.encoder import Preprocessing
from captioner.model import AttentionDecoder
from captioner.vocab import Vocabulary
from tests.helpers import tiny_config

PRE = Preprocessing(448, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _decoder(vocab, feature_dim=1280, **kw):
    torch.manual_seed(0)
    return AttentionDecoder(tiny_config(len(vocab), feature_dim=feature_dim, **kw))


def test_round_trip_restores_weights_vocab_and_preprocessing(tmp_path, vocab):
    decoder = _decoder(vocab, num_layers=2, tie_weights=True)
    path = tmp_path / "m.pt"
    save_checkpoint(path, decoder, vocab, "efficientnet-lite0", PRE, metrics={"CIDEr": 0.5})
    ckpt = load_checkpoint(path)
    assert ckpt.vocab == vocab and ckpt.preprocessing == PRE and ckpt.encoder_name == "efficientnet-lite0"
    assert ckpt.config == decoder.config and ckpt.metrics["CIDEr"] == 0.5
    for (k, a), (_, b) in zip(decoder.state_dict().items(), ckpt.decoder.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert ckpt.decoder.out_vocab.weight is ckpt.decoder.embedding.weight  # tying survives loading


def test_file_is_plain_data_loadable_with_weights_only(tmp_path, vocab):
    path = tmp_path / "m.pt"
    save_checkpoint(path, _decoder(vocab), vocab, "efficientnet-lite0", PRE)
    payload = torch.load(path, weights_only=True)
    assert set(payload) >= {"model_state", "model_config", "vocab", "encoder", "format_version"}


def test_half_precision_loads_back_as_float32(tmp_path, vocab):
    decoder = _decoder(vocab)
    save_checkpoint(tmp_path / "h.pt", decoder, vocab, "efficientnet-lite0", PRE, half=True)
    loaded = load_checkpoint(tmp_path / "h.pt").decoder
    assert loaded.embedding.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.embedding.weight, decoder.embedding.weight, atol=1e-3, rtol=1e-3)


def test_pickled_module_is_refused(tmp_path, vocab):
    path = tmp_path / "pickled.pt"
    torch.save(_decoder(vocab), path)  # a whole module: exactly what we never want to load
    with pytest.raises(CheckpointError, match="not a captioner checkpoint .it holds pickled Python objects"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"garbage", pickle.dumps({"a": 1})])
def test_junk_files_give_clear_errors(tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_vocabulary_mismatch_is_reported(tmp_path, vocab):
    path = tmp_path / "m.pt"
    small = Vocabulary(vocab.itos[:-5])
    save_checkpoint(path, _decoder(vocab), small, "efficientnet-lite0", PRE)
    with pytest.raises(CheckpointError, match="vocabulary mismatch"):
        load_checkpoint(path)


def test_encoder_mismatch_is_reported(tmp_path, vocab):
    path = tmp_path / "m.pt"
    save_checkpoint(path, _decoder(vocab, feature_dim=1280), vocab, "resnet152-resmem", PRE)
    with pytest.raises(CheckpointError, match="encoder mismatch"):
        load_checkpoint(path)
    save_checkpoint(path, _decoder(vocab), vocab, "vgg-imaginary", PRE)
    with pytest.raises(CheckpointError, match="unknown backbone"):
        load_checkpoint(path)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"v": torch.tensor(1)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"v": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["v"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


def test_export_drops_training_state_and_halves_weights(tmp_path, vocab):
    from captioner.cli import main

    decoder = _decoder(vocab)
    full = tmp_path / "last.pt"
    save_checkpoint(full, decoder, vocab, "efficientnet-lite0", PRE, training={"epoch": 3, "optimizer": {}})
    slim = tmp_path / "slim.pt"
    assert main(["export", str(full), "-o", str(slim), "--half"]) == 0
    payload = torch.load(slim, weights_only=True)
    assert "training" not in payload and payload["model_state"]["embedding.weight"].dtype == torch.float16
    torch.testing.assert_close(load_checkpoint(slim).decoder.embedding.weight, decoder.embedding.weight,
                               atol=1e-3, rtol=1e-3)
