"""COCO captions: the official annotation files and Karpathy's split file, as image records and datasets.

An `ImageRecord` is one image with all its reference captions (what evaluation needs); `CaptionDataset`
expands records to one item per (image, caption) for training, reading image features from the cache (or,
when fine-tuning, the cached output of the encoder's frozen blocks).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from .vocab import Vocabulary

log = logging.getLogger(__name__)

KARPATHY_TRAIN_SPLITS = ("train", "restval")  # restval counts as training data, as in the literature


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    path: Path
    captions: tuple[str, ...]


def load_coco_captions(captions_file: str | Path, images_dir: str | Path) -> list[ImageRecord]:
    """Official COCO format (`captions_train2017.json` + `train2017/`), read with pycocotools."""
    from pycocotools.coco import COCO

    captions_file, images_dir = Path(captions_file), Path(images_dir)
    if not captions_file.is_file():
        raise FileNotFoundError(f"captions file not found: {captions_file}")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco = COCO(str(captions_file))
    records = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        captions = tuple(a["caption"].strip() for a in anns if a["caption"].strip())
        if captions:
            records.append(ImageRecord(image_id, images_dir / info["file_name"], captions))
    return records


def load_karpathy_split(
    split_file: str | Path, image_root: str | Path, splits: Iterable[str] = KARPATHY_TRAIN_SPLITS
) -> list[ImageRecord]:
    """Karpathy's `dataset_coco.json`: images carry `filepath`, `filename`, `split`, `cocoid`, `sentences`."""
    split_file, image_root = Path(split_file), Path(image_root)
    if not split_file.is_file():
        raise FileNotFoundError(f"split file not found: {split_file}")
    wanted = set(splits)
    records = []
    for image in json.loads(split_file.read_text())["images"]:
        if image["split"] not in wanted:
            continue
        captions = tuple(s["raw"].strip() for s in image["sentences"] if s["raw"].strip())
        image_id = int(image.get("cocoid", image.get("imgid")))
        path = image_root / image.get("filepath", "") / image["filename"]
        if captions:
            records.append(ImageRecord(image_id, path, captions))
    return records


def load_caption_texts(captions_file: str | Path, exclude_image_ids: Collection[int] = ()) -> list[str]:
    """Only the caption strings of a COCO-format file (e.g. text for a language model or vocabulary), without
    those of `exclude_image_ids`: the validation photos, whose captions must not shape a model scored on them
    (coco-mini's text-only file, for one, holds the captions of coco-3k's val photos)."""
    annotations = json.loads(Path(captions_file).read_text())["annotations"]
    excluded = set(exclude_image_ids)
    kept = [a for a in annotations if a["image_id"] not in excluded]
    if len(kept) < len(annotations):
        log.warning("%s: left out %d captions of validation photos", captions_file, len(annotations) - len(kept))
    return [a["caption"].strip() for a in kept if a["caption"].strip()]


def caption_image_ids(captions_file: str | Path) -> set[int]:
    """The image ids a COCO-format captions file has captions for."""
    return {a["image_id"] for a in json.loads(Path(captions_file).read_text())["annotations"]}


def check_disjoint(train: Sequence[ImageRecord], val: Sequence[ImageRecord]) -> None:
    """Refuse validation photos that are training photos too (same image id and file name): their scores would
    be inflated, and early stopping, seed and decoding choices with them."""
    def key(record: ImageRecord) -> tuple[int, str]:
        return record.image_id, record.path.name

    shared = sorted({key(r) for r in train} & {key(r) for r in val})
    if shared:
        examples = ", ".join(name for _, name in shared[:3])
        raise SystemExit(f"{len(shared)} validation photos are training photos too (e.g. {examples}): "
                         "take them out of one of the two splits")


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def flip_caption(caption: str) -> str:
    """The caption of the mirrored photo: "left" and "right" trade places."""
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1).lower() == "left" else "left", caption)


def choose_view(seed: int, epoch: int, index: int, n_views: int) -> int:
    """Which of `n_views` cached views item `index` reads this epoch: a function of (seed, epoch, index) only,
    so resumed and distributed runs read the same views as one uninterrupted process."""
    if n_views == 1:
        return 0
    key = (seed * 1_000_003 + epoch) * 10_000_019 + index
    return int(torch.randint(n_views, (1,), generator=torch.Generator().manual_seed(key)).item())


