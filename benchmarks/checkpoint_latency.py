"""Warm caption latency at batch 1 of several models in one run: a baseline (default: the shipped checkpoint) first,
then each candidate. A model is a checkpoint file (another backbone, input size or decoder; default engine) or a
torch-free bundle folder (captioner/inference/, e.g. another quantisation from `scripts/export_onnx_bundle.py
--out DIR`); decoding is the default. The calls alternate photo by photo, so a noisy machine slows every model
alike; each model's caption lengths are its own, so several photos are cycled. Prints each model's median, its
input size, and its ratio to the baseline.

    python benchmarks/checkpoint_latency.py runs/3k-lite2-260-scst-s0/best.pt [more.pt ...] [--repeats 10]
    python benchmarks/checkpoint_latency.py other-bundle/ --baseline captioner/weights/onnx --photos 5 --repeats 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from captioner.api import default_checkpoint_path, load_captioner
from captioner.inference import load_bundle

COCO_MINI_VAL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "coco-mini" / "val"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", type=Path, nargs="+", help="candidates: checkpoint files or bundle folders")
    p.add_argument("--baseline", type=Path, default=None, help="default: the shipped checkpoint")
    p.add_argument("--images", type=Path, default=COCO_MINI_VAL)
    p.add_argument("--photos", type=int, default=10, help="photos cycled through (the first N by name)")
    p.add_argument("--repeats", type=int, default=10, help="passes over the photos")
    args = p.parse_args()
    photos = sorted(args.images.glob("*.jpg"))[: args.photos]
    paths = [args.baseline or default_checkpoint_path(), *args.models]
    captioners = [load_bundle(path) if path.is_dir() else load_captioner(path) for path in paths]
    times: list[list[float]] = [[] for _ in captioners]
    for captioner in captioners:  # warm-up: graphs loaded, caches filled
        captioner.caption(photos[0])
    for _ in range(args.repeats):
        for photo in photos:
            for model_times, captioner in zip(times, captioners, strict=True):
                start = time.perf_counter()
                captioner.caption(photo)
                model_times.append(time.perf_counter() - start)
    medians = [statistics.median(t) * 1000 for t in times]
    for path, captioner, median in zip(paths, captioners, medians, strict=True):
        size = captioner.preprocessing.image_size
        print(f"{median:7.1f} ms  {median / medians[0]:.2f}x  {size} px  {path}")
    print(f"({args.repeats} passes over {len(photos)} photos, batch 1, default decoding)")


if __name__ == "__main__":
    main()
