"""Score a checkpoint on the non-COCO check set (benchmarks/data/noncoco: 20 photos no COCO split holds, each
with the words a right caption needs and the objects really in it): how many captions are right, how many
invent a person, a count or any object. Prints one line per photo, then the shares (--json: one object).

    python benchmarks/noncoco_check.py                       # the shipped model, default decoding
    python benchmarks/noncoco_check.py --checkpoint runs/x/best.pt --method greedy --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from captioner.api import load_captioner
from captioner.evaluate import add_engine_arguments, engine_options
from captioner.hallucination import check_photo, check_set_scores, load_check_set
from captioner.options import add_decoding_arguments, decoding_options

MANIFEST = Path(__file__).resolve().parent / "data" / "noncoco" / "manifest.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped model")
    p.add_argument("--manifest", type=Path, default=MANIFEST)
    p.add_argument("--json", action="store_true")
    add_engine_arguments(p)
    add_decoding_arguments(p, num_captions=False)
    args = p.parse_args()
    captioner = load_captioner(args.checkpoint, **engine_options(args))
    options = decoding_options(args)
    photos = load_check_set(args.manifest)
    results = [check_photo(photo, captioner.caption(photo.file, options).caption) for photo in photos]
    scores = check_set_scores(results)
    scores["checkpoint"] = str(captioner.checkpoint.path)
    if args.json:
        captions = {photo.file.name: result.caption for photo, result in zip(photos, results, strict=True)}
        print(json.dumps({**scores, "captions": captions}))
        return
    for photo, result in zip(photos, results, strict=True):
        flags = [f"invents {', '.join(result.invented)}"] if result.invented else []
        flags += ["invents a count"] if result.invents_count else []
        flags += [] if result.right else ["not right"]
        print(f"{photo.file.name:>18}: {result.caption}" + (f"  [{'; '.join(flags)}]" if flags else ""))
    print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
