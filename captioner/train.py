"""Training: masked cross-entropy with teacher forcing, validation by real greedy decoding.

Laid out like torchvision's reference scripts: `train_one_epoch`, `evaluate`, `main`, `get_args_parser`.

    captioner train --train-images DIR --train-captions FILE --val-images DIR --val-captions FILE \
        --output-dir runs/x

Each epoch appends one JSON line to OUTPUT/metrics.jsonl (loss, cross-entropy, perplexity = exp(CE), val
BLEU-4 / CIDEr from decoding, learning rate), and writes OUTPUT/last.pt (everything --resume needs) and
OUTPUT/best.pt (best validation score so far) atomically.

Several GPUs or nodes: `torchrun --nproc-per-node N -m captioner train ...` (DistributedDataParallel; the
global batch, the loss normalisation and the shuffling are those of one process, so N processes follow the
single-process trajectory; rank 0 alone writes checkpoints and logs; validation decoding is sharded).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import scst
from .checkpoint import Checkpoint, CheckpointError, average_checkpoints, load_checkpoint, save_checkpoint
from .coco import (
    CaptionDataset,
    ImageRecord,
    collate_captions,
    load_caption_texts,
    load_coco_captions,
    load_karpathy_split,
)
from .decoding import DecodingOptions, generate
from .distributed import (
    SINGLE_PROCESS,
    DistributedEnv,
    all_reduce_sum,
    barrier,
    gather_objects,
    init_distributed,
    shutdown,
    unwrap_model,
)
from .encoder import DEFAULT_BACKBONE, DEFAULT_IMAGE_SIZE, Encoder
from .features import VIEWS, FeatureStore, build_feature_store
from .metrics import fast_scores
from .model import AttentionDecoder, CaptionerConfig, caption_loss, hard_attention_loss
from .vocab import Vocabulary

log = logging.getLogger("captioner.train")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a Show, Attend and Tell captioner", add_help=add_help)
    data = p.add_argument_group("data (COCO annotation files, or a Karpathy split file)")
    data.add_argument("--train-images", type=Path, help="folder of training images (e.g. train2017/)")
    data.add_argument("--train-captions", type=Path, help="COCO captions file (e.g. captions_train2017.json)")
    data.add_argument("--val-images", type=Path, help="folder of validation images")
    data.add_argument("--val-captions", type=Path, help="COCO captions file for validation")
    data.add_argument("--karpathy-split", type=Path, help="dataset_coco.json: train+restval / val")
    data.add_argument("--image-root", type=Path, help="with --karpathy-split: the folder holding `filepath`s")
    data.add_argument("--vocab-text", type=Path, action="append", default=[],
                      help="extra COCO-format captions file(s) whose text joins the vocabulary (no images)")
    data.add_argument("--min-word-count", type=int, default=5, help="rarer words become <unk>")
    data.add_argument("--max-words", type=int, default=30, help="longer training captions are cut")
    data.add_argument("--val-limit", type=int, default=0, help="validate on the first N images only (0: all)")
    data.add_argument("--augment", default="", help="extra cached views of each training photo, one sampled per "
                      f"caption and epoch: comma-separated from {sorted(set(VIEWS) - {'original'})}")

    model = p.add_argument_group("model")
    model.add_argument("--encoder", default=DEFAULT_BACKBONE, help="backbone name (see `captioner.encoder`)")
    model.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="square input side in px")
    model.add_argument("--random-encoder", action="store_true", help="random backbone weights (tests only)")
    model.add_argument("--fine-tune-blocks", type=int, default=0,
                       help="unfreeze the encoder's last N blocks (bypasses the feature cache)")
    model.add_argument("--encoder-lr", type=float, default=1e-4)
    model.add_argument("--embed-dim", type=int, default=256)
    model.add_argument("--hidden-dim", type=int, default=512)
    model.add_argument("--attention-dim", type=int, default=256)
    model.add_argument("--num-layers", type=int, default=1)
    model.add_argument("--dropout", type=float, default=0.5)
    model.add_argument("--tie-weights", action="store_true", help="share embedding and output matrices")
    model.add_argument("--semantic", action="store_true",
                       help="feed the backbone's ImageNet class probabilities into h0/c0")
    model.add_argument("--init-from", type=Path,
                       help="start from this checkpoint's decoder (its architecture and vocabulary win)")
    model.add_argument("--cell", choices=["lstm", "gru"], default="lstm", help="recurrent cell")
    model.add_argument("--attention", choices=["soft", "hard"], default="soft",
                       help="soft (deterministic) or stochastic hard attention (Show, Attend and Tell 4.1)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=20)
    opt.add_argument("--batch-size", type=int, default=32, help="global batch, split over the processes")
    opt.add_argument("--lr", type=float, default=None, help="default 1e-3, or 1e-5 with --scst")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="decoupled (AdamW) weight decay")
    opt.add_argument("--grad-clip", type=float, default=5.0, help="max global L2 norm of the gradients")
    opt.add_argument("--attention-reg", type=float, default=1.0, help="lambda of the doubly stochastic term")
    opt.add_argument("--label-smoothing", type=float, default=0.0)
    opt.add_argument("--lr-schedule", choices=["plateau", "cosine", "none"], default="plateau")
    opt.add_argument("--monitor", choices=["CIDEr", "BLEU-4"], default="CIDEr", help="early-stopping metric")
    opt.add_argument("--patience", type=int, default=5, help="stop after N epochs without improvement")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--average-best", type=int, default=0, metavar="N",
                     help="also write averaged.pt: the mean weights of the N epochs with the best val score")
    opt.add_argument("--reinforce-weight", type=float, default=1.0, help="hard attention: REINFORCE term weight")
    opt.add_argument("--entropy-weight", type=float, default=0.01, help="hard attention: entropy bonus weight")

    scst = p.add_argument_group("self-critical sequence training (a second stage after cross-entropy)")
    scst.add_argument("--scst", action="store_true",
                      help="optimise CIDEr-D by REINFORCE (needs --init-from a cross-entropy checkpoint); "
                           "--batch-size then counts images")
    scst.add_argument("--scst-samples", type=int, default=5, help="captions sampled per image")
    scst.add_argument("--scst-baseline", choices=["greedy", "mean"], default="greedy",
                      help="greedy: the greedy caption's reward; mean: the mean of the other samples' rewards")
    scst.add_argument("--scst-max-length", type=int, default=16, help="most words in a sampled caption")
    scst.add_argument("--scst-dropout", action="store_true",
                      help="keep dropout on while sampling and in the gradient pass (the greedy baseline never "
                           "uses it); default off: one exact policy")

    run = p.add_argument_group("run")
    run.add_argument("--output-dir", type=Path, required=True)
    run.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default: OUTPUT/../.cache)")
    run.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    run.add_argument("--num-workers", type=int, default=0)
    run.add_argument("--eval-batch-size", type=int, default=64)
    run.add_argument("--no-progress", action="store_true", help="no tqdm bars (logs only)")
    run.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                     help="mixed precision on CUDA (fp16 adds a gradient scaler); the CPU path stays fp32")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    return p


# ----------------------------------------------------------------------------------------------------------
# Data


def load_splits(args: argparse.Namespace) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Training and validation records from COCO annotation files or a Karpathy split."""
    if args.karpathy_split:
        root = args.image_root or args.karpathy_split.parent
        train = load_karpathy_split(args.karpathy_split, root, ("train", "restval"))
        val = load_karpathy_split(args.karpathy_split, root, ("val",))
    else:
        if not (args.train_images and args.train_captions and args.val_images and args.val_captions):
            raise SystemExit(
                "give --train-images/--train-captions/--val-images/--val-captions, or --karpathy-split"
            )
        train = load_coco_captions(args.train_captions, args.train_images)
        val = load_coco_captions(args.val_captions, args.val_images)
    if args.val_limit:
        val = val[: args.val_limit]
    if not train or not val:
        raise SystemExit(f"empty data: {len(train)} training and {len(val)} validation images")
    return train, val


