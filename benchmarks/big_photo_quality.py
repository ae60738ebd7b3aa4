"""What decoding a big JPEG at a reduced DCT scale costs in caption quality (slim pipeline, default decoding).

    python benchmarks/big_photo_quality.py [--data ../shared/data/coco-3k] [--limit 300] [--megapixels 12]

Each val photo is upscaled to ~12 MP and saved as a JPEG (quality 90, as cameras do), then captioned from:
"640 px" (the original photo), "model open" (what `captioner caption` and the service do: 1/4 DCT scale, block
averaging, `captioner.images.open_image(square_resize_follows=True)`), "1/4 direct" (1/4 scale, bicubic resize
only), "1/2" (1/2 scale, bicubic resize) and "full" (full decode, bicubic resize). CIDEr-D of captioner.metrics
against the 5 references; each row against "full" as a mean per-photo difference with a 95% paired bootstrap
interval, and the decode+resize time of the first photo (median of 20).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

from captioner.cider import CiderD
from captioner.coco import load_coco_captions
from captioner.images import open_image, resize_square
from captioner.inference import load_bundle
from captioner.metrics import tokenize

REPO = Path(__file__).resolve().parent.parent


def big_jpeg(path: Path, megapixels: float) -> bytes:
    image = Image.open(path).convert("RGB")
    scale = (megapixels * 1e6 / (image.width * image.height)) ** 0.5
    size = (round(image.width * scale), round(image.height * scale))
    buffer = io.BytesIO()
    image.resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def at_scale(data: bytes, min_side: int) -> Image.Image:
    """The smallest power-of-two DCT scale keeping both sides >= min_side (0: full decode)."""
    kwargs = {"min_height": min_side, "min_width": min_side, "min_factor": 2} if min_side else {}
    return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB", **kwargs))


def paired_interval(diff: np.ndarray, rng: np.random.Generator, draws: int = 4000) -> tuple[float, float]:
    means = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(draws)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "coco-3k")
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--megapixels", type=float, default=12.0)
    args = p.parse_args()
    records = load_coco_captions(args.data / "annotations" / "captions_val.json", args.data / "val")[: args.limit]
    captioner = load_bundle()
    size = captioner.preprocessing.image_size
    ways = {
        "640 px": None,
        "model open": captioner.open,
        "1/4 direct": lambda data: at_scale(data, size),
        "1/2": lambda data: at_scale(data, 2 * size),
        "full": lambda data: open_image(data, max_pixels=10**9),
    }
    captions: dict[str, list[str]] = {name: [] for name in ways}
    first = None
    for k, record in enumerate(records):
        path = record.path
        data = big_jpeg(path, args.megapixels)
        first = first or data
        inputs = [captioner.open(path) if way is None else way(data) for way in ways.values()]
        for name, result in zip(ways, captioner.caption(inputs), strict=True):
            captions[name].append(result.caption)
        if (k + 1) % 50 == 0:
            print(f"  {k + 1} / {len(records)} photos", flush=True)

    refs = [[tokenize(r) for r in record.captions] for record in records]
    cider = CiderD(refs)
    per_photo = {
        name: np.array([cider.score(tokenize(c), r) for c, r in zip(caps, refs, strict=True)])
        for name, caps in captions.items()
    }
    rng = np.random.default_rng(0)
    print(
        f"\n{len(records)} photos of {args.data.name} val as ~{args.megapixels:g} MP JPEGs, slim pipeline, default "
        "decoding (CIDEr-D of captioner.metrics):"
    )
    for name, way in ways.items():
        scores = per_photo[name]
        diff = scores - per_photo["full"]
        low, high = paired_interval(diff, rng)
        ms = ""
        if way is not None:
            times = []
            for _ in range(21):
                start = time.perf_counter()
                resize_square(way(first), size)
                times.append(time.perf_counter() - start)
            ms = f"  decode+resize {1000 * np.median(times[1:]):6.1f} ms"
        same = sum(a == b for a, b in zip(captions[name], captions["640 px"], strict=True))
        print(
            f"  {name:>10}: CIDEr-D {scores.mean():.4f}  vs full {diff.mean():+.4f} [{low:+.4f}, {high:+.4f}]  "
            f"same caption as 640 px: {same}{ms}"
        )


if __name__ == "__main__":
    main()
