import json

import numpy as np
import pytest
import torch

from captioner import train
from captioner.coco import (
    CaptionDataset,
    collate_captions,
    load_coco_captions,
    load_karpathy_split,
)
from captioner.encoder import Encoder
from captioner.features import FAILED, build_feature_store
from captioner.lm import load_lm_text
from captioner.vocab import tokenize
from tests.helpers import write_coco_subset


def test_official_coco_format_loads_all_images_with_their_captions(train_records, val_records):
    assert len(train_records) == 290 and len(val_records) == 60
    assert all(len(r.captions) >= 5 and r.path.is_file() for r in train_records)
    assert all(c == c.strip() for r in val_records for c in r.captions)  # verbatim trailing spaces/newlines gone


def test_validation_captions_stay_out_of_the_lm_text_and_the_vocabulary(coco_mini, coco_3k, train_records):
    """coco-mini's text-only file holds the captions of coco-3k's val photos: given those photos as validation,
    neither `pretrain-lm` nor `train --vocab-text` may learn from their captions."""
    text_file = coco_mini / "annotations" / "captions_text_only.json"
    val_file = coco_3k / "annotations" / "captions_val.json"
    val_ids = {a["image_id"] for a in json.loads(val_file.read_text())["annotations"]}
    annotations = json.loads(text_file.read_text())["annotations"]
    of_val = {a["caption"].strip() for a in annotations if a["image_id"] in val_ids}
    of_others = {a["caption"].strip() for a in annotations if a["image_id"] not in val_ids}
    assert len(of_val) > 1000  # the leak this guards against is real

    lm_text = load_lm_text([text_file], [val_file])
    assert not (set(lm_text) & (of_val - of_others))
    assert set(lm_text) == of_others - {""}
    assert set(load_lm_text([text_file], [])) >= of_val  # without --val-captions they would be there

    val_records = load_coco_captions(val_file, coco_3k / "val")
    val_only_words = ({w for c in of_val for w in tokenize(c)}
                      - {w for c in of_others for w in tokenize(c)}
                      - {w for r in train_records for c in r.captions for w in tokenize(c)})
    assert val_only_words
    vocab = train.build_vocab(train_records, [text_file], 1, val_records)
    assert not any(w in vocab for w in val_only_words)
    leaky_vocab = train.build_vocab(train_records, [text_file], 1, [])
    assert all(w in leaky_vocab for w in val_only_words)


def test_training_refuses_validation_photos_that_are_training_photos(coco_mini):
    captions, photos = coco_mini / "annotations" / "captions_train.json", coco_mini / "train"
    args = train.get_args_parser().parse_args([
        "--train-images", str(photos), "--train-captions", str(captions),
        "--val-images", str(photos), "--val-captions", str(captions), "--output-dir", "unused",
    ])
    with pytest.raises(SystemExit, match="290 validation photos are training photos too"):
        train.load_splits(args)
    args.val_images, args.val_captions = coco_mini / "val", coco_mini / "annotations" / "captions_val.json"
    assert [len(split) for split in train.load_splits(args)] == [290, 60]


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