def build_vocab(train: Sequence[ImageRecord], extra_text_files: Sequence[Path], min_count: int) -> Vocabulary:
    texts = [c for r in train for c in r.captions]
    for f in extra_text_files:
        texts.extend(load_caption_texts(f))
    return Vocabulary.build(texts, min_count=min_count)


# ----------------------------------------------------------------------------------------------------------
# One epoch, validation


class CaptionModel(nn.Module):
    """What one training step runs: the decoder, with the encoder in front when it is being fine-tuned
    (then batches hold images; otherwise they hold cached features). One module, so DDP wraps both."""

    def __init__(self, decoder: AttentionDecoder, encoder: Encoder | None = None):
        super().__init__()
        self.decoder, self.encoder = decoder, encoder

    def forward(
        self, inputs: torch.Tensor, captions: torch.Tensor, return_locations: bool = False
    ) -> tuple[torch.Tensor, ...]:
        features = self.encoder(inputs) if self.encoder is not None else inputs  # (B, L, D)
        return self.decoder(features, captions, return_locations=return_locations)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    args: argparse.Namespace,
    epoch: int,
    env: DistributedEnv = SINGLE_PROCESS,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """One pass over `loader` (a CaptionModel, possibly DDP-wrapped). Returns epoch means over all ranks."""
    model.train()
    device = next(p for p in model.parameters() if p.requires_grad).device
    params = [p for group in optimizer.param_groups for p in group["params"]]
    decoder = unwrap_model(model).decoder
    hard = decoder.config.attention == "hard"
    sums = torch.zeros(3, dtype=torch.float64)  # loss * tokens, cross-entropy * tokens, tokens
    max_norm = 0.0
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", disable=args.no_progress or not env.is_main, leave=False)
    for inputs, captions in bar:
        inputs, captions = inputs.to(device, non_blocking=True), captions.to(device, non_blocking=True)
        local_tokens = (captions[:, 1:] != 0).sum()
        # Normalise by the tokens of the *global* batch: DDP averages gradients over ranks, so N processes then
        # compute exactly the gradient one process would on the whole batch.
        global_tokens = all_reduce_sum(local_tokens.double(), env)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits, alphas, *locations = model(inputs, captions, return_locations=hard)
        normalizer = global_tokens.float() / env.world_size
        loss, ce = caption_loss(
            logits.float(), captions, alphas.float(), attention_reg=args.attention_reg,
            label_smoothing=args.label_smoothing, normalizer=normalizer,
        )
        if hard:
            reinforce, reward = hard_attention_loss(
                logits.float(), captions, alphas.float(), locations[0], _reinforce_baseline(decoder),
                args.reinforce_weight, args.entropy_weight, normalizer=normalizer,
            )
            loss = loss + reinforce
            _update_reinforce_baseline(decoder, reward, env)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16: scale the loss so small gradients survive, unscale before clipping
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        # Global L2 norm over all parameters (not per tensor): keeps the update direction.
        norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        n = float(local_tokens)
        sums += torch.tensor([float(loss.detach()) * float(global_tokens) / env.world_size, float(ce) * n, n],
                             dtype=torch.float64)
        max_norm = max(max_norm, float(norm))
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", ppl=f"{math.exp(float(ce)):.1f}")
    loss_sum, ce_sum, tokens = all_reduce_sum(sums.to(device), env).tolist()
    ce = ce_sum / max(tokens, 1)
    return {
        "train_loss": loss_sum / max(tokens, 1),
        "train_cross_entropy": ce,
        "train_perplexity": math.exp(ce),
        "max_grad_norm_before_clip": max_norm,
    }


