"""Forms of the grounding bias, scored by CIDEr-D and CHAIR on one val set: the photos are encoded once, then
decoded (the shipped model, default engine and decoding) with each bias. A row of docs/training-log.md.

    python benchmarks/grounding_variants.py --set mini            # coco-mini val: where settings are chosen
    python benchmarks/grounding_variants.py --set 3k --variants logp:1 floor:1.5:0.05

A variant is FORM:STRENGTH[:PARAM]; the bias added to a word naming concept c (p = the concept head's p(c | image)):
  logp:s        s log p                                   (captioner's --grounding s)
  pmi:s[:cap]   s log (p / prior(c)), at most s cap       (prior: c's share of the training photos' captions)
  cover:s:r     s log p + r where p > 0.5                 (a reward for naming what the image shows)
  floor:s:e     s log (p + e)                             (a softer penalty for what it does not)
  rerank:s:K    no bias: beam K's K captions (the decoding's length penalty), re-ranked by their score plus
                s log p for each object they name (captioner.grounding explains why this was not the way chosen)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from captioner.api import load_captioner
from captioner.coco import load_coco_captions
from captioner.grounding import (
    SHIPPED_CONCEPTS,
    GroundedDecoder,
    concept_labels,
    concept_word_table,
    load_concept_head,
)
from captioner.hallucination import caption_objects, hallucination_scores
from captioner.metrics import fast_scores
from captioner.options import RECOMMENDED, DecodingOptions

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SETS = {"mini": ("coco-mini/annotations/captions_val.json", "coco-mini/val"),
        "3k": ("coco-3k/annotations/captions_val.json", "coco-3k/val")}
TRAIN_CAPTIONS = "coco-3k/annotations/captions_train_with_mini.json"  # the concept head's training photos


class VariantBias(GroundedDecoder):
    """GroundedDecoder with another function of log p(concept | image) as the word bias."""

    def __init__(self, decoder, head, word_table: torch.Tensor, form: str, strength: float, param: float | None,
                 log_prior: torch.Tensor):
        super().__init__(decoder, head, word_table, strength)
        self.form, self.param, self.log_prior = form, param, log_prior

    def word_bias(self, features: torch.Tensor) -> torch.Tensor:
        log_p = self.head.log_probs(features)  # (B, C)
        s, param = self.strength, self.param
        if self.form == "logp":
            per_concept = s * log_p
        elif self.form == "pmi":
            per_concept = s * (log_p - self.log_prior)
            per_concept = per_concept if param is None else per_concept.clamp(max=s * param)
        elif self.form == "cover":
            per_concept = s * log_p + param * (log_p > torch.tensor(0.5).log()).float()
        elif self.form == "floor":
            per_concept = s * torch.log(log_p.exp() + param)
        else:
            raise SystemExit(f"unknown form {self.form!r}: logp, pmi, cover or floor")
        return per_concept @ self.word_table.to(per_concept.device)


def parse_variant(text: str) -> tuple[str, float, float | None]:
    form, strength, *rest = text.split(":")
    return form, float(strength), float(rest[0]) if rest else None


def rerank(result, log_p: torch.Tensor, concepts: tuple[str, ...], strength: float, length_penalty: float) -> str:
    """The candidate with the best length-normalised log-probability plus strength * log p(c | image) summed over
    the objects c it names. log_p: (C,) for this image."""
    index = {concept: i for i, concept in enumerate(concepts)}

    def score(candidate) -> float:
        grounded = sum(float(log_p[index[m.category]]) for m in caption_objects(candidate.caption))
        return candidate.log_prob / len(candidate.words) ** length_penalty + strength * grounded

    return max(result.candidates, key=score).caption


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", choices=sorted(SETS), default="mini")
    p.add_argument("--data", type=Path, default=DATA, help="the folder holding coco-mini/ and coco-3k/")
    p.add_argument("--variants", nargs="*", default=["logp:1", "pmi:1", "pmi:2:0", "cover:1.5:0.5", "floor:1.5:0.05"])
    p.add_argument("--decoding", type=json.loads, default={}, help='JSON overrides, e.g. \'{"beam_size": 3}\'')
    args = p.parse_args()

    captions_file, images = SETS[args.set]
    records = load_coco_captions(args.data / captions_file, args.data / images)
    train = load_coco_captions(args.data / TRAIN_CAPTIONS, args.data)
    log_prior = torch.stack([concept_labels(r.captions) for r in train]).mean(0).clamp(min=1e-3).log()  # (C,)
    captioner = load_captioner()
    plain = captioner.step_decoder
    head = load_concept_head(SHIPPED_CONCEPTS, captioner.encoder.name, captioner.preprocessing)
    word_table = concept_word_table(captioner.vocab, head.concepts)
    features = torch.cat([captioner.encode([captioner.open(r.path) for r in records[i:i + 16]])
                          for i in range(0, len(records), 16)])  # (N, L, D), encoded once
    references = {r.image_id: r.captions for r in records}
    options = DecodingOptions(**{**RECOMMENDED, **args.decoding})

    for variant in ["none", *args.variants]:
        form, strength, param = parse_variant(variant) if variant != "none" else ("none", 0.0, None)
        reranking = form == "rerank"
        captioner.step_decoder = plain if form in ("none", "rerank") else VariantBias(
            plain, head, word_table, form, strength, param, log_prior)
        run_options = replace(options, beam_size=int(param), num_captions=int(param)) if reranking else options
        predictions = {}
        for i in range(0, len(records), 16):
            batch = features[i:i + 16]
            log_p = head.log_probs(batch).detach() if reranking else None
            for j, (record, result) in enumerate(zip(records[i:i + 16], captioner.caption_features(batch, run_options),
                                                     strict=True)):
                predictions[record.image_id] = (rerank(result, log_p[j], head.concepts, strength,
                                                       options.length_penalty) if reranking else result.caption)
        scores = {"CIDEr-D": fast_scores(predictions, references)["CIDEr"],
                  **hallucination_scores(predictions, references)}
        print(json.dumps({"set": args.set, "variant": variant, "decoding": args.decoding,
                          **{k: round(v, 4) for k, v in scores.items()}}), flush=True)


if __name__ == "__main__":
    main()
