"""Preparing full COCO 2017 for `captioner train`: download (resumable, checked), unpack, Karpathy split check.

Used by `python data/prepare_coco.py` (see data/README.md). Downloads resume with an HTTP Range request from
where a partial `.part` file stopped, are checked against a sha256 when one is known (the manifest given with
--sha256, `sha256sum` format) and by the zip's own CRC-32 of every member before unpacking; a file is renamed to
its final name only once complete, so an interrupted run is simply run again. Nothing in the package calls this
at run time: only the script, on a user's machine with internet.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

COCO_FILES = {  # the official COCO 2017 archives (cocodataset.org/#download)
    "train2017.zip": "http://images.cocodataset.org/zips/train2017.zip",  # 118,287 photos, ~18 GB
    "val2017.zip": "http://images.cocodataset.org/zips/val2017.zip",  # 5,000 photos, ~1 GB
    "annotations_trainval2017.zip": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
}
KARPATHY_COUNTS = {"train": 82_783, "restval": 30_504, "val": 5_000, "test": 5_000}  # dataset_coco.json
CHUNK = 1 << 20


class PrepError(RuntimeError):
    """A download or archive that cannot be used; the message says which file and what to do."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: Path) -> dict[str, str]:
    """`sha256sum` output (`<hex>  <name>` per line) -> {name: hex}."""
    entries = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            entries[name.strip().lstrip("*")] = digest.lower()
    return entries


def download(url: str, target: Path, sha256: str | None = None, progress: Callable[[int], None] | None = None,
             timeout: float = 60) -> Path:
    """Fetch `url` to `target`, continuing a `target.part` left by an interrupted run (HTTP Range, or a file://
    URL read from the same offset). Checked against `sha256` when given: a mismatch removes the download."""
    target = Path(target)
    if target.is_file():
        _check_sha256(target, sha256)
        return target
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the partial file is already whole
            response = None
        else:
            raise PrepError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except OSError as exc:
        raise PrepError(f"{url}: {exc}") from exc
    if response is not None:
        with response:
            resumed = offset and (getattr(response, "status", 206) == 206 or url.startswith("file:"))
            if url.startswith("file:") and offset:
                response.read(offset)  # a file:// URL has no Range: skip what is already here
            mode = "ab" if resumed else "wb"  # a server that ignores Range sends it all again: start over
            with open(part, mode) as out:
                while block := response.read(CHUNK):
                    out.write(block)
                    if progress:
                        progress(len(block))
    _check_sha256(part, sha256, final=target)
    part.replace(target)
    return target


def _check_sha256(path: Path, expected: str | None, final: Path | None = None) -> None:
    if expected is None:
        return
    actual = sha256_of(path)
    if actual != expected.lower():
        path.unlink()
        raise PrepError(f"{final or path}: sha256 {actual} is not the expected {expected}: the download was "
                        "removed, run again to fetch it anew")


def unpack(archive: Path, into: Path) -> list[str]:
    """Check every member's CRC-32, then extract (once: a `.done` marker beside the archive). Returns the names."""
    archive, into = Path(archive), Path(into)
    marker = into / f".{archive.name}.done"
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            if marker.is_file():
                return names
            bad = zf.testzip()
            if bad is not None:
                raise PrepError(f"{archive}: member {bad} is corrupt (CRC mismatch): delete the archive and "
                                "download it again")
            into.mkdir(parents=True, exist_ok=True)
            zf.extractall(into)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise PrepError(f"{archive}: not a complete zip archive ({exc}): delete it and download it again") from exc
    marker.write_text("")
    return names


def karpathy_to_2017(split_file: Path, coco_root: Path, output: Path) -> dict[str, int]:
    """Rewrite Karpathy's `dataset_coco.json` (2014 file names) for the 2017 folders: each photo's `filepath`
    becomes the 2017 folder (train2017/ or val2017/) that holds `<cocoid:012d>.jpg`. Raises PrepError, naming a
    few, when photos are missing. Returns the photo count per split (Karpathy: 82,783 / 30,504 / 5,000 / 5,000)."""
    data = json.loads(Path(split_file).read_text())
    folders = [name for name in ("train2017", "val2017") if (Path(coco_root) / name).is_dir()]
    present = {p.name: folder for folder in folders for p in (Path(coco_root) / folder).iterdir()}
    missing, counts = [], dict.fromkeys(KARPATHY_COUNTS, 0)
    for image in data["images"]:
        name = f"{int(image['cocoid']):012d}.jpg"
        if name not in present:
            missing.append(name)
            continue
        image["filepath"], image["filename"] = present[name], name
        counts[image["split"]] = counts.get(image["split"], 0) + 1
    if missing:
        raise PrepError(f"{len(missing)} photos of {split_file} are not in {coco_root}/train2017 or val2017 "
                        f"(e.g. {', '.join(missing[:3])})")
    from .checkpoint import atomic_path

    with atomic_path(output) as tmp:
        tmp.write_text(json.dumps(data))
    return counts


def train_command(coco_root: Path, karpathy: Path | None, output_dir: str = "runs/coco") -> str:
    """The `captioner train` command for the prepared data."""
    root = Path(coco_root)
    if karpathy is not None:
        return (f"captioner train --karpathy-split {karpathy} --image-root {root} --output-dir {output_dir} "
                "--batching image --num-workers 4 --amp bf16")
    return (f"captioner train --train-images {root}/train2017 "
            f"--train-captions {root}/annotations/captions_train2017.json --val-images {root}/val2017 "
            f"--val-captions {root}/annotations/captions_val2017.json --output-dir {output_dir} "
            "--batching image --num-workers 4 --amp bf16")