def _reinforce_baseline(decoder: AttentionDecoder) -> torch.Tensor | None:
    """Hard attention's moving-average baseline; None before its first update (the loss then centres the
    first batch on its own mean reward rather than making every advantage negative)."""
    return decoder.reinforce_baseline if bool(decoder.reinforce_updates) else None


@torch.no_grad()
def _update_reinforce_baseline(decoder: AttentionDecoder, batch_reward: torch.Tensor, env: DistributedEnv) -> None:
    """b <- 0.9 b + 0.1 r (the paper's moving average), with r averaged over ranks so every rank agrees."""
    reward = all_reduce_sum(batch_reward.detach().double(), env) / env.world_size
    if bool(decoder.reinforce_updates):
        decoder.reinforce_baseline.mul_(0.9).add_(0.1 * reward.to(decoder.reinforce_baseline))
    else:
        decoder.reinforce_baseline.fill_(float(reward))
    decoder.reinforce_updates += 1


@torch.no_grad()
def evaluate(
    decoder: AttentionDecoder,
    records: Sequence[ImageRecord],
    features: FeatureStore,
    vocab: Vocabulary,
    options: DecodingOptions | None = None,
    batch_size: int = 64,
    env: DistributedEnv = SINGLE_PROCESS,
) -> tuple[dict[str, float], dict[int, str]]:
    """Validation the honest way: decode every image and score the captions (BLEU-4, CIDEr-D), plus
    teacher-forced cross-entropy on the reference captions for perplexity. Under DDP each rank decodes a
    shard and every rank gets the same gathered scores."""
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
    scores = fast_scores(predictions, {r.image_id: list(r.captions) for r in records})
    ce = ce_sum / max(tokens, 1)
    return {**scores, "val_cross_entropy": ce, "val_perplexity": math.exp(ce)}, predictions


