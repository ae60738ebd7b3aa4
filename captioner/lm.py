"""Caption language-model pretraining: teach the decoder to write COCO-style sentences from text alone.

With few photos, most of what a captioner must learn is the language of captions. COCO has far more caption
text than photos here, so the decoder's embeddings, LSTM and output layer are first trained as a language
model with the image absent (a single all-zero feature location: context vector and image summary are 0),
then `captioner train --init-from LM.pt` goes on with images.

    captioner pretrain-lm --text captions_text_only.json --train-captions captions_train.json \
        --output-dir runs/lm --epochs 3
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import save_checkpoint
from .coco import caption_image_ids, load_caption_texts
from .encoder import Encoder, Preprocessing, get_backbone
from .model import AttentionDecoder, caption_loss
from .train import add_model_arguments, config_from_args
from .utils import optimizer_step, set_seed, setup_logging, stop_logging
from .vocab import Vocabulary

log = logging.getLogger("captioner.lm")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Pretrain the decoder as a caption language model", add_help=add_help)
    p.add_argument("--text", type=Path, action="append", required=True,
                   help="COCO-format captions file(s) used as text only (repeatable)")
    p.add_argument("--train-captions", type=Path, action="append", default=[],
                   help="the image-training captions: they join the LM text and the vocabulary")
    p.add_argument("--val-captions", type=Path, action="append", default=[],
                   help="captions file(s) of the photos the captioner will be validated on: their captions are "
                   "left out of the LM text and vocabulary (repeatable)")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--min-word-count", type=int, default=5)
    p.add_argument("--max-words", type=int, default=30)
    add_model_arguments(p)  # the same architecture flags as `captioner train` (--encoder sets D)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled (AdamW) weight decay, as in training")
    p.add_argument("--grad-clip", type=float, default=5.0)
    p.add_argument("--holdout", type=float, default=0.02, help="fraction of the text kept for perplexity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def no_image_features(batch_size: int, feature_dim: int, device: torch.device) -> torch.Tensor:
    """(B, 1, D) zeros: one location, nothing in it. Attention over it is trivially 1, the context is 0."""
    return torch.zeros(batch_size, 1, feature_dim, device=device)


def _collate(batch: Sequence[list[int]], pad_id: int = 0) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(ids) for ids in batch], batch_first=True,
                                           padding_value=pad_id)


def lm_epoch(
    decoder: AttentionDecoder,
    captions: Sequence[list[int]],
    optimizer: torch.optim.Optimizer | None,
    batch_size: int,
    grad_clip: float = 5.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> float:
    """One pass over encoded captions; trains when `optimizer` is given. Returns cross-entropy per token."""
    device = next(decoder.parameters()).device
    training = optimizer is not None
    decoder.train(training)
    loader = DataLoader(captions, batch_size=batch_size, shuffle=training, generator=generator, collate_fn=_collate)
    total, tokens = 0.0, 0
    with torch.set_grad_enabled(training):
        for batch in tqdm(loader, desc="LM", unit="batch", disable=not progress, leave=False):
            batch = batch.to(device)
            out = decoder(no_image_features(batch.size(0), decoder.config.feature_dim, device), batch)
            loss, ce = caption_loss(out.logits, batch, out.alphas, attention_reg=0.0)  # loss == ce without the penalty
            if training:
                optimizer_step(loss, optimizer, [p for p in decoder.parameters() if p.requires_grad], grad_clip)
            n = int((batch[:, 1:] != 0).sum())
            total += float(ce.detach()) * n
            tokens += n
    return total / max(tokens, 1)


def load_lm_text(text_files: Sequence[Path], val_captions_files: Sequence[Path]) -> list[str]:
    """The captions of `text_files`, without those of the photos in `val_captions_files`."""
    val_ids = set().union(*(caption_image_ids(f) for f in val_captions_files))
    return [t for f in text_files for t in load_caption_texts(f, exclude_image_ids=val_ids)]


def main(args: argparse.Namespace) -> dict[str, float]:
    args.output_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(args.output_dir / "lm.log")
    try:
        return pretrain(args)
    finally:
        stop_logging()


def pretrain(args: argparse.Namespace) -> dict[str, float]:
    """Train the decoder as a language model on caption text; writes lm.pt and lm_metrics.jsonl."""
    set_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    corpus = load_lm_text(args.text + args.train_captions, args.val_captions)
    vocab = Vocabulary.build(corpus, min_count=args.min_word_count)
    random.Random(args.seed).shuffle(corpus)
    n_holdout = max(1, int(len(corpus) * args.holdout))
    holdout = [vocab.encode(t, args.max_words) for t in corpus[:n_holdout]]
    train_ids = [vocab.encode(t, args.max_words) for t in corpus[n_holdout:]]
    log.info("LM text: %d captions (%d held out), vocabulary %d words", len(train_ids), len(holdout), len(vocab))

    # The backbone's own values, as in `captioner train`: D and preprocessing from its registry entry, and with
    # --semantic the class count of its classifier (an untrained copy is enough to read it; its random numbers
    # are drawn aside, so the decoder starts exactly as it would without it).
    spec = get_backbone(args.encoder)
    classes = 0
    if args.semantic:
        with torch.random.fork_rng():
            classes = Encoder(args.encoder, pretrained=False, image_size=args.image_size).classifier.out_features
    decoder = AttentionDecoder(config_from_args(args, len(vocab), spec.feature_dim, classes)).to(device)
    # AdamW as in training (without weight decay it is Adam).
    optimizer = torch.optim.AdamW([p for p in decoder.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    history = []
    for epoch in range(1, args.epochs + 1):
        order = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        train_ce = lm_epoch(decoder, train_ids, optimizer, args.batch_size, args.grad_clip, order,
                            progress=not args.no_progress)
        held_ce = lm_epoch(decoder, holdout, None, args.batch_size)
        row = {"epoch": epoch, "train_perplexity": math.exp(train_ce), "holdout_perplexity": math.exp(held_ce)}
        history.append(row)
        log.info("LM epoch %d: train ppl %.1f, held-out ppl %.1f", epoch, row["train_perplexity"],
                 row["holdout_perplexity"])
        with (args.output_dir / "lm_metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
    preprocessing = Preprocessing(args.image_size, spec.mean, spec.std)  # what Encoder(args.encoder) would use
    save_checkpoint(args.output_dir / "lm.pt", decoder, vocab, spec.name, preprocessing,
                    metrics={"lm": history[-1] if history else {}})
    return history[-1] if history else {}
