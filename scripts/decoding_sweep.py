"""Choose decoding settings on the validation split: greedy vs beam sizes, length penalty, n-gram blocking.

    python scripts/decoding_sweep.py CHECKPOINT --images VAL_DIR --captions VAL_CAPTIONS [--cache-dir runs/.cache]
        [--beam-sizes 2 3 5] [--length-penalties 0 0.5 1] [--no-repeat 0 2 3] [--json OUT.json]

Encodes the validation photos once (through the feature cache) and prints BLEU-4 and CIDEr-D (fast, no Java)
for every setting (greedy, and beam search for each beam size x length penalty; each with each no-repeat
n-gram size), best CIDEr first; `--json` also writes them to a file (what scripts/summarize_runs.py reads).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

from captioner.api import load_captioner
from captioner.coco import load_coco_captions
from captioner.decoding import DecodingOptions
from captioner.evaluate import validate
from captioner.features import build_feature_store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--captions", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, default=Path("runs/.cache"))
    p.add_argument("--beam-sizes", type=int, nargs="*", default=[2, 3, 5], help="none: greedy only")
    p.add_argument("--length-penalties", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--no-repeat", type=int, nargs="+", default=[0, 2, 3], help="n-gram sizes; 0 allows repeats")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args()
    captioner = load_captioner(args.checkpoint)
    records = load_coco_captions(args.captions, args.images)
    store = build_feature_store(records, captioner.encoder, args.cache_dir, progress=False)
    settings = [DecodingOptions(no_repeat_ngram_size=ngram) for ngram in args.no_repeat] + [
        DecodingOptions(method="beam", beam_size=k, length_penalty=lp, no_repeat_ngram_size=ngram)
        for k, lp, ngram in itertools.product(args.beam_sizes, args.length_penalties, args.no_repeat)
    ]
    rows = []
    for options in settings:
        scores, _ = validate(captioner.decoder, records, store, captioner.vocab, options)
        rows.append((scores["CIDEr"], scores["BLEU-4"], options))
    rows.sort(key=lambda r: -r[0])  # best CIDEr first
    print(f"{'method':>6} {'beam':>4} {'len.pen':>7} {'no-rep':>6} {'BLEU-4':>7} {'CIDEr':>6}")
    for cider, bleu, o in rows:
        print(f"{o.method:>6} {o.beam_size if o.method == 'beam' else '-':>4} {o.length_penalty:>7} "
              f"{o.no_repeat_ngram_size:>6} {bleu:>7.3f} {cider:>6.3f}")
    if args.json:
        args.json.write_text(json.dumps([{"BLEU-4": bleu, "CIDEr": cider, "decoding": dataclasses.asdict(o)}
                                         for cider, bleu, o in rows], indent=1))


if __name__ == "__main__":
    main()