def reference_cross_entropy(
    decoder: AttentionDecoder, features: torch.Tensor, references: Sequence[Sequence[str]], vocab: Vocabulary
) -> tuple[float, int]:
    """Mean per-token cross-entropy of all reference captions given their image features (B, L, D)."""
    batch = [(features[i], torch.tensor(vocab.encode(c))) for i, refs in enumerate(references) for c in refs]
    feats, captions = collate_captions(batch, vocab.pad_id)
    logits, alphas = decoder(feats, captions.to(features.device))
    _, ce = caption_loss(logits, captions.to(features.device), alphas, attention_reg=0.0)
    return float(ce), int((captions[:, 1:] != vocab.pad_id).sum())


# ----------------------------------------------------------------------------------------------------------
# Main


class _ImageCaptionDataset(torch.utils.data.Dataset):
    """(preprocessed image, caption ids) for fine-tuning with the encoder in the loop."""

    def __init__(self, records: Sequence[ImageRecord], encoder: Encoder, vocab: Vocabulary, max_words: int):
        from .images import ImageError, open_image

        self.items = []
        self.preprocessing = encoder.preprocessing
        self._open = open_image
        for r in records:
            try:
                open_image(r.path)
            except ImageError as exc:
                log.warning("skipping unreadable image: %s", exc)
                continue
            self.items.extend((r.path, vocab.encode(c, max_words)) for c in r.captions)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, ids = self.items[i]
        return self.preprocessing(self._open(path)), torch.tensor(ids)


def _parse_views(spec: str) -> list[str]:
    views = [v.strip() for v in spec.split(",") if v.strip()]
    unknown = [v for v in views if v not in VIEWS or v == "original"]
    if unknown:
        raise SystemExit(f"unknown --augment view(s) {unknown}; choose from {sorted(set(VIEWS) - {'original'})}")
    return views


def _make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace):
    if args.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=1)
    if args.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.epochs, 1))
    return None


def _set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _args_json(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
            for k, v in vars(args).items() if not callable(v)}


