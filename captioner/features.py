"""On-disk feature cache: encode each image once with the frozen encoder, train from the cache.

Layout of one cache folder (one encoder + image size + image list):
    index.json     encoder name, preprocessing, grid, image ids (row order)
    features.npy   (N, L, D) float16, memory-mapped: full COCO does not need to fit in RAM
    status.npy     (N,) int8: 0 = not yet encoded, 1 = done, 2 = unreadable image (skipped)
Building is resumable: rows already marked done are not encoded again after an interruption.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .checkpoint import atomic_path
from .coco import ImageRecord
from .encoder import Encoder, Preprocessing, prepare_cpu_inference
from .engine import GraphFiles, make_encoder_engine
from .images import ImageError, open_image

log = logging.getLogger(__name__)

TODO, DONE, FAILED = 0, 1, 2
# engine="auto" exports the encoder to ONNX (~5 s once, then cached) only when there is enough to encode to win it
# back: eager torch takes about that long for this many 448-px images on 2 cores.
AUTO_ONNX_MIN_IMAGES = 64


def _center_crop(image: Image.Image, keep: float = 0.8) -> Image.Image:
    w, h = image.size
    dw, dh = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
    return image.crop((dw, dh, w - dw, h - dh))


# Augmented views of a training photo, each cached once. A view whose name contains "flip" mirrors the photo,
# so its captions must swap left and right (see coco.flip_caption).
VIEWS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "original": lambda im: im,
    "flip": lambda im: ImageOps.mirror(im),
    "crop": _center_crop,
    "flip-crop": lambda im: _center_crop(ImageOps.mirror(im)),
}


class ImageFileDataset(Dataset):
    """Loads and preprocesses images; an unreadable one yields None (reported, then skipped)."""

    def __init__(
        self, paths: Sequence[Path], preprocessing: Preprocessing, indices: Sequence[int], view: str = "original"
    ):
        self.paths, self.preprocessing, self.indices = paths, preprocessing, list(indices)
        self.view = VIEWS[view]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        index = self.indices[i]
        try:
            # Full-resolution decoding (no JPEG draft): cached features stay exactly those of before.
            return index, self.preprocessing(self.view(open_image(self.paths[index]))), None
        except ImageError as exc:
            return index, None, str(exc)


def _collate_images(batch):
    return batch  # keep Nones visible to the caller


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:  # np.save appends .npy to any other name
        np.save(tmp, array)


class FeatureStore:
    """Read side of a cache folder. `get(image_id)` -> (L, D) float32 tensor."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / "index.json").read_text())
        self.row_of = {int(i): row for row, i in enumerate(self.index["image_ids"])}
        self.features = np.load(self.folder / "features.npy", mmap_mode="r")
        self.status = np.load(self.folder / "status.npy")

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.index["grid"])

    def has(self, image_id: int) -> bool:
        row = self.row_of.get(int(image_id))
        return row is not None and self.status[row] == DONE

    def get(self, image_id: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.features[self.row_of[int(image_id)]], dtype=np.float32))

    def failed_ids(self) -> list[int]:
        return [int(i) for i, s in zip(self.index["image_ids"], self.status, strict=True) if s == FAILED]


