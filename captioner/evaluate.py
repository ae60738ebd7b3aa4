"""Scoring by real decoding: `validate` (training's validation, on cached features), `caption_records` and
`captioner evaluate` (image files, official pycocoevalcap metrics), both with reference perplexity.

    captioner evaluate --checkpoint best.pt --images val2017/ --captions captions_val2017.json \
        --method beam --beam-size 3 --results results.json --json
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .api import Captioner, load_captioner
from .coco import ImageRecord, collate_captions, load_coco_captions, load_karpathy_split
from .decoding import DecodingOptions, generate
from .distributed import SINGLE_PROCESS, DistributedEnv, gather_objects
from .engine import ENGINES
from .features import FeatureStore, ImageFileDataset
from .hallucination import hallucination_scores, load_instance_categories
from .metrics import coco_scores, fast_scores, java_available
from .model import AttentionDecoder, caption_loss
from .options import add_decoding_arguments, decoding_options
from .vocab import Vocabulary


@torch.no_grad()
def validate(
    decoder: AttentionDecoder,
    records: Sequence[ImageRecord],
    features: FeatureStore,
    vocab: Vocabulary,
    options: DecodingOptions | None = None,
    batch_size: int = 64,
    env: DistributedEnv = SINGLE_PROCESS,
) -> tuple[dict[str, float], dict[int, str]]:
    """Validation the honest way: decode every image and score the captions (BLEU-4, CIDEr-D, and how much they
    invent: CHAIR-i/CHAIR-s, people and count invention against the references), plus teacher-forced
    cross-entropy on the reference captions for perplexity. Under DDP each rank decodes a shard and every rank
    gets the same gathered scores."""
    decoder.eval()
    device = next(decoder.parameters()).device
    options = options or DecodingOptions(method="greedy")
    records = [r for r in records if features.has(r.image_id)]
    shard = records[env.rank :: env.world_size]
    predictions: dict[int, str] = {}
    ce_sum, tokens = 0.0, 0
    for start in range(0, len(shard), batch_size):
        chunk = shard[start : start + batch_size]
        feats = torch.stack([features.get(r.image_id) for r in chunk]).to(device)  # (B, L, D)
        for record, hyps in zip(chunk, generate(decoder, feats, vocab, options), strict=True):
            predictions[record.image_id] = vocab.decode(hyps[0].tokens)
        ce, n = reference_cross_entropy(decoder, feats, [r.captions for r in chunk], vocab)
        ce_sum += ce * n
        tokens += n
    parts = gather_objects((predictions, ce_sum, tokens), env)  # in rank order, the same on every rank
    predictions = {image_id: text for part, _, _ in parts for image_id, text in part.items()}
    ce_sum, tokens = sum(part[1] for part in parts), sum(part[2] for part in parts)
    references = {r.image_id: list(r.captions) for r in records}
    scores = {**fast_scores(predictions, references), **hallucination_scores(predictions, references)}
    ce = ce_sum / max(tokens, 1)
    return {**scores, "val_cross_entropy": ce, "val_perplexity": math.exp(ce)}, predictions


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """How the model runs (caption, evaluate, visualize): see captioner/engine.py and docs/performance.md."""
    g = p.add_argument_group("inference engine")
    g.add_argument("--engine", choices=ENGINES, default="auto",
                   help="auto (default): ONNX Runtime for the encoder on CPU when installed, with an int8 decoder; "
                        "torch: eager PyTorch in fp32 throughout")
    g.add_argument("--fp32-decoder", action="store_true",
                   help="with the onnx engine, keep the decoder in fp32 instead of int8")
    g.add_argument("--grounding", type=float, default=0.0, metavar="STRENGTH",
                   help="ground object words in what the image shows (concept head; 1: fewer invented objects "
                        "for a little CIDEr; 0: off)")
    g.add_argument("--concepts", type=Path, default=None,
                   help="with --grounding: a concept head from `captioner concepts` (default: the shipped one)")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags as load_captioner keywords."""
    if not math.isfinite(args.grounding) or args.grounding < 0:
        raise SystemExit(f"--grounding {args.grounding}: give a finite number >= 0 (0: off)")
    return {"engine": args.engine, "quantize_decoder": False if args.fp32_decoder else None,
            "grounding": args.grounding, "concepts": args.concepts}