def _amp_settings(args: argparse.Namespace, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether fp16 needs a gradient scaler). CPU training stays fp32."""
    if args.amp == "off":
        return None, False
    if device.type != "cuda":
        log.warning("--amp %s ignored on %s: the CPU path stays fp32", args.amp, device)
        return None, False
    return (torch.bfloat16, False) if args.amp == "bf16" else (torch.float16, True)


def _load_start(args: argparse.Namespace, encoder: Encoder) -> tuple[Checkpoint | None, Checkpoint | None]:
    """(checkpoint to resume, checkpoint to initialise from); refuses ones made with another backbone."""
    last_path = args.output_dir / "last.pt"
    resume = load_checkpoint(last_path) if args.resume and last_path.exists() else None
    if args.resume and resume is None:
        log.info("--resume: no %s yet, starting fresh", last_path)
    init = load_checkpoint(args.init_from) if args.init_from and resume is None else None
    for source, ckpt in ((last_path, resume), (args.init_from, init)):
        if ckpt is not None and ckpt.encoder_name != encoder.name:
            raise CheckpointError(f"{source} was trained with {ckpt.encoder_name}, not --encoder {encoder.name}")
    return resume, init


def _build_datasets(
    args, train_records, val_records, encoder, vocab, env
) -> tuple[torch.utils.data.Dataset, FeatureStore]:
    """(training set, validation feature store). A frozen encoder encodes every image once into the cache
    (rank 0 first, then the others read what it wrote); when fine-tuning, training images go through the
    encoder at every step instead."""
    cache_root = args.cache_dir or args.output_dir.parent / ".cache"
    progress = not args.no_progress and env.is_main
    views = ["original", *_parse_views(args.augment)] if not args.fine_tune_blocks else []
    stores, val_store = {}, None
    for turn in ("main", "others"):
        if (turn == "main") == env.is_main:
            val_store = build_feature_store(val_records, encoder, cache_root, progress=progress)
            for view in views:
                stores[view] = build_feature_store(train_records, encoder, cache_root, progress=progress, view=view)
        barrier(env)
    if args.fine_tune_blocks:
        return _ImageCaptionDataset(train_records, encoder, vocab, args.max_words), val_store
    extra = [(view, store) for view, store in stores.items() if view != "original"]
    train_set = CaptionDataset(train_records, stores["original"], vocab, args.max_words, views=extra, seed=args.seed)
    return train_set, val_store


def _build_decoder(args, vocab: Vocabulary, encoder: Encoder, resume, init) -> AttentionDecoder:
    if resume is not None or init is not None:
        start = resume or init
        decoder = start.decoder
        if start.encoder_state is not None:
            encoder.cnn.load_state_dict(start.encoder_state)
        if resume is None and args.semantic and not decoder.config.semantic_classes:
            decoder = _with_semantic_input(decoder, encoder.classifier.out_features)
        for option in ("cell", "attention"):
            if getattr(args, option) != getattr(decoder.config, option):
                log.warning("--%s %s ignored: the checkpoint's decoder has %s %s", option, getattr(args, option),
                            option, getattr(decoder.config, option))
    else:
        decoder = AttentionDecoder(CaptionerConfig(
            vocab_size=len(vocab),
            feature_dim=encoder.feature_dim,
            embed_dim=args.embed_dim,
            hidden_dim=args.hidden_dim,
            attention_dim=args.attention_dim,
            num_layers=args.num_layers,
            dropout=args.dropout,
            tie_weights=args.tie_weights,
            semantic_classes=encoder.classifier.out_features if args.semantic else 0,
            cell=args.cell,
            attention=args.attention,
        ))
    if resume is None and decoder.config.semantic_classes:
        # The frozen class head is a copy of this backbone's classifier (an LM checkpoint only has a placeholder).
        decoder.class_head.load_state_dict(encoder.classifier.state_dict())
    return decoder


def _with_semantic_input(decoder: AttentionDecoder, classes: int) -> AttentionDecoder:
    """`--init-from` a checkpoint without the class-probability input (e.g. a caption LM) plus `--semantic`:
    a decoder with the input added, every weight whose shape still fits copied over (h0/c0 start fresh)."""
    config = CaptionerConfig.from_json({**decoder.config.to_json(), "semantic_classes": classes})
    widened = AttentionDecoder(config)
    target = widened.state_dict()
    fits = {k: v for k, v in decoder.state_dict().items() if k in target and target[k].shape == v.shape}
    widened.load_state_dict(fits, strict=False)
    log.info("--semantic on top of --init-from: %s start fresh", sorted(set(target) - set(fits)))
    return widened


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run a training; returns the best validation metrics. Safe to kill and `--resume` at any time."""
    env, device = init_distributed(args.device)
    try:
        return _train(args, env, device)
    finally:
        shutdown(env)


def _check_args(args: argparse.Namespace, env: DistributedEnv) -> None:
    """Refuse impossible combinations up front, before minutes of feature encoding."""
    if args.batch_size % env.world_size:
        raise SystemExit(f"--batch-size {args.batch_size} must divide evenly over {env.world_size} processes")
    if args.scst:
        if not (args.init_from or args.resume):
            raise SystemExit("--scst fine-tunes a trained model: give --init-from a cross-entropy checkpoint")
        if args.fine_tune_blocks:
            raise SystemExit("--scst runs on cached features: drop --fine-tune-blocks")
        if args.scst_samples < 1 or (args.scst_baseline == "mean" and args.scst_samples < 2):
            raise SystemExit("--scst-samples must be >= 1 (>= 2 with --scst-baseline mean)")
    if args.lr is None:
        args.lr = 1e-5 if args.scst else 1e-3  # SCST: 5e-5 overfit coco-mini within 3 epochs (training log)
    if args.average_best < 0:
        raise SystemExit("--average-best must be >= 0")