def cache_damage(folder: Path, image_ids: Sequence[int] | None = None) -> str | None:
    """Why a cache folder cannot be trusted (None: it can): an index that does not parse or lists other images,
    a features or status file that is missing, truncated, of another shape or type, or status values that mean
    nothing. Reads the headers and the small status array only, never the features themselves."""
    try:
        index = json.loads((folder / "index.json").read_text())
        rows = len(index["image_ids"])
        shape = (rows, index["grid"][0] * index["grid"][1], index["feature_dim"])
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"unreadable index.json: {exc}"
    if image_ids is not None and [int(i) for i in index["image_ids"]] != [int(i) for i in image_ids]:
        return "index.json lists other images"
    try:
        with open(folder / "features.npy", "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            header_shape, _, dtype = read_header(f)
            data_start = f.tell()
        size = (folder / "features.npy").stat().st_size
        status = np.load(folder / "status.npy")
    except (OSError, ValueError, EOFError) as exc:
        return f"unreadable features.npy or status.npy: {exc}"
    if header_shape != shape or dtype != np.float16:
        return f"features.npy holds {dtype} {header_shape}, not float16 {shape}"
    if size != data_start + int(np.prod(shape)) * 2:
        return f"features.npy is {size} bytes, not {data_start + int(np.prod(shape)) * 2} (truncated?)"
    if status.shape != (rows,) or status.dtype != np.int8 or not np.isin(status, (TODO, DONE, FAILED)).all():
        return f"status.npy holds {status.dtype} {status.shape}, not int8 ({rows},) of 0/1/2"
    return None


def _feature_engine(encoder: Encoder, engine: str, n_images: int):
    if engine == "auto" and n_images < AUTO_ONNX_MIN_IMAGES and not GraphFiles.for_encoder(encoder).graph.is_file():
        engine = "torch"  # too few images to pay for an export
    return make_encoder_engine(encoder, engine)


def cache_folder(
    cache_root: str | Path, encoder: Encoder, records: Sequence[ImageRecord], view: str = "original"
) -> Path:
    """A folder name that changes whenever the encoder, its input size, the view or the image list changes."""
    key = hashlib.sha256()
    key.update(json.dumps([encoder.name, encoder.preprocessing.to_json(), encoder.fine_tune_blocks]).encode())
    if view != "original":  # (keeps the names of caches made before views existed)
        key.update(view.encode())
    for record in records:
        key.update(f"{record.image_id}:{record.path}\n".encode())
    size = encoder.preprocessing.image_size
    suffix = "" if view == "original" else f"-{view}"
    return Path(cache_root) / f"{encoder.name}-{size}px-{len(records)}img-{key.hexdigest()[:10]}{suffix}"


def build_feature_store(
    records: Sequence[ImageRecord],
    encoder: Encoder,
    cache_root: str | Path,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = True,
    view: str = "original",
    engine: str = "auto",
) -> FeatureStore:
    """Encode every record's image once (resuming a partial cache) and return the store. `engine` as in
    `captioner.engine` ("auto": ONNX Runtime on CPU; the features agree with torch's to ~1e-4, far below the
    float16 they are stored in)."""
    folder = cache_folder(cache_root, encoder, records, view)
    folder.mkdir(parents=True, exist_ok=True)
    device = next(encoder.parameters()).device
    if device.type == "cpu":
        prepare_cpu_inference()
    encoder.eval()
    index_file, features_file, status_file = folder / "index.json", folder / "features.npy", folder / "status.npy"
    if index_file.exists() and (damage := cache_damage(folder, [r.image_id for r in records])) is not None:
        log.warning("feature cache %s is damaged (%s): encoding it again", folder, damage)
        for file in (index_file, features_file, status_file):  # the index first: its absence means "start over"
            file.unlink(missing_ok=True)
    if not index_file.exists():
        grid = encoder.grid_size()
        index = {
            "encoder": encoder.name,
            "view": view,
            "preprocessing": encoder.preprocessing.to_json(),
            "grid": list(grid),
            "feature_dim": encoder.feature_dim,
            "image_ids": [r.image_id for r in records],
        }
        shape = (len(records), grid[0] * grid[1], encoder.feature_dim)
        np.lib.format.open_memmap(features_file, mode="w+", dtype=np.float16, shape=shape).flush()
        np.save(status_file, np.zeros(len(records), dtype=np.int8))
        with atomic_path(index_file) as tmp:  # written last: its presence means the files exist
            tmp.write_text(json.dumps(index))
    status = np.load(status_file)
    todo = [i for i, s in enumerate(status) if s == TODO]
    if todo:
        encode = _feature_engine(encoder, engine, len(todo))
        features = np.load(features_file, mmap_mode="r+")
        loader = DataLoader(
            ImageFileDataset([r.path for r in records], encoder.preprocessing, todo, view),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate_images,
        )
        bar = tqdm(total=len(todo), desc=f"encoding images ({encoder.name}, {view})", unit="img",
                   disable=not progress)
        with torch.no_grad():
            for batch in loader:
                good = [(i, x) for i, x, _ in batch if x is not None]
                for i, _, error in batch:
                    if error is not None:
                        log.warning("skipping unreadable image: %s", error)
                        status[i] = FAILED
                if good:
                    grids = encode(torch.stack([x for _, x in good]).to(device))  # (b, L, D)
                    rows = [i for i, _ in good]
                    features[rows] = grids.cpu().numpy().astype(np.float16)
                    status[rows] = DONE
                features.flush()  # features before status: a row marked done is really on disk
                _save_atomic(status_file, status)
                bar.update(len(batch))
        bar.close()
        del features
    return FeatureStore(folder)
