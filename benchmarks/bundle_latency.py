"""Warm caption latency at batch 1 of torch-free bundles (captioner/inference/) in one run, e.g. the shipped graphs
against another quantisation of the same model (`python scripts/export_onnx_bundle.py --out DIR`). The calls
alternate photo by photo so that a noisy machine slows every bundle alike. Prints each median and its ratio to
the first bundle.

    python benchmarks/bundle_latency.py captioner/weights/onnx other-bundle/ [--repeats 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from captioner.inference import load_bundle

COCO_MINI_VAL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "coco-mini" / "val"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", type=Path, nargs="+")
    p.add_argument("--images", type=Path, default=COCO_MINI_VAL)
    p.add_argument("--photos", type=int, default=5, help="photos cycled through (the first N by name)")
    p.add_argument("--repeats", type=int, default=8, help="passes over the photos")
    args = p.parse_args()
    photos = sorted(args.images.glob("*.jpg"))[: args.photos]
    captioners = [load_bundle(folder) for folder in args.bundles]
    times: list[list[float]] = [[] for _ in captioners]
    for captioner in captioners:  # warm-up: sessions created, first run done
        captioner.caption(photos[0])
    for _ in range(args.repeats):
        for photo in photos:
            for bundle_times, captioner in zip(times, captioners, strict=True):
                start = time.perf_counter()
                captioner.caption(photo)
                bundle_times.append(time.perf_counter() - start)
    medians = [statistics.median(t) * 1000 for t in times]
    for folder, median in zip(args.bundles, medians, strict=True):
        print(f"{median:7.1f} ms  {median / medians[0]:.3f}x  {folder}")
    print(f"({args.repeats} passes over {len(photos)} photos, batch 1, default decoding)")


if __name__ == "__main__":
    main()
