"""Rebuild benchmarks/data/noncoco/ (the non-COCO check set) from the sample photos that ship inside PyPI
packages, each with its licence as the package documents it. Needs `pip install scikit-image scikit-learn`
(matplotlib is a dependency already); the committed files are what the benchmark and tests read.

    python scripts/make_noncoco_set.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "noncoco"
MAX_SIDE = 640  # the model reads 448 x 448: more only costs repository space


def skimage_photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(np.asarray(getattr(skimage.data, name)()))


def package_file(package: str, *parts: str) -> Image.Image:
    import importlib

    root = Path(importlib.import_module(package).__file__).parent
    return Image.open(root.joinpath(*parts))


def main() -> None:
    manifest = json.loads((OUT / "manifest.json").read_text())
    for photo in manifest["photos"]:
        source = photo["source"]
        if source["package"] == "scikit-image":
            image = skimage_photo(source["name"])
        else:
            image = package_file(source["module"], *source["path"])
        image = image.convert("RGB")
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        image.save(OUT / photo["file"], quality=90)
        print(photo["file"], image.size)


if __name__ == "__main__":
    main()
