"""Shared fixtures: the real COCO subset in ../shared, and small real-vocabulary models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from captioner.api import default_checkpoint_path
from captioner.coco import load_coco_captions
from captioner.model import AttentionDecoder
from captioner.vocab import Vocabulary
from tests.helpers import save_tiny_checkpoint, tiny_config

# The models in tests are tiny: one thread is as fast, and with two processes on two cores (the test server, a
# browser, a training run) PyTorch's spinning worker threads made steps up to 20x slower here.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
COCO_MINI = Path(os.environ.get("COCO_MINI", REPO.parent / "shared" / "data" / "coco-mini"))


@pytest.fixture(scope="session", autouse=True)
def engine_cache(tmp_path_factory) -> Iterator[Path]:
    """Exported encoder graphs go to a folder of this test session, not the user's ~/.cache/captioner."""
    folder = tmp_path_factory.mktemp("engine-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CAPTIONER_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    if not (COCO_MINI / "annotations" / "captions_train.json").is_file():
        pytest.fail(f"the real COCO subset is missing at {COCO_MINI} (set COCO_MINI to its folder)")
    return COCO_MINI


@pytest.fixture(scope="session")
def coco_3k(coco_mini) -> Path:
    """The larger real COCO subset beside coco-mini (the shipped model's data): its annotations only."""
    folder = coco_mini.parent / "coco-3k"
    if not (folder / "annotations" / "captions_val.json").is_file():
        pytest.fail(f"the real COCO subset coco-3k is missing at {folder}")
    return folder


@pytest.fixture(scope="session")
def train_records(coco_mini):
    return load_coco_captions(coco_mini / "annotations" / "captions_train.json", coco_mini / "train")


@pytest.fixture(scope="session")
def val_records(coco_mini):
    return load_coco_captions(coco_mini / "annotations" / "captions_val.json", coco_mini / "val")


@pytest.fixture(scope="session")
def vocab(train_records) -> Vocabulary:
    return Vocabulary.build((c for r in train_records for c in r.captions), min_count=5)


@pytest.fixture
def tiny_decoder(vocab) -> AttentionDecoder:
    torch.manual_seed(0)
    return AttentionDecoder(tiny_config(len(vocab))).eval()


@pytest.fixture(scope="session")
def shipped_checkpoint() -> Path:
    """The trained model the repository ships (what a new user gets without --checkpoint)."""
    path = default_checkpoint_path(environ={})
    assert path.is_file(), f"the shipped model {path} is missing"
    return path


@pytest.fixture(scope="session")
def lite0_checkpoint(tmp_path_factory, vocab) -> Path:
    """An untrained decoder on the efficientnet-lite0 backbone with the real vocabulary: loads through the
    same path as a trained one (real encoder weights), captions are gibberish but well-formed."""
    path = tmp_path_factory.mktemp("ckpt") / "lite0-untrained.pt"
    save_tiny_checkpoint(path, vocab)
    return path
