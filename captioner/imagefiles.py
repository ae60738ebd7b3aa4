"""Image files for the command line: folders expanded into their images, then read in batches ahead of the model.

`captioner caption DIR` and `captioner visualize DIR -o OUT/` share this: a folder's images are found by
extension or, for other names, by content (the image header), sorted by name; everything else in it is reported
as skipped. Files named on the command line are kept in the user's order and always tried (a bad one is reported
as an error when read). The next batch is decoded in a worker thread while the model runs on the current one.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .images import ImageError, open_image

# Photo formats recognised by name alone; any other file in a folder is still taken if its header is an image's.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".heic", ".heif", ".hif", ".avif", ".jp2", ".qoi",
})


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


def looks_like_image(path: Path) -> bool:
    """By extension, else by content: PIL identifies the format from the header without decoding the pixels."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a huge image is still an image; open_image applies the pixel cap
            with Image.open(path):
                return True
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return False


def find_images(inputs: Sequence[Path], recursive: bool = False) -> tuple[list[Path], list[Skipped]]:
    """Files as given (in order); each folder replaced by its images, sorted by path. Returns (images, skipped):
    the folders' other files, and their subfolders unless `recursive`."""
    images: list[Path] = []
    skipped: list[Skipped] = []
    for given in inputs:
        if not given.is_dir():
            images.append(given)  # a missing or unreadable file is reported when it is read
            continue
        entries = given.rglob("*") if recursive else given.iterdir()
        for path in sorted(entries):
            if path.is_dir():
                if not recursive:
                    skipped.append(Skipped(path, "folder (add --recursive to include folders)"))
            elif looks_like_image(path):
                images.append(path)
            else:
                skipped.append(Skipped(path, "not an image"))
    return images, skipped


def output_names(inputs: Sequence[Path], images: Sequence[Path]) -> list[Path]:
    """A name per image for the files written about it: its path below the folder it was found in, without the
    extension (`--recursive` keeps `2023/IMG_0001` and `2024/IMG_0001` apart, as a phone's folders need), or its
    stem when it was given as a file."""
    is_folder = {given: given.is_dir() for given in inputs}  # one stat per input
    folders = [given for given, folder in is_folder.items() if folder]
    names = []
    for image in images:
        given_as_file = is_folder.get(image) is False
        folder = None if given_as_file else next((f for f in folders if image.is_relative_to(f)), None)
        names.append(image.relative_to(folder).with_suffix("") if folder is not None else Path(image.stem))
    return names


def read_batches(
    paths: Sequence[Path], batch_size: int, opener: Callable[[Path], Image.Image] = open_image
) -> Iterator[list[tuple[Path, Image.Image | ImageError]]]:
    """Yield batches of (path, RGB image or the ImageError that explains why not), in order. The next batch is
    decoded in a thread meanwhile (PIL releases the GIL while decoding), so the model rarely waits for the disk.
    `opener` reads one file (`Captioner.open` decodes big JPEGs at no more resolution than the model uses)."""
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    batches = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-images") as reader:
        pending: Future | None = reader.submit(_read, batches[0], opener) if batches else None
        for k in range(len(batches)):
            current = pending.result()
            pending = reader.submit(_read, batches[k + 1], opener) if k + 1 < len(batches) else None
            yield current


def _read(paths: list[Path], opener: Callable[[Path], Image.Image]) -> list[tuple[Path, Image.Image | ImageError]]:
    out: list[tuple[Path, Image.Image | ImageError]] = []
    for path in paths:
        try:
            out.append((path, opener(path)))
        except ImageError as exc:
            out.append((path, exc))
    return out


def progress_bar(total: int, enabled: bool | None) -> tqdm:
    """A bar on stderr (stdout stays for results). None: only on a terminal, and only for more than a handful."""
    if enabled is None:
        enabled = total > 8 and sys.stderr.isatty()
    return tqdm(total=total, unit="image", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def emit(bar: tqdm, line: str, stream=None) -> None:
    """Print one result line now (results stream as they finish), without tearing the progress bar."""
    stream = stream or sys.stdout
    if bar.disable:
        print(line, file=stream, flush=True)
    else:
        bar.write(line, file=stream)
        stream.flush()
