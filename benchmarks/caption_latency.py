"""Per-image latency of captioning on CPU: encoder and decoder timed separately.

    python benchmarks/caption_latency.py [--checkpoint captioner/weights/captioner-default.pt] [--repeats 3]

Prints milliseconds per image for greedy and beam-3 decoding at batch 1 and batch 16, on real coco-mini
photos. Encoder time does not depend on the decoding method, so it is measured once per batch size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from captioner.api import load_captioner
from captioner.decoding import DecodingOptions
from captioner.images import open_image

REPO = Path(__file__).resolve().parent.parent
COCO_VAL = REPO.parent / "shared" / "data" / "coco-mini" / "val"


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: first calls pay for allocation and lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped model")
    p.add_argument("--images", type=Path, default=COCO_VAL)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    captioner = load_captioner(args.checkpoint)
    images = [open_image(path) for path in sorted(args.images.glob("*.jpg"))[:16]]
    print(f"checkpoint {captioner.checkpoint.path}, backbone {captioner.encoder.name}, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"{'batch':>5} {'method':>8} {'encoder ms/img':>15} {'decoder ms/img':>15} {'total ms/img':>13}")
    for batch_size in (1, 16):
        batch = images[:batch_size]
        with torch.no_grad():
            encode_s = _time(lambda b=batch: captioner.encode(b), args.repeats)
            features = captioner.encode(batch)
        for name, options in (("greedy", DecodingOptions()), ("beam-3", DecodingOptions(method="beam", beam_size=3))):
            decode_s = _time(lambda o=options, f=features: captioner.caption_features(f, o), args.repeats)
            enc, dec = 1000 * encode_s / batch_size, 1000 * decode_s / batch_size
            print(f"{batch_size:>5} {name:>8} {enc:>15.1f} {dec:>15.1f} {enc + dec:>13.1f}")


if __name__ == "__main__":
    main()
