"""Image-major batches (`captioner train --batching image`): a photo's captions together, its features read once."""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch.utils.data import DataLoader

from captioner import train
from captioner.coco import CaptionDataset, ImageMajorBatchSampler, collate_captions
from captioner.model import AttentionDecoder, caption_loss
from captioner.vocab import Vocabulary
from tests.helpers import metrics_rows, tiny_config, train_args


class CountingStore:
    """A feature store in memory that counts its reads (the cache's read side: .has and .get)."""

    def __init__(self, image_ids, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.features = {i: torch.randn(4, 16, generator=g) for i in image_ids}
        self.reads: Counter[int] = Counter()

    def has(self, image_id: int) -> bool:
        return image_id in self.features

    def get(self, image_id: int) -> torch.Tensor:
        self.reads[image_id] += 1
        return self.features[image_id].clone()


def _dataset(train_records, n: int = 12):
    records = train_records[:n]  # real coco-mini photos' captions (5 or more each)
    vocab = Vocabulary.build([c for r in records for c in r.captions], min_count=1)
    store = CountingStore([r.image_id for r in records])
    return CaptionDataset(records, store, vocab), store, vocab, records


def test_each_photo_in_one_batch_read_once_and_every_caption_once(train_records):
    dataset, store, _, records = _dataset(train_records)
    sampler = ImageMajorBatchSampler(dataset, batch_size=16, seed=3, epoch=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(dataset)))  # every caption once
    assert all(len(b) <= 16 for b in batches)
    batch_of = {dataset.items[i][0]: k for k, b in enumerate(batches) for i in b}
    for k, b in enumerate(batches):
        assert all(batch_of[dataset.items[i][0]] == k for i in b)  # a photo's captions never split
    for _ in DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_captions):
        pass
    assert store.reads == Counter({r.image_id: 1 for r in records})  # once per photo per epoch
    assert batches != list(ImageMajorBatchSampler(dataset, 16, seed=3, epoch=2))  # reshuffled each epoch
    assert batches == list(ImageMajorBatchSampler(dataset, 16, seed=3, epoch=1))  # but only by (seed, epoch)
    ranks = [list(ImageMajorBatchSampler(dataset, 8, seed=3, epoch=1, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}


def test_same_per_caption_loss_as_caption_major(train_records):
    """With one fixed model, the loss of every caption is the same whichever batches it came in: the batching
    changes which captions share a step, not what each contributes."""
    dataset, store, vocab, _ = _dataset(train_records)
    torch.manual_seed(0)
    decoder = AttentionDecoder(tiny_config(len(vocab), feature_dim=16)).eval()

    def per_caption(loader) -> dict[tuple[int, ...], float]:
        losses = {}
        with torch.no_grad():
            for features, captions in loader:
                for f, c in zip(features, captions, strict=True):
                    c = c[: int((c != 0).sum())][None]  # unpadded, alone: its own loss
                    _, ce = caption_loss(decoder(f[None], c).logits, c, None, attention_reg=0.0)
                    losses[tuple(c[0].tolist())] = float(ce)
        return losses

    caption_major = per_caption(DataLoader(dataset, batch_size=16, shuffle=True, collate_fn=collate_captions))
    reads_caption_major = sum(store.reads.values())
    store.reads.clear()
    image_major = per_caption(DataLoader(dataset, batch_sampler=ImageMajorBatchSampler(dataset, 16),
                                         collate_fn=collate_captions))
    assert caption_major.keys() == image_major.keys()
    assert all(math.isclose(caption_major[k], image_major[k], rel_tol=1e-6) for k in caption_major)
    assert sum(store.reads.values()) < reads_caption_major  # fewer reads for the same losses


def test_training_run_with_image_major_batches(tmp_path, coco_mini):
    out = tmp_path / "run"
    train.main(train_args(tmp_path, coco_mini, out, epochs=2, batching="image"))
    rows = metrics_rows(out)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["train_loss"] < rows[0]["train_loss"]
