"""Concept grounding: the decoder may name an object only as far as the image shows it.

A small concept head reads the feature grid (mean and max over the L locations) and gives, for each of the 80
COCO categories and for "several" (more than one of something), the probability that a caption of this image
would mention it; it is trained on the training photos' own reference captions (`fit_concept_head`), so it
needs no box annotations. At decoding time every word that names a category (through the synonym table of
`captioner.hallucination`) gets `strength * log p(category | image)` added to its log-probability, and every
word that says "several" gets `strength * log p(several | image)`: a product of experts between the language
model and the image's concepts, renormalised by decoding's log-softmax. `GroundedDecoder` wraps any
`init_state` / `step` model (one decoder, an ensemble, the int8 decoder), so greedy, sampling and beam search
run on it unchanged.

Why not only re-rank the beam: with the beam widths that meet the latency target, the n-best rarely holds a
caption without the invented person; biasing each step changes what is said next ("a cat" instead of "a woman
... with a cat").
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, atomic_torch_save
from .coco import ImageRecord, load_coco_captions
from .encoder import Encoder, Preprocessing
from .features import build_feature_store
from .hallucination import COUNT_WORDS, SYNONYMS, caption_objects, reference_objects, says_several
from .imagefiles import find_images
from .vocab import Vocabulary

CONCEPTS: tuple[str, ...] = (*SYNONYMS, "several")
MIN_LOG_PROB = -20.0  # floor of log p(concept): a word's bias stays finite, so decoding can always say something


class ConceptHead(nn.Module):
    """features (B, L, D) -> concept logits (B, C): a linear layer on standardised [mean; max] pooling."""

    def __init__(self, feature_dim: int, concepts: Sequence[str] = CONCEPTS):
        super().__init__()
        self.concepts = tuple(concepts)
        self.register_buffer("mean", torch.zeros(2 * feature_dim))
        self.register_buffer("std", torch.ones(2 * feature_dim))
        self.linear = nn.Linear(2 * feature_dim, len(self.concepts))

    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        features = features.float()
        return torch.cat([features.mean(dim=1), features.amax(dim=1)], dim=-1)  # (B, 2D)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled features (B, 2D) -> concept logits (B, C)."""
        return self.linear((pooled - self.mean) / self.std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pool(features))

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, L, D) -> log p(concept | image) (B, C), floored at MIN_LOG_PROB."""
        return F.logsigmoid(self(features)).clamp(min=MIN_LOG_PROB)


def concept_labels(references: Sequence[str]) -> torch.Tensor:
    """(C,) 1 for every concept an image's reference captions mention ("several": any of them says more than one)."""
    mentioned = reference_objects(references)
    several = any(says_several(r) for r in references)
    return torch.tensor([c in mentioned for c in SYNONYMS] + [several], dtype=torch.float32)


def fit_concept_head(
    features: torch.Tensor, labels: torch.Tensor, steps: int = 600, lr: float = 1e-2, l2: float = 1e-2, seed: int = 0,
    known: torch.Tensor | None = None,
) -> ConceptHead:
    """Logistic regression, full batch: pooled features (N, 2D) of the training photos, labels (N, C), and
    optionally which labels are known (N, C) bool: an unknown one adds no loss.
    The settings were chosen on 300 held-out training photos of coco-3k (docs/training-log.md)."""
    torch.manual_seed(seed)
    head = ConceptHead(features.size(-1) // 2)
    head.mean.copy_(features.mean(dim=0))
    head.std.copy_(features.std(dim=0) + 1e-6)
    normalised = (features - head.mean) / head.std
    optimizer = torch.optim.Adam(head.linear.parameters(), lr=lr)
    weight = None if known is None else known.float() * known.numel() / known.sum()  # the same mean scale
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head.linear(normalised), labels, weight=weight)
        (loss + l2 * head.linear.weight.pow(2).sum()).backward()
        optimizer.step()
    return head.eval()