def _train(args: argparse.Namespace, env: DistributedEnv, device: torch.device) -> dict[str, Any]:
    _check_args(args, env)
    if env.is_main:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    barrier(env)
    _setup_logging(args.output_dir / "train.log", env)
    _set_seed(args.seed)
    train_records, val_records = load_splits(args)
    log.info("data: %d training images, %d validation images", len(train_records), len(val_records))

    encoder = Encoder(args.encoder, pretrained=not args.random_encoder, image_size=args.image_size,
                      fine_tune_blocks=args.fine_tune_blocks).to(device)
    resume, init = _load_start(args, encoder)
    start = resume or init
    if args.scst and args.scst_dropout and start is not None and start.config.attention == "hard":
        # In training mode hard attention samples its locations: the sampling pass and the pass that scores the
        # samples would attend to different places, so the gradient would not be that of the sampled captions.
        raise SystemExit("--scst-dropout cannot be used with a hard-attention model: drop --scst-dropout")
    vocab = start.vocab if start else build_vocab(train_records, args.vocab_text, args.min_word_count)
    log.info("vocabulary: %d words (min count %d)", len(vocab), args.min_word_count)

    train_set, val_store = _build_datasets(args, train_records, val_records, encoder, vocab, env)
    if len(train_set) == 0:
        raise SystemExit("no usable training captions (every image failed to load?)")
    if args.scst:
        scst_images = scst.ImageFeatures(train_records, train_set.stores[0][1], train_set.stores[1:], args.seed)
        cider, scst_references = scst.reward_scorer(scst_images.records)
        log.info("SCST: %d training images, CIDEr-D document frequencies from their %d references",
                 len(scst_images), sum(len(r.captions) for r in scst_images.records))

    # Seed again here: building the caches consumed random numbers (DataLoader seeding) only on a first run,
    # and a resumed or repeated run must initialise exactly the same way.
    _set_seed(args.seed)
    decoder = _build_decoder(args, vocab, encoder, resume, init).to(device)
    model: nn.Module = CaptionModel(decoder, encoder if args.fine_tune_blocks else None)
    if env.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        if device.type == "cuda":
            model = torch.compile(model)
        else:
            log.warning("--compile ignored on %s", device)
    # Dropout must differ between ranks (each sees other captions), yet be reproducible.
    torch.manual_seed(args.seed * 1000 + env.rank)

    param_groups = [{"params": [p for p in decoder.parameters() if p.requires_grad], "lr": args.lr}]
    trainable_encoder = [p for p in encoder.parameters() if p.requires_grad]
    if trainable_encoder:
        param_groups.append({"params": trainable_encoder, "lr": args.encoder_lr})
    # AdamW: with weight decay, decay the weights directly instead of adding an L2 gradient that Adam's
    # per-parameter scaling would distort (Loshchilov & Hutter 2019); without it, AdamW is Adam.
    optimizer = torch.optim.AdamW(param_groups, weight_decay=args.weight_decay)
    scheduler = _make_scheduler(optimizer, args)
    amp_dtype, needs_scaler = _amp_settings(args, device)
    scaler = torch.amp.GradScaler(device.type) if needs_scaler else None

    last_path, best_path = args.output_dir / "last.pt", args.output_dir / "best.pt"
    start_epoch, best_score, bad_epochs = 1, float("-inf"), 0
    top_epochs: list[tuple[float, int]] = []  # (val score, epoch) of the --average-best N best epochs
    if resume is not None and resume.training is not None:
        t = resume.training
        optimizer.load_state_dict(t["optimizer"])
        if scheduler is not None and t.get("scheduler"):
            scheduler.load_state_dict(t["scheduler"])
        if scaler is not None and t.get("scaler"):
            scaler.load_state_dict(t["scaler"])
        start_epoch, best_score, bad_epochs = t["epoch"] + 1, t["best_score"], t["bad_epochs"]
        top_epochs = [(float(score), int(e)) for score, e in t.get("top_epochs", [])]
        rng = t["rng"]
        _restore_rng(rng[env.rank] if env.rank < len(rng) else rng[0], device)
        log.info("resumed from %s at epoch %d (best %s %.4f)", last_path, start_epoch, args.monitor, best_score)

    metrics_file = args.output_dir / "metrics.jsonl"
    if env.is_main:
        _drop_rows_from(metrics_file, start_epoch)  # rows of an epoch that was killed before its checkpoint
    best_metrics: dict[str, Any] = resume.metrics if resume is not None else {}
    for epoch in range(start_epoch, args.epochs + 1):
        if bad_epochs >= args.patience:
            log.info("early stop: %d epochs without a better %s", bad_epochs, args.monitor)
            break
        started = time.time()
        # Shuffling depends only on (seed, epoch), and N processes split exactly the permutation one process
        # would use, so a resumed run and a DDP run see the same global batches as a single process.
        row: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        if args.scst:
            scst_images.set_epoch(epoch)
            image_loader = DataLoader(scst_images, batch_size=args.batch_size // env.world_size,
                                      sampler=_sampler(scst_images, args, env, epoch), collate_fn=scst.collate_images)
            row.update(scst.train_one_epoch(model, image_loader, scst_references, cider, vocab, optimizer, args, epoch,
                                            env))
        else:
            if isinstance(train_set, CaptionDataset):
                train_set.set_epoch(epoch)
            loader = DataLoader(train_set, batch_size=args.batch_size // env.world_size,
                                sampler=_sampler(train_set, args, env, epoch), collate_fn=collate_captions,
                                num_workers=args.num_workers, pin_memory=device.type == "cuda")
            row.update(train_one_epoch(model, loader, optimizer, args, epoch, env, scaler, amp_dtype))
        scores, predictions = evaluate(decoder, val_records, val_store, vocab, batch_size=args.eval_batch_size,
                                       env=env)
        row.update(scores)
        row["seconds"] = round(time.time() - started, 2)
        score = scores[args.monitor]
        if scheduler is not None:
            scheduler.step(score) if args.lr_schedule == "plateau" else scheduler.step()
        improved = score > best_score
        best_score, bad_epochs = (score, 0) if improved else (best_score, bad_epochs + 1)
        row["best"] = improved
        train_part = (f"reward {row['train_reward_CIDEr']:.3f} (baseline {row['train_baseline_CIDEr']:.3f})"
                      if args.scst else f"ppl {row['train_perplexity']:.1f}")
        log.info(
            "epoch %d: loss %.3f %s | val ppl %.1f BLEU-4 %.3f CIDEr %.3f %s| %.0fs",
            epoch, row["train_loss"], train_part, row["val_perplexity"], row["BLEU-4"],
            row["CIDEr"], "(best) " if improved else "", row["seconds"],
        )
        log.info("  e.g. image %d: %s", *next(iter(predictions.items())))
        rng = gather_objects(_rng_state(device), env)  # every rank's, so each resumes its own stream
        if env.is_main:
            encoder_state = encoder.cnn.state_dict() if args.fine_tune_blocks else None
            if improved:
                best_metrics = {**{k: v for k, v in row.items() if isinstance(v, int | float)},
                                "args": _args_json(args)}
                save_checkpoint(best_path, decoder, vocab, encoder.name, encoder.preprocessing,
                                metrics=best_metrics, encoder_state=encoder_state)
            if args.average_best:
                top_epochs = _keep_top_epoch(top_epochs, score, epoch, args, decoder, vocab, encoder)
            training = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": epoch,
                "best_score": best_score,
                "bad_epochs": bad_epochs,
                "rng": rng,
                "top_epochs": [list(pair) for pair in top_epochs],
            }
            save_checkpoint(last_path, decoder, vocab, encoder.name, encoder.preprocessing,
                            metrics=best_metrics, training=training, encoder_state=encoder_state)
            with metrics_file.open("a") as f:  # after the checkpoint: a logged epoch is always resumable
                f.write(json.dumps(row) + "\n")
    if env.is_main:
        plot_training_curves(metrics_file, args.output_dir / "training_curves.png")
        if args.average_best and top_epochs:
            _write_averaged(top_epochs, args, val_records, val_store, vocab, encoder, device)
    barrier(env)
    return best_metrics


