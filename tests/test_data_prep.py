"""captioner/datasets_prep.py (data/prepare_coco.py) on local files: a real HTTP server on 127.0.0.1 serving a
zip of coco-mini photos; nothing is downloaded from the internet."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from captioner.datasets_prep import PrepError, download, karpathy_to_2017, read_manifest, train_command, unpack

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def archive(coco_mini, tmp_path_factory) -> Path:
    """A small val2017.zip of real coco-mini photos (stored, so its bytes are the JPEGs')."""
    folder = tmp_path_factory.mktemp("served")
    path = folder / "val2017.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for photo in sorted((coco_mini / "val").glob("*.jpg"))[:4]:
            zf.write(photo, f"val2017/{photo.name}")
    return path


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """The standard library's file server, plus `Range: bytes=N-` as COCO's servers answer it (206)."""

    requests: list[str | None] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append(self.headers.get("Range"))
        spec = self.headers.get("Range")
        if not spec:
            return super().do_GET()
        data = Path(self.translate_path(self.path)).read_bytes()
        start = int(spec.removeprefix("bytes=").rstrip("-"))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture(scope="module")
def server(archive):
    handler = functools.partial(_RangeHandler, directory=str(archive.parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_checks_the_sha256(server, archive, tmp_path):
    got = download(f"{server}/val2017.zip", tmp_path / "val2017.zip", sha256=_sha(archive))
    assert got.read_bytes() == archive.read_bytes()
    with pytest.raises(PrepError, match="sha256 .* is not the expected"):
        download(f"{server}/val2017.zip", tmp_path / "again.zip", sha256="0" * 64)
    assert not (tmp_path / "again.zip").exists() and not (tmp_path / "again.zip.part").exists()


def test_download_resumes_a_partial_file_with_a_range_request(server, archive, tmp_path):
    whole = archive.read_bytes()
    (tmp_path / "val2017.zip.part").write_bytes(whole[: len(whole) // 3])  # an interrupted earlier run
    _RangeHandler.requests.clear()
    fetched = []
    download(f"{server}/val2017.zip", tmp_path / "val2017.zip", sha256=_sha(archive), progress=fetched.append)
    assert _RangeHandler.requests == [f"bytes={len(whole) // 3}-"]
    assert sum(fetched) == len(whole) - len(whole) // 3  # only the rest came over the wire
    assert (tmp_path / "val2017.zip").read_bytes() == whole


def test_file_url_resumes_too(archive, tmp_path):
    whole = archive.read_bytes()
    (tmp_path / "v.zip.part").write_bytes(whole[:1000])
    download(archive.as_uri(), tmp_path / "v.zip", sha256=_sha(archive))
    assert (tmp_path / "v.zip").read_bytes() == whole


def test_unpack_and_a_clear_error_on_a_corrupt_or_truncated_archive(archive, tmp_path):
    names = unpack(archive, tmp_path / "coco")
    assert all((tmp_path / "coco" / n).is_file() for n in names) and len(names) == 4
    corrupt = tmp_path / "corrupt.zip"
    data = bytearray(archive.read_bytes())
    data[200] ^= 0xFF  # inside the first photo's bytes: its CRC-32 no longer matches
    corrupt.write_bytes(bytes(data))
    with pytest.raises(PrepError, match="corrupt .*download it again"):
        unpack(corrupt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(archive.read_bytes()[:5000])
    with pytest.raises(PrepError, match="not a complete zip archive"):
        unpack(truncated, tmp_path / "out")


def test_karpathy_split_rewritten_for_the_2017_folders(coco_mini, tmp_path):
    root = tmp_path / "coco"
    split = json.loads((coco_mini / "dataset_coco.json").read_text())
    for image in split["images"]:  # coco-mini's photos in the 2017 layout, names as in full COCO
        folder = root / ("val2017" if image["filepath"] == "val" else "train2017")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(coco_mini / image["filepath"] / image["filename"], folder / f"{image['cocoid']:012d}.jpg")
    counts = karpathy_to_2017(coco_mini / "dataset_coco.json", root, tmp_path / "split.json")
    assert counts == {"train": 249, "restval": 41, "val": 30, "test": 30}
    from captioner.coco import load_karpathy_split

    records = load_karpathy_split(tmp_path / "split.json", root, splits=["val"])
    assert len(records) == 30 and all(r.path.is_file() for r in records)
    next((root / "train2017").iterdir()).unlink()
    with pytest.raises(PrepError, match="1 photos .* are not in"):
        karpathy_to_2017(coco_mini / "dataset_coco.json", root, tmp_path / "split2.json")


def test_script_prints_the_train_command_and_reads_sha256sum_manifests(tmp_path):
    (tmp_path / "sums").write_text("ab12  train2017.zip\ncd34 *val2017.zip\n")
    assert read_manifest(tmp_path / "sums") == {"train2017.zip": "ab12", "val2017.zip": "cd34"}
    command = train_command(Path("/d/coco"), None)
    assert "--train-captions /d/coco/annotations/captions_train2017.json" in command
    # the script runs (its --help), importable from the repo without installing anything more
    result = subprocess.run([sys.executable, str(REPO / "data" / "prepare_coco.py"), "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "--karpathy" in result.stdout