def concept_word_table(vocab: Vocabulary, concepts: Sequence[str] = CONCEPTS) -> torch.Tensor:
    """(C, V) 0/1: which vocabulary words name each concept (plurals also say "several")."""
    table = torch.zeros(len(concepts), len(vocab))
    index = {c: i for i, c in enumerate(concepts)}
    for token_id, word in enumerate(vocab.itos):
        mentions = caption_objects([word])
        for mention in mentions:
            table[index[mention.category], token_id] = 1.0
        if word in COUNT_WORDS or any(m.plural for m in mentions):
            table[index["several"], token_id] = 1.0
    return table


@dataclass
class GroundedState:
    """The wrapped model's state and each row's word bias (N, V)."""

    inner: object
    bias: torch.Tensor

    @property
    def beta(self) -> torch.Tensor:
        return self.inner.beta

    def select(self, index: torch.Tensor, same_image: bool = False) -> GroundedState:
        return GroundedState(self.inner.select(index, same_image=same_image), self.bias.index_select(0, index))


class GroundedDecoder:
    """Any `init_state` / `step` model with the concept bias added to its next-word log-probabilities."""

    def __init__(self, decoder, head: ConceptHead, word_table: torch.Tensor, strength: float):
        self.decoder, self.head, self.strength = decoder, head, strength
        self.word_table = word_table  # (C, V)

    def word_bias(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, L, D) -> (B, V): strength * the sum of log p(concept) over the concepts a word names."""
        log_p = self.head.log_probs(features)  # (B, C)
        return self.strength * log_p @ self.word_table.to(log_p.device)

    def init_state(self, features: torch.Tensor) -> GroundedState:
        return GroundedState(self.decoder.init_state(features), self.word_bias(features))

    def step(self, state: GroundedState, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, GroundedState]:
        logits, alpha, inner = self.decoder.step(state.inner, tokens)
        return F.log_softmax(logits.float(), dim=-1) + state.bias, alpha, GroundedState(inner, state.bias)


# ----------------------------------------------------------------------------------------------------------
# The concept head's own file: it belongs to a backbone and its input size (the feature space), not to a
# decoder, so one head serves every checkpoint over that backbone (the word table is built from each
# checkpoint's vocabulary when it loads).

CONCEPTS_FORMAT = "captioner-concepts"
SHIPPED_CONCEPTS = Path(__file__).resolve().parent / "weights" / "concepts-efficientnet-lite0-448.pt"


def save_concept_head(path: str | Path, head: ConceptHead, encoder_name: str, preprocessing: Preprocessing,
                      metrics: dict | None = None) -> None:
    state = {k: v.detach().cpu().half() for k, v in head.state_dict().items()}  # fp16: a 0.4 MB file
    atomic_torch_save({"format": CONCEPTS_FORMAT, "concepts": list(head.concepts), "encoder": encoder_name,
                       "preprocessing": preprocessing.to_json(), "state": state, "metrics": metrics or {}}, path)


def load_concept_head(path: str | Path, encoder_name: str, preprocessing: Preprocessing) -> ConceptHead:
    """Read a concept head, refusing one made for another backbone or input size (its features would differ)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # never suggest unsafe loading: say what it is not
        raise CheckpointError(f"{path}: not a captioner concept head") from None
    if not isinstance(payload, dict) or payload.get("format") != CONCEPTS_FORMAT:
        raise CheckpointError(f"{path}: not a captioner concept head (no '{CONCEPTS_FORMAT}' header)")
    if payload["encoder"] != encoder_name or Preprocessing.from_json(payload["preprocessing"]) != preprocessing:
        raise CheckpointError(f"{path}: a concept head for {payload['encoder']} features, not this model's "
                              f"{encoder_name} at {preprocessing.image_size} px")
    head = ConceptHead(payload["state"]["linear.weight"].shape[1] // 2, payload["concepts"])
    head.load_state_dict({k: v.float() for k, v in payload["state"].items()})
    return head.eval()


def grounded(decoder, head: ConceptHead, vocab: Vocabulary, strength: float) -> GroundedDecoder:
    return GroundedDecoder(decoder, head, concept_word_table(vocab, head.concepts), strength)


NEGATIVE_IDS = 10**12  # image ids of the negative photos: far above any COCO id, so never a cached COCO photo


def negative_records(paths: Sequence[Path]) -> list[ImageRecord]:
    """Photos known to show none of the 80 categories (no captions): ids from NEGATIVE_IDS up."""
    return [ImageRecord(NEGATIVE_IDS + i, path, ()) for i, path in enumerate(paths)]


def negative_targets(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (count, C) and which of them are known (count, C) for negative photos: 0 for the 80 categories,
    "several" unknown (a wallpaper of leaves may well be many of something)."""
    known = torch.ones(count, len(CONCEPTS), dtype=torch.bool)
    known[:, CONCEPTS.index("several")] = False
    return torch.zeros(count, len(CONCEPTS)), known


def pooled_features(records: Sequence[ImageRecord], encoder: Encoder, cache_root: str | Path,
                    progress: bool = True) -> tuple[list[ImageRecord], torch.Tensor]:
    """The records whose photos could be read and their pooled features (N, 2D), through the feature cache."""
    store = build_feature_store(records, encoder, cache_root, progress=progress)
    kept = [r for r in records if store.has(r.image_id)]
    return kept, torch.cat([ConceptHead.pool(store.get(r.image_id)[None]) for r in kept])


def fit_from_records(records: Sequence[ImageRecord], encoder: Encoder, cache_root: str | Path,
                     progress: bool = True, negatives: Sequence[Path] = (), **fit_options) -> ConceptHead:
    """Encode the training photos once (the training feature cache: shared with `captioner train`), label each
    by its reference captions, fit the head.

    `negatives`: photos of no COCO category that are not COCO-like (wallpapers, textures). COCO alone never
    shows the head a photo without people that is not a COCO scene, so it gives p(person) 0.4-0.9 to a brick
    wall; these teach it 0 for the 80 categories (`negative_targets`)."""
    kept, pooled = pooled_features(records, encoder, cache_root, progress)
    labels = torch.stack([concept_labels(r.captions) for r in kept])  # (N, C)
    known = torch.ones_like(labels, dtype=torch.bool)
    if negatives:
        negative, negative_pooled = pooled_features(negative_records(negatives), encoder, cache_root, progress)
        if not negative:
            raise ValueError("none of the negative photos could be read")
        negative_labels, negative_known = negative_targets(len(negative))
        pooled, labels = torch.cat([pooled, negative_pooled]), torch.cat([labels, negative_labels])
        known = torch.cat([known, negative_known])
    return fit_concept_head(pooled, labels, known=known, **fit_options)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fit a concept head for grounded decoding", add_help=add_help)
    p.add_argument("--train-images", type=Path, required=True, help="folder the captions file's file_names are in")
    p.add_argument("--train-captions", type=Path, required=True, help="COCO captions file of the training photos")
    p.add_argument("--encoder", default="efficientnet-lite0", help="the backbone of the checkpoints it will serve")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--negatives", type=Path, nargs="+", default=[], metavar="FOLDER",
                   help="folders of photos that show none of the 80 COCO categories and are not COCO-like "
                        "(wallpapers, textures): negatives for every category (scripts/concept_negatives.py)")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="feature cache (shared with train)")
    p.add_argument("-o", "--output", type=Path, required=True)
    return p


def main(args: argparse.Namespace) -> Path:
    records = load_coco_captions(args.train_captions, args.train_images)
    negatives, _ = find_images(args.negatives, recursive=True)
    if args.negatives and not negatives:
        raise SystemExit(f"no images in {', '.join(map(str, args.negatives))}")
    encoder = Encoder(args.encoder, image_size=args.image_size)
    head = fit_from_records(records, encoder, args.cache_dir, negatives=negatives)
    save_concept_head(args.output, head, encoder.name, encoder.preprocessing,
                      {"train_images": len(records), "negative_images": len(negatives)})
    print(f"{args.output}: concept head over {len(head.concepts)} concepts from {len(records)} photos; "
          f"use it with --grounding 1 --concepts {args.output}")
    return args.output