def reference_cross_entropy(
    decoder: AttentionDecoder, features: torch.Tensor, references: Sequence[Sequence[str]], vocab: Vocabulary
) -> tuple[float, int]:
    """Mean per-token cross-entropy of all reference captions given their image features (B, L, D)."""
    batch = [(features[i], torch.tensor(vocab.encode(c))) for i, refs in enumerate(references) for c in refs]
    feats, captions = collate_captions(batch, vocab.pad_id)
    out = decoder(feats, captions.to(features.device))
    _, ce = caption_loss(out.logits, captions.to(features.device), out.alphas, attention_reg=0.0)
    return float(ce), int((captions[:, 1:] != vocab.pad_id).sum())


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Score a captioner on a COCO-format set", add_help=add_help)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped model")
    p.add_argument("--images", type=Path, help="folder of images (with --captions)")
    p.add_argument("--captions", type=Path, help="COCO captions file")
    p.add_argument("--instances", type=Path, metavar="INSTANCES_JSON",
                   help="COCO instance annotations (instances_val2017.json): their categories count as there "
                        "for the hallucination metrics, beside what the reference captions mention")
    p.add_argument("--karpathy-split", type=Path, help="dataset_coco.json (instead of --images/--captions)")
    p.add_argument("--image-root", type=Path, help="with --karpathy-split: folder holding the `filepath`s")
    p.add_argument("--split", default="test", help="with --karpathy-split: which split (default test)")
    p.add_argument("--limit", type=int, default=0, help="first N images only (0: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--results", type=Path, help="write predictions here in COCO results format")
    p.add_argument("--no-java", action="store_true", help="skip Java metrics: BLEU-4 and CIDEr-D only")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--trivial-baseline", type=Path, metavar="TRAIN_CAPTIONS",
                   help="score no model: give every image the most frequent caption of this COCO captions file")
    add_engine_arguments(p)
    add_decoding_arguments(p, num_captions=False)
    return p


def load_eval_records(args: argparse.Namespace) -> list[ImageRecord]:
    if args.karpathy_split:
        records = load_karpathy_split(args.karpathy_split, args.image_root or args.karpathy_split.parent,
                                      (args.split,))
    elif args.images and args.captions:
        records = load_coco_captions(args.captions, args.images)
    else:
        raise SystemExit("give --images and --captions, or --karpathy-split")
    return records[: args.limit] if args.limit else records


@torch.inference_mode()
def caption_records(
    captioner: Captioner,
    records: Sequence[ImageRecord],
    options: DecodingOptions,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[dict[int, str], float, list[str]]:
    """Decode every readable image file (batched) -> (predictions by image id, reference perplexity, errors)."""
    dataset = ImageFileDataset([r.path for r in records], captioner.preprocessing, range(len(records)))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=lambda b: b)
    predictions: dict[int, str] = {}
    errors: list[str] = []
    total_ce, total_tokens = 0.0, 0
    for batch in tqdm(loader, desc="captioning", unit="batch", disable=not progress):
        errors.extend(error for _, x, error in batch if x is None)
        good = [(records[i], x) for i, x, _ in batch if x is not None]
        if not good:
            continue
        features = captioner.encode_pixels(torch.stack([x for _, x in good]))  # (B, L, D)
        for (record, _), result in zip(good, captioner.caption_features(features, options), strict=True):
            predictions[record.image_id] = result.caption
        ce, tokens = reference_cross_entropy(captioner.decoder, features, [r.captions for r, _ in good],
                                             captioner.vocab)
        total_ce += ce * tokens
        total_tokens += tokens
    perplexity = math.exp(total_ce / max(total_tokens, 1))
    return predictions, perplexity, errors


def most_frequent_caption(captions_file: Path) -> str:
    """The trivial baseline: the training caption (lower-cased, punctuation stripped) seen most often."""
    from collections import Counter

    from .coco import load_caption_texts
    from .vocab import tokenize

    counts = Counter(" ".join(tokenize(c)) for c in load_caption_texts(captions_file))
    return min(counts, key=lambda c: (-counts[c], c))


def main(args: argparse.Namespace) -> dict[str, Any]:
    records = load_eval_records(args)
    references = {r.image_id: list(r.captions) for r in records}
    if args.trivial_baseline:
        caption = most_frequent_caption(args.trivial_baseline)
        scores = coco_scores({i: caption for i in references}, references)
        result = {**scores, "images": len(references), "baseline_caption": caption}
        print(json.dumps(result) if args.json else "\n".join(f"{k:>18}: {v}" for k, v in result.items()))
        return result
    captioner = load_captioner(args.checkpoint, device=args.device, **engine_options(args))
    options = decoding_options(args)
    predictions, perplexity, errors = caption_records(
        captioner, records, options, args.batch_size, args.num_workers, progress=not args.json
    )
    if args.no_java or not java_available():
        scores = fast_scores(predictions, references)
        scores["note"] = "Java not used: BLEU-4 and CIDEr-D on captioner's tokenizer only"
    else:
        scores = coco_scores(predictions, references)
    instances = load_instance_categories(args.instances) if args.instances else None
    scores.update(hallucination_scores(predictions, references, instances))
    result: dict[str, Any] = {
        **scores,
        "perplexity": perplexity,
        "images": len(predictions),
        "unreadable_images": len(errors),
        "decoding": {k: v for k, v in vars(options).items()},
        "engine": captioner.engine,
        "decoder": "int8" if captioner.quantized else "fp32",
        "checkpoint": str(captioner.checkpoint.path),
    }
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in predictions.items()]))
        result["results_file"] = str(args.results)
    if args.json:
        print(json.dumps(result))
    else:
        for error in errors:
            print(f"skipped: {error}")
        for key, value in result.items():
            print(f"{key:>18}: {value:.4f}" if isinstance(value, float) else f"{key:>18}: {value}")
    return result
