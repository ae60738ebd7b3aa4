import json

import numpy as np
import torch

from captioner.coco import CaptionDataset, collate_captions, load_coco_captions, load_karpathy_split
from captioner.encoder import Encoder
from captioner.features import FAILED, build_feature_store
from tests.helpers import write_coco_subset


def test_official_coco_format_loads_all_images_with_their_captions(train_records, val_records):
    assert len(train_records) == 290 and len(val_records) == 60
    assert all(len(r.captions) >= 5 and r.path.is_file() for r in train_records)
    assert all(c == c.strip() for r in val_records for c in r.captions)  # verbatim trailing spaces/newlines gone


def test_karpathy_split(coco_mini):
    split = coco_mini / "dataset_coco.json"
    train = load_karpathy_split(split, coco_mini, ("train", "restval"))
    val = load_karpathy_split(split, coco_mini, ("val",))
    test = load_karpathy_split(split, coco_mini, ("test",))
    assert (len(train), len(val), len(test)) == (290, 30, 30)
    assert all(r.path.is_file() for r in train + val + test)
    assert not {r.image_id for r in train} & {r.image_id for r in val + test}


def test_caption_dataset_one_item_per_caption_and_collate_pads(train_records, vocab):
    class Store:
        def has(self, image_id):
            return True

        def get(self, image_id):
            return torch.full((4, 3), float(image_id))

    records = train_records[:3]
    dataset = CaptionDataset(records, Store(), vocab)
    assert len(dataset) == sum(len(r.captions) for r in records)
    features, captions = collate_captions([dataset[i] for i in range(6)])
    assert features.shape == (6, 4, 3)
    lengths = [len(dataset[i][1]) for i in range(6)]
    assert captions.shape == (6, max(lengths))
    for row, n in zip(captions, lengths, strict=True):
        assert row[0] == vocab.start_id and row[n - 1] == vocab.end_id and (row[n:] == vocab.pad_id).all()


def test_feature_cache_skips_corrupt_images_and_resumes(coco_mini, tmp_path, vocab):
    images, captions = write_coco_subset(coco_mini, "val", 5, tmp_path / "data", corrupt=1)
    records = load_coco_captions(captions, images)
    encoder = Encoder("efficientnet-lite0", pretrained=False, image_size=64).eval()
    store = build_feature_store(records, encoder, tmp_path / "cache", batch_size=2, progress=False)
    bad = records[-1].image_id
    assert store.failed_ids() == [bad]
    assert not store.has(bad) and all(store.has(r.image_id) for r in records[:-1])
    assert store.get(records[0].image_id).shape == (4, 1280)  # 64 px -> 2 x 2 grid
    with torch.no_grad():
        expected = encoder(encoder.preprocessing(_open(records[0].path))[None])[0]
    torch.testing.assert_close(store.get(records[0].image_id), expected, atol=2e-2, rtol=1e-2)  # fp16 store
    dataset = CaptionDataset(records, store, vocab)
    assert len(dataset) == sum(len(r.captions) for r in records[:-1])

    # Resume: mark one row as not done and poison its features; only that row is recomputed.
    status_file = store.folder / "status.npy"
    status = np.load(status_file)
    status[1] = 0
    np.save(status_file, status)
    feats = np.load(store.folder / "features.npy", mmap_mode="r+")
    feats[1] = 0
    feats[0] = 7  # a done row: must be left alone
    feats.flush()
    del feats
    again = build_feature_store(records, encoder, tmp_path / "cache", batch_size=2, progress=False)
    assert again.folder == store.folder
    assert torch.count_nonzero(again.get(records[1].image_id)) > 0
    assert (again.get(records[0].image_id) == 7).all()
    assert again.status[-1] == FAILED
    index = json.loads((store.folder / "index.json").read_text())
    assert index["grid"] == [2, 2] and index["encoder"] == "efficientnet-lite0"
    # Every write went through a temporary file that was renamed into place: none is left behind.
    assert sorted(f.name for f in store.folder.iterdir()) == ["features.npy", "index.json", "status.npy"]


def _open(path):
    from captioner.images import open_image

    return open_image(path)
