"""Object hallucination metrics (CHAIR-i, CHAIR-s, people and count invention) on hand-made captions with known
values, the check set's manifest, and the shipped model's own numbers on real photos."""

from __future__ import annotations

import json

import pytest

from captioner.hallucination import (
    SYNONYMS,
    caption_objects,
    check_caption,
    check_photo,
    check_set_scores,
    hallucination_scores,
    load_check_set,
    load_instance_categories,
    says_several,
)
from tests.conftest import REPO

MANIFEST = REPO / "benchmarks" / "data" / "noncoco" / "manifest.json"


@pytest.mark.parametrize("caption, categories", [
    ("a man riding a motorbike", ["person", "motorcycle"]),
    ("two bikes next to a motorcycle", ["bicycle", "motorcycle"]),  # bike and motorcycle kept apart
    ("a hot dog on a plate", ["hot dog"]),  # food, not a dog
    ("a teddy bear on a bed", ["teddy bear", "bed"]),  # not a bear
    ("women and children at a dining table", ["person", "person", "dining table"]),
    ("puppies playing with a frisbee", ["dog", "frisbee"]),
    ("a toilet seat", ["toilet"]),
    ("a bus full of glasses", ["bus"]),  # "bus" and "glasses" are not plurals of "bu" / a wine glass
    ("an empty street at night", []),
])
def test_caption_objects_maps_synonyms_plurals_and_phrases(caption, categories):
    assert [m.category for m in caption_objects(caption)] == categories


def test_every_category_maps_to_itself():
    for category, words in SYNONYMS.items():
        assert [m.category for m in caption_objects(words[0])] == [category], category


def test_chair_on_hand_made_pairs():
    references = {
        1: ["a cat sleeping on a couch", "a kitten on a sofa"],
        2: ["a dog running on grass", "a puppy in a field"],
        3: ["a man holding an umbrella", "a person with an umbrella in the rain"],
        4: ["a plate of food", "some food on a table"],
    }
    predictions = {
        1: "a woman sitting on a couch with a cat",  # person invented: 1 of 3 mentions
        2: "a dog and a frisbee on the grass",  # frisbee invented: 1 of 2
        3: "a man with an umbrella",  # nothing invented: 0 of 2
        4: "a group of people eating pizza at a table",  # people and pizza invented, table is there: 2 of 3
    }
    scores = hallucination_scores(predictions, references)
    assert scores["CHAIR-i"] == pytest.approx(4 / 10)
    assert scores["CHAIR-s"] == pytest.approx(3 / 4)
    assert scores["people_invention"] == pytest.approx(2 / 4)
    assert scores["count_invention"] == pytest.approx(1 / 4)  # "a group of" where the references speak of one


def test_instance_annotations_count_as_there(tmp_path):
    instances = {
        "categories": [{"id": 1, "name": "person"}, {"id": 34, "name": "frisbee"}],
        "annotations": [{"image_id": 7, "category_id": 34}, {"image_id": 7, "category_id": 1}],
        "images": [{"id": 7}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(instances))
    annotated = load_instance_categories(path)
    assert annotated == {7: {"person", "frisbee"}}
    references = {7: ["a dog running on grass"]}
    predictions = {7: "a man throwing a frisbee to a dog"}
    assert hallucination_scores(predictions, references)["CHAIR-s"] == 1.0
    assert hallucination_scores(predictions, references, annotated)["CHAIR-s"] == 0.0
    path.write_text(json.dumps({**instances, "categories": [{"id": 1, "name": "spaceship"}]}))
    with pytest.raises(ValueError, match="not COCO's 80"):
        load_instance_categories(path)


def test_count_words_and_plurals_say_several():
    assert says_several("two dogs") and says_several("a group of people") and says_several("motorcycles parked")
    assert not says_several("a dog on a couch") and not says_several("a bus on the grass")
    check = check_caption("three cats on a bed", ["a cat on a bed"])
    assert check.invents_count and check.hallucinated == []


def test_no_predictions_is_an_error():
    with pytest.raises(ValueError, match="no predictions"):
        hallucination_scores({}, {})


def test_the_check_set_is_small_licensed_and_not_coco():
    photos = load_check_set(MANIFEST)
    manifest = json.loads(MANIFEST.read_text())
    assert len(photos) >= 20
    assert all(photo.file.is_file() for photo in photos)
    assert sum(f.stat().st_size for f in MANIFEST.parent.iterdir()) < 5 * 2**20
    assert all(entry["licence"] and entry["source"]["package"] for entry in manifest["photos"])
    assert all(photo.right for photo in photos)


def test_check_photo_counts_inventions():
    (cat,) = [p for p in load_check_set(MANIFEST) if p.file.name == "cat.jpg"]
    good = check_photo(cat, "a close up of a cat")
    bad = check_photo(cat, "a woman is sitting on a bed with two cats")
    assert good.right and good.free_of_inventions and not good.invents_people
    assert bad.right and bad.invents_people and bad.invented == ["person", "bed"] and bad.invents_count
    scores = check_set_scores([good, bad])
    assert scores == {"right": 1.0, "people_invention": 0.5, "count_invention": 0.5, "free_of_inventions": 0.5,
                      "photos": 2}