def _top_epoch_path(args: argparse.Namespace, epoch: int) -> Path:
    return args.output_dir / "top-epochs" / f"epoch-{epoch:03d}.pt"


def _keep_top_epoch(
    top_epochs: list[tuple[float, int]], score: float, epoch: int, args: argparse.Namespace,
    decoder: AttentionDecoder, vocab: Vocabulary, encoder: Encoder,
) -> list[tuple[float, int]]:
    """Keep this epoch's weights on disk if they are among the N best so far (drop the one it displaces).
    On disk rather than in memory, so a killed run resumes with them."""
    ranked = sorted([*top_epochs, (score, epoch)], key=lambda pair: (-pair[0], pair[1]))
    kept, dropped = ranked[: args.average_best], ranked[args.average_best :]
    if (score, epoch) in kept:
        save_checkpoint(_top_epoch_path(args, epoch), decoder, vocab, encoder.name, encoder.preprocessing,
                        metrics={args.monitor: score, "epoch": epoch})
    for _, old in dropped:
        _top_epoch_path(args, old).unlink(missing_ok=True)
    return kept


def _write_averaged(
    top_epochs: list[tuple[float, int]], args: argparse.Namespace, val_records: Sequence[ImageRecord],
    val_store: FeatureStore, vocab: Vocabulary, encoder: Encoder, device: torch.device,
) -> None:
    """Checkpoint averaging: the mean weights of the N best epochs, validated like any epoch, as averaged.pt."""
    epochs = sorted(e for _, e in top_epochs)
    averaged = average_checkpoints([_top_epoch_path(args, e) for e in epochs])
    decoder = averaged.decoder.to(device)
    scores, _ = evaluate(decoder, val_records, val_store, vocab, batch_size=args.eval_batch_size)
    metrics = {**scores, "averaged_epochs": epochs, "args": _args_json(args)}
    save_checkpoint(args.output_dir / "averaged.pt", decoder, vocab, encoder.name, encoder.preprocessing,
                    metrics=metrics)
    log.info("averaged epochs %s: val ppl %.1f BLEU-4 %.3f CIDEr %.3f (best single epoch: %s %.3f)",
             epochs, scores["val_perplexity"], scores["BLEU-4"], scores["CIDEr"], args.monitor, top_epochs[0][0])


