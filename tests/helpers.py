"""Small builders for tests: subsets of the real COCO files, corrupt copies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def write_coco_subset(coco_mini: Path, split: str, n_images: int, out_dir: Path, corrupt: int = 0) -> tuple[Path, Path]:
    """Copy the first `n_images` of a coco-mini split (photos + captions) into out_dir; the last `corrupt` photos
    are replaced by truncated JPEG bytes. Returns (images_dir, captions_file)."""
    data = json.loads((coco_mini / "annotations" / f"captions_{split}.json").read_text())
    images = sorted(data["images"], key=lambda im: im["id"])[:n_images]
    keep = {im["id"] for im in images}
    images_dir = out_dir / split
    images_dir.mkdir(parents=True, exist_ok=True)
    for k, im in enumerate(images):
        src = coco_mini / split / im["file_name"]
        if k >= n_images - corrupt:
            (images_dir / im["file_name"]).write_bytes(src.read_bytes()[:300])  # truncated JPEG
        else:
            shutil.copy(src, images_dir / im["file_name"])
    subset = {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}
    captions = out_dir / f"captions_{split}.json"
    captions.write_text(json.dumps(subset))
    return images_dir, captions