class CaptionDataset(Dataset):
    """One item per (image, caption): (features (L, D) float32, token ids (n+2,) with START/END).

    With several feature stores (augmented views of the same photos, from `features.VIEWS`), each item reads
    one view chosen by (seed, epoch, item): call `set_epoch` every epoch; a resumed run sees the same views.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        features,
        vocab: Vocabulary,
        max_words: int = 30,
        views: Sequence[tuple[str, object]] | None = None,
        seed: int = 0,
    ):
        # `features`: anything with .get(image_id) -> (L, D) tensor and .has(image_id); `views`: extra
        # (view name, store) pairs for augmentation.
        self.stores = [("original", features), *(views or [])]
        self.seed, self.epoch = seed, 0
        self.items: list[tuple[int, list[int], list[int]]] = []  # image id, caption ids, mirrored caption ids
        skipped = 0
        for record in records:
            if not all(store.has(record.image_id) for _, store in self.stores):
                skipped += 1
                continue
            for caption in record.captions:
                ids = vocab.encode(caption, max_words)
                self.items.append((record.image_id, ids, vocab.encode(flip_caption(caption), max_words)))
        if skipped:
            log.warning("%d images have no features (unreadable or missing files) and are skipped", skipped)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def view_of(self, index: int) -> int:
        return choose_view(self.seed, self.epoch, index, len(self.stores))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_id, ids, mirrored = self.items[index]
        name, store = self.stores[self.view_of(index)]
        return store.get(image_id), torch.tensor(mirrored if "flip" in name else ids, dtype=torch.long)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A batch at once (the DataLoader calls this with a batch sampler's indices): each (view, image) is read
        from the cache once, however many of its captions the batch holds: with image-major batches
        (`ImageMajorBatchSampler`) a photo's features are read once per epoch instead of once per caption."""
        read: dict[tuple[int, int], torch.Tensor] = {}
        out = []
        for index in indices:
            image_id, ids, mirrored = self.items[index]
            view = self.view_of(index)
            if (view, image_id) not in read:
                read[view, image_id] = self.stores[view][1].get(image_id)
            name = self.stores[view][0]
            out.append((read[view, image_id], torch.tensor(mirrored if "flip" in name else ids, dtype=torch.long)))
        return out

    def image_groups(self) -> list[list[int]]:
        """Item indices grouped by photo (a photo's captions are consecutive items), in item order."""
        groups: list[list[int]] = []
        for index, (image_id, _, _) in enumerate(self.items):
            if groups and self.items[groups[-1][0]][0] == image_id:
                groups[-1].append(index)
            else:
                groups.append([index])
        return groups


class ImageMajorBatchSampler(Sampler[list[int]]):
    """Batches that hold all the captions of their photos: photos shuffled by (seed, epoch), then packed in that
    order into batches of at most `batch_size` captions (a photo is never split; COCO's 5-7 captions per photo
    leave batches a few captions short at most). The loss is normalised by each batch's tokens, so the shorter
    batches weigh their captions as a full one does. Under DDP the processes take turns over one list of
    batches, cut to a multiple of the world size (as DistributedSampler pads, this drops at most world-1)."""

    def __init__(self, dataset: CaptionDataset, batch_size: int, seed: int = 0, epoch: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.groups = dataset.image_groups()
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.rank, self.world_size = rank, world_size

    def batches(self) -> list[list[int]]:
        order = torch.randperm(len(self.groups), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        batches: list[list[int]] = []
        current: list[int] = []
        for g in order.tolist():
            group = self.groups[g]
            if current and len(current) + len(group) > self.batch_size:
                batches.append(current)
                current = []
            current = current + group
        if current:
            batches.append(current)
        usable = len(batches) - len(batches) % self.world_size if len(batches) >= self.world_size else len(batches)
        return batches[:usable][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


def collate_captions(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> features (B, L, D), captions (B, T+1) padded with PAD (the loss masks PAD out)."""
    features = torch.stack([f for f, _ in batch])
    captions = torch.nn.utils.rnn.pad_sequence([c for _, c in batch], batch_first=True, padding_value=pad_id)
    return features, captions