def _sampler(dataset: torch.utils.data.Dataset, args: argparse.Namespace, env: DistributedEnv,
             epoch: int) -> DistributedSampler:
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=args.seed)
    sampler.set_epoch(epoch)
    return sampler


def _drop_rows_from(metrics_file: Path, epoch: int) -> None:
    if not metrics_file.exists():
        return
    rows = [line for line in metrics_file.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["epoch"] < epoch]
    if len(kept) != len(rows):
        metrics_file.write_text("".join(line + "\n" for line in kept))


def plot_training_curves(metrics_file: Path, out: Path) -> None:
    """Loss/perplexity and validation scores per epoch, as a PNG beside the log."""
    if not metrics_file.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    if all("train_perplexity" in r for r in rows):  # SCST epochs have rewards instead
        ax1.plot(epochs, [r["train_perplexity"] for r in rows], label="train")
    ax1.plot(epochs, [r["val_perplexity"] for r in rows], label="val")
    ax1.set(xlabel="epoch", ylabel="perplexity", yscale="log", title="perplexity = exp(cross-entropy)")
    ax1.legend()
    ax2.plot(epochs, [r["CIDEr"] for r in rows], label="CIDEr-D")
    ax2.plot(epochs, [r["BLEU-4"] for r in rows], label="BLEU-4")
    ax2.set(xlabel="epoch", title="validation (greedy decoding)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _setup_logging(log_file: Path, env: DistributedEnv = SINGLE_PROCESS) -> None:
    """Rank 0 logs to OUTPUT/train.log and the terminal; other ranks only print warnings."""
    root = logging.getLogger("captioner")
    root.setLevel(logging.INFO if env.is_main else logging.WARNING)
    for h in list(root.handlers):
        if getattr(h, "_captioner", False):
            root.removeHandler(h)
            h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if env.is_main:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._captioner = True  # type: ignore[attr-defined]
        root.addHandler(handler)
