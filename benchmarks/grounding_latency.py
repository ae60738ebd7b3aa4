"""Warm caption latency of one photo at batch 1, grounded decoding (`--grounding`) against plain, in one run:
both captioners load the shipped model with the default engine, and their calls alternate so that a noisy
machine slows both alike. Prints the medians and their ratio.

    python benchmarks/grounding_latency.py [--photo PATH] [--repeats 40] [--grounding 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from captioner.api import load_captioner

PHOTO = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "coco-mini" / "val" / "000000113588.jpg"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photo", type=Path, default=PHOTO)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--grounding", type=float, default=1.0)
    args = p.parse_args()
    captioners = {"plain": load_captioner(), "grounded": load_captioner(grounding=args.grounding)}
    times: dict[str, list[float]] = {name: [] for name in captioners}
    for captioner in captioners.values():  # warm-up: graphs loaded, caches filled
        captioner.caption(args.photo)
    for _ in range(args.repeats):
        for name, captioner in captioners.items():
            start = time.perf_counter()
            caption = captioner.caption(args.photo).caption
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
    for name, captioner in captioners.items():
        print(f"{name:>9}: {medians[name]:.1f} ms  ({captioner.caption(args.photo).caption})")
    print(f"ratio grounded / plain: {medians['grounded'] / medians['plain']:.2f} ({args.repeats} calls each, "
          f"caption: {caption!r})")


if __name__ == "__main__":
    main()
