"""`captioner caption-batch` on a real local Ray cluster, over real coco-mini photos with the shipped model."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray tests need the ray extra: pip install -e '.[ray]' (in .[dev])")
pytest.importorskip("ray.data", reason="Ray tests need the ray extra: pip install -e '.[ray]' (in .[dev])")

from captioner.batch import caption_batch, rows  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module (ray.init takes seconds on 2 cores); its address for subprocess drivers."""
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


def _photos(coco_mini: Path, folder: Path, n: int) -> list[Path]:
    folder.mkdir()
    photos = sorted((coco_mini / "val").glob("*.jpg"))[:n]
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    return [folder / p.name for p in photos]


def test_one_row_per_photo_and_the_bad_file_reported(cluster, coco_mini, tmp_path):
    photos = _photos(coco_mini, tmp_path / "in", 6)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "in" / "notes.txt.md").write_text("a note, not a photo")
    summary = caption_batch([tmp_path / "in"], tmp_path / "out", workers=2, batch_size=2)
    found = rows(tmp_path / "out")
    by_path = {row["path"]: row for row in found}
    assert len(found) == len(by_path) == 8  # 6 photos, the broken one, the note: each once
    for photo in photos:
        row = by_path[str(photo)]
        assert row["caption"] and row["log_prob"] < 0 and row["model"] == "captioner-default" and row["version"]
    assert "not a recognised image format" in by_path[str(tmp_path / "in" / "broken.jpg")]["error"]
    assert by_path[str(tmp_path / "in" / "notes.txt.md")]["skipped"] == "not an image"
    assert (summary.captioned, summary.errors, summary.skipped) == (6, 1, 1)
    again = caption_batch([tmp_path / "in"], tmp_path / "out", workers=2, batch_size=2)  # nothing left to do
    assert (again.captioned, again.already_done) == (0, 7) and len(rows(tmp_path / "out")) == 8


def test_killed_driver_resumes_with_exactly_one_row_per_photo(cluster, coco_mini, tmp_path):
    photos = _photos(coco_mini, tmp_path / "in", 12)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "captioner", "caption-batch", str(tmp_path / "in"), "-o", str(out),
               "--workers", "1", "--batch-size", "1", "--address", cluster]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list(out.glob("part-*.jsonl"))) < 3 and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)  # mid-job: some batches written, others in flight
    driver.wait()
    before = rows(out)
    assert 3 <= len(before) < len(photos), "the driver should have been killed halfway"
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert f"{len(before)} already in" in finished.stderr
    counts = Counter(row["path"] for row in rows(out))
    assert counts == Counter(str(p) for p in photos)  # every photo, none twice
    assert all(row["caption"] for row in rows(out))
