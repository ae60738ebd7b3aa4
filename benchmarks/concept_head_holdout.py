"""How well the concept head of grounded decoding recognises objects on photos it was not fitted on, with and
without negative photos (`captioner concepts --negatives`).

Fits the head on all but the last `--holdout` training photos (the same settings as `captioner concepts`) and
scores it on those: person AUC and mAP over the concepts the held-out photos' references mention. With
negatives, they are split in two by their sorted order: the head is fitted on the even ones and its p(person)
is reported on the odd ones, which it never saw (the non-COCO check set stays out of all of this).

    python benchmarks/concept_head_holdout.py --train-images ../shared/data \\
        --train-captions ../shared/data/coco-3k/annotations/captions_train_with_mini.json \\
        --negatives /path/to/wallpapers --cache-dir runs/.cache3k
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from captioner.coco import load_coco_captions
from captioner.encoder import Encoder
from captioner.grounding import (
    CONCEPTS,
    concept_labels,
    fit_concept_head,
    negative_records,
    negative_targets,
    pooled_features,
)
from captioner.imagefiles import find_images

PERSON = CONCEPTS.index("person")


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AP of one concept: the mean precision at the rank of each positive."""
    order = labels[scores.argsort(descending=True)].float()
    hits = order.cumsum(0)
    ranks = torch.arange(1, len(order) + 1)
    return float((hits / ranks * order).sum() / order.sum())


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The probability that a positive scores above a negative (ties count half)."""
    positive, negative = scores[labels.bool()], scores[~labels.bool()]
    above = (positive[:, None] > negative[None, :]).float() + 0.5 * (positive[:, None] == negative[None, :]).float()
    return float(above.mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-images", type=Path, required=True)
    p.add_argument("--train-captions", type=Path, required=True)
    p.add_argument("--negatives", type=Path, nargs="+", default=[])
    p.add_argument("--holdout", type=int, default=300)
    p.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    encoder = Encoder("efficientnet-lite0", image_size=448)
    # All the training photos at once: the cache the concept head and training already hold.
    records, pooled = pooled_features(load_coco_captions(args.train_captions, args.train_images), encoder,
                                      args.cache_dir)
    labels = torch.stack([concept_labels(r.captions) for r in records])
    fit_x, fit_y = pooled[: -args.holdout], labels[: -args.holdout]
    test_x, test_y = pooled[-args.holdout:], labels[-args.holdout:]

    rows = {"COCO only": (fit_x, fit_y, torch.ones_like(fit_y, dtype=torch.bool))}
    held_out_negatives = None
    if args.negatives:
        paths = find_images(args.negatives, recursive=True)[0]
        _, negative_x = pooled_features(negative_records(paths), encoder, args.cache_dir)
        fit_negatives, held_out_negatives = negative_x[0::2], negative_x[1::2]
        negative_y, negative_known = negative_targets(len(fit_negatives))
        rows[f"+ {len(fit_negatives)} negatives"] = (
            torch.cat([fit_x, fit_negatives]), torch.cat([fit_y, negative_y]),
            torch.cat([torch.ones_like(fit_y, dtype=torch.bool), negative_known]))

    results = {}
    present = [c for c in range(labels.size(1) - 1) if test_y[:, c].any()]  # the 80 categories held out photos name
    for name, (x, y, known) in rows.items():
        head = fit_concept_head(x, y, known=known)
        with torch.no_grad():
            probs = torch.sigmoid(head.classify(test_x))
            row = {"person AUC": auc(probs[:, PERSON], test_y[:, PERSON]),
                   "mAP": sum(average_precision(probs[:, c], test_y[:, c]) for c in present) / len(present),
                   "mean p(person), held-out COCO photos without people":
                       float(probs[:, PERSON][test_y[:, PERSON] == 0].mean())}
            if held_out_negatives is not None:
                negative_probs = torch.sigmoid(head.classify(held_out_negatives))
                row["mean p(person), held-out negatives"] = float(negative_probs[:, PERSON].mean())
                row["held-out negatives with p(person) > 0.5"] = float((negative_probs[:, PERSON] > 0.5).float().mean())
        results[name] = row
    if args.json:
        print(json.dumps(results))
        return
    for name, row in results.items():
        print(f"{name}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
