"""The model shipped in the package: loads offline, captions real COCO photos sensibly, beats the trivial baseline."""

import json
import re

import pytest

from captioner.api import default_checkpoint_path, load_captioner
from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.evaluate import most_frequent_caption
from captioner.hallucination import hallucination_scores
from captioner.metrics import fast_scores


@pytest.fixture(scope="module")
def shipped(shipped_checkpoint):
    return load_captioner(shipped_checkpoint)


def test_shipped_model_is_small_fp16_decoder_weights_only(shipped_checkpoint):
    path = shipped_checkpoint
    assert path.stat().st_size < 40 * 1024 * 1024
    ckpt = load_checkpoint(path)
    assert ckpt.encoder_state is None and ckpt.training is None  # the backbone comes from its wheel
    import torch

    raw = torch.load(path, weights_only=True)["model_state"]
    assert all(v.dtype == torch.float16 for v in raw.values() if v.is_floating_point())


def test_cli_uses_the_shipped_model_by_default(coco_mini, shipped_checkpoint, capsys, monkeypatch):
    monkeypatch.delenv("CAPTIONER_CHECKPOINT", raising=False)
    assert default_checkpoint_path() == shipped_checkpoint
    assert main(["caption", str(coco_mini / "val" / "000000024585.jpg"), "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert re.search(r"\b(plane|airplane|jet|airliner|aircraft)s?\b", line["caption"]), line["caption"]


@pytest.mark.parametrize(
    "photo,words",
    [
        ("000000020247.jpg", r"bears?"),  # "Bears lope over the ground in a dry landscape."
        ("000000024585.jpg", r"(plane|airplane|jet)s?"),  # "A large passenger jet sitting on an airport tarmac."
    ],
)
def test_shipped_model_names_what_is_in_the_photo(shipped, coco_mini, photo, words):
    caption = shipped.caption([coco_mini / "val" / photo])[0].caption
    assert re.search(rf"\b{words}\b", caption), caption


def test_shipped_model_beats_the_trivial_baseline_on_val(shipped, coco_mini, val_records):
    results = shipped.caption([r.path for r in val_records])  # the recommended decoding
    references = {r.image_id: list(r.captions) for r in val_records}
    model = fast_scores({r.image_id: res.caption for r, res in zip(val_records, results, strict=True)}, references)
    baseline_caption = most_frequent_caption(coco_mini / "annotations" / "captions_train.json")
    baseline = fast_scores({i: baseline_caption for i in references}, references)
    assert model["CIDEr"] > 0.4 and model["CIDEr"] > 4 * baseline["CIDEr"]
    assert model["BLEU-4"] > 0.12 and model["BLEU-4"] > 3 * baseline["BLEU-4"]
    # Most captions invent nothing (measured: CHAIR-s 0.37, CHAIR-i 0.25 on these 60 photos); the most frequent
    # training caption ("a girl wearing a helmet holding a baseball bat") invents a person and a bat nearly everywhere.
    invented = hallucination_scores({r.image_id: res.caption for r, res in zip(val_records, results, strict=True)},
                                    references)
    assert invented["CHAIR-s"] < 0.45 and invented["CHAIR-i"] < 0.3, invented
    assert invented["CHAIR-s"] < hallucination_scores({i: baseline_caption for i in references}, references)["CHAIR-s"]
