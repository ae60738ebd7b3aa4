"""`captioner caption DIR` and `captioner visualize DIR -o OUT/`: a folder of real photos with other files in it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from captioner.api import Captioner
from captioner.cli import main
from captioner.imagefiles import find_images, output_names

PHOTOS = ["000000024585.jpg", "000000020247.jpg", "000000000790.jpg", "000000113588.jpg"]  # coco-mini/val


@pytest.fixture
def folder(tmp_path, coco_mini) -> Path:
    """4 real photos (one of them a HEIC, one a JPEG named without an extension), and a text file."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS[:2]:
        shutil.copy(coco_mini / "val" / name, folder / name)
    shutil.copy(coco_mini / "val" / PHOTOS[2], folder / "scan-0790")  # found by content
    Image.open(coco_mini / "val" / PHOTOS[3]).save(folder / "IMG_3588.HEIC", format="HEIF", quality=90)
    (folder / "notes.txt").write_text("photos from the trip\n")
    return folder


def test_find_images_by_extension_or_content_sorted(folder):
    images, skipped = find_images([folder])
    assert [p.name for p in images] == sorted(["000000024585.jpg", "000000020247.jpg", "scan-0790", "IMG_3588.HEIC"])
    assert [(s.path.name, s.reason) for s in skipped] == [("notes.txt", "not an image")]


def test_caption_folder_gives_one_caption_per_photo_and_one_skip(folder, lite0_checkpoint, capsys):
    code = main(["caption", str(folder), "--checkpoint", str(lite0_checkpoint), "--json", "--max-length", "8"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    skips = [line for line in lines if "skipped" in line]
    captions = [line for line in lines if "caption" in line]
    assert [Path(s["image"]).name for s in skips] == ["notes.txt"] and "not an image" in skips[0]["skipped"]
    assert len(captions) == 4 and len(lines) == 5
    assert [c["image"] for c in captions] == [str(p) for p in find_images([folder])[0]]  # sorted
    assert all(c["caption"].strip() for c in captions)


def test_caption_text_output_reports_the_skip_on_stderr(folder, lite0_checkpoint, capsys):
    assert main(["caption", str(folder), "--checkpoint", str(lite0_checkpoint), "--max-length", "6"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 4 and all(": " in line for line in out.splitlines())
    assert f"{folder / 'notes.txt'}: skipped: not an image" in err


def test_results_stream_batch_by_batch(folder, lite0_checkpoint, capsys, monkeypatch):
    """Batches of 3: the model sees [3, 1] images, and the first batch's lines are printed before the second runs."""
    calls = []
    original = Captioner.caption

    def spy(self, images, *args, **kwargs):
        calls.append((len(images), len(capsys.readouterr().out.splitlines())))  # lines printed since last call
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(Captioner, "caption", spy)
    main(["caption", str(folder), "--checkpoint", str(lite0_checkpoint), "--json", "--batch-size", "3",
          "--max-length", "6"])
    # Before batch 1: the skip line only. Before batch 2: batch 1's 3 captions.
    assert calls == [(3, 1), (1, 3)]


def test_progress_bar_goes_to_stderr(folder, lite0_checkpoint, capsys):
    main(["caption", str(folder), "--checkpoint", str(lite0_checkpoint), "--json", "--progress", "--max-length", "6"])
    out, err = capsys.readouterr()
    assert "4/4" in err and "image" in err
    assert all(json.loads(line) for line in out.splitlines())  # stdout stays clean JSON


def test_subfolders_only_with_recursive(folder, lite0_checkpoint, coco_mini, capsys):
    (folder / "day2").mkdir()
    shutil.copy(coco_mini / "val" / PHOTOS[0], folder / "day2" / "beach.jpg")
    images, skipped = find_images([folder])
    assert len(images) == 4 and any(s.path.name == "day2" and "--recursive" in s.reason for s in skipped)
    images, skipped = find_images([folder], recursive=True)
    assert folder / "day2" / "beach.jpg" in images and len(images) == 5
    assert [s.path.name for s in skipped] == ["notes.txt"]


def test_output_names_keep_the_subfolder_below_the_given_folder(tmp_path):
    (tmp_path / "2023").mkdir()
    given_file = tmp_path / "elsewhere" / "IMG_0001.jpg"
    images = [tmp_path / "2023" / "IMG_0001.jpg", tmp_path / "IMG_0001.jpg", given_file]
    assert output_names([tmp_path, given_file], images) == [Path("2023/IMG_0001"), Path("IMG_0001"),
                                                           Path("IMG_0001")]


def test_visualize_recursive_mirrors_the_folder_tree(folder, lite0_checkpoint, coco_mini, tmp_path, capsys):
    """Phones reuse file names across folders: day2/000000024585.jpg must not become 000000024585-2.png."""
    (folder / "day2").mkdir()
    shutil.copy(coco_mini / "val" / PHOTOS[1], folder / "day2" / PHOTOS[0])  # same name, another photo
    out = tmp_path / "figures"
    code = main(["visualize", str(folder), "--recursive", "-o", f"{out}/", "--checkpoint", str(lite0_checkpoint),
                 "--json", "--max-length", "4", "--method", "greedy"])
    assert code == 0, capsys.readouterr().err
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.json"))
    assert written == sorted(["000000024585.json", "000000020247.json", "scan-0790.json", "IMG_3588.json",
                              "day2/000000024585.json"])
    images = {json.loads(p.read_text())["image"] for p in out.rglob("*.json")}
    assert str(folder / "day2" / PHOTOS[0]) in images and str(folder / PHOTOS[0]) in images


def test_empty_folder_is_an_error(tmp_path, lite0_checkpoint, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["caption", str(tmp_path / "empty"), "--checkpoint", str(lite0_checkpoint)]) == 1
    assert "no images in" in capsys.readouterr().err


def test_visualize_folder_writes_one_figure_per_photo(folder, lite0_checkpoint, tmp_path, capsys):
    out = tmp_path / "figures"
    code = main(["visualize", str(folder), "-o", f"{out}/", "--checkpoint", str(lite0_checkpoint), "--json",
                 "--max-length", "5", "--method", "greedy", "--batch-size", "2"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    stems = sorted(p.stem for p in find_images([folder])[0])
    assert sorted(p.stem for p in out.glob("*.png")) == stems
    assert sorted(p.stem for p in out.glob("*.json")) == stems
    assert all(Image.open(p).size[0] > 100 for p in out.glob("*.png"))
    assert "notes.txt: skipped: not an image" in stderr
    assert stdout.count("wrote") == 8
