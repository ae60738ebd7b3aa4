"""Training: masked cross-entropy with teacher forcing, validation by real greedy decoding.

Laid out like torchvision's reference scripts: `train_one_epoch`, `main` (its steps: `run_training`, each step
a named function below), `get_args_parser`; validation by real decoding is `captioner.evaluate.validate`.

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
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from . import scst
from .checkpoint import (
    DISK_ERRORS,
    Checkpoint,
    CheckpointError,
    average_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .coco import (
    CaptionDataset,
    ImageMajorBatchSampler,
    ImageRecord,
    check_disjoint,
    collate_captions,
    load_caption_texts,
    load_coco_captions,
    load_karpathy_split,
)
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
from .encoder import DEFAULT_BACKBONE, DEFAULT_IMAGE_SIZE, Encoder, FrozenPart
from .evaluate import validate
from .features import VIEWS, FeatureStore, build_feature_store
from .hallucination import reference_objects
from .model import AttentionDecoder, CaptionerConfig, DecoderOutput, caption_loss, hard_attention_loss
from .usage import check_output_dir
from .utils import (
    args_record,
    optimizer_step,
    plot_training_curves,
    restore_metrics_rows,
    restore_rng,
    rng_state,
    set_seed,
    setup_logging,
    stop_logging,
)
from .vocab import Vocabulary

log = logging.getLogger("captioner.train")


def add_model_arguments(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The model flags `captioner train` and `captioner pretrain-lm` share: the backbone and the decoder's
    architecture (defaults from CaptionerConfig). `config_from_args` turns them into a CaptionerConfig."""
    model = p.add_argument_group("model")
    model.add_argument("--encoder", default=DEFAULT_BACKBONE, help="backbone name (see `captioner.encoder`)")
    model.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="square input side in px")
    model.add_argument("--embed-dim", type=int, default=CaptionerConfig.embed_dim)
    model.add_argument("--hidden-dim", type=int, default=CaptionerConfig.hidden_dim)
    model.add_argument("--attention-dim", type=int, default=CaptionerConfig.attention_dim)
    model.add_argument("--num-layers", type=int, default=CaptionerConfig.num_layers)
    model.add_argument("--dropout", type=float, default=CaptionerConfig.dropout)
    model.add_argument("--tie-weights", action="store_true", help="share embedding and output matrices")
    model.add_argument("--semantic", action="store_true",
                       help="feed the backbone's ImageNet class probabilities into h0/c0")
    model.add_argument("--cell", choices=["lstm", "gru"], default=CaptionerConfig.cell, help="recurrent cell")
    model.add_argument("--attention", choices=["soft", "hard"], default=CaptionerConfig.attention,
                       help="soft (deterministic) or stochastic hard attention (Show, Attend and Tell 4.1)")
    return model


def config_from_args(args: argparse.Namespace, vocab_size: int, feature_dim: int, classes: int) -> CaptionerConfig:
    """The decoder's architecture from the model flags; D (`feature_dim`) and the number of classes of its
    classifier (used with --semantic) come from the backbone itself."""
    return CaptionerConfig(
        vocab_size=vocab_size,
        feature_dim=feature_dim,
        embed_dim=args.embed_dim,
        hidden_dim=args.hidden_dim,
        attention_dim=args.attention_dim,
        num_layers=args.num_layers,
        dropout=args.dropout,
        tie_weights=args.tie_weights,
        semantic_classes=classes if args.semantic else 0,
        cell=args.cell,
        attention=args.attention,
    )


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
                      help="extra COCO-format captions file(s) whose text joins the vocabulary (no images; "
                      "captions of the validation photos are left out)")
    data.add_argument("--min-word-count", type=int, default=5, help="rarer words become <unk>")
    data.add_argument("--max-words", type=int, default=30, help="longer training captions are cut")
    data.add_argument("--val-limit", type=int, default=0, help="validate on the first N images only (0: all)")
    data.add_argument("--augment", default="", help="extra cached views of each training photo, one sampled per "
                      f"caption and epoch: comma-separated from {sorted(set(VIEWS) - {'original'})}")

    model = add_model_arguments(p)
    model.add_argument("--random-encoder", action="store_true", help="random backbone weights (tests only)")
    model.add_argument("--fine-tune-blocks", type=int, default=0,
                       help="unfreeze the encoder's last N blocks (the cache then holds the frozen blocks' output)")
    model.add_argument("--encoder-lr", type=float, default=1e-4)
    model.add_argument("--init-from", type=Path,
                       help="start from this checkpoint's decoder (its architecture and vocabulary win)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=20)
    opt.add_argument("--batch-size", type=int, default=32, help="global batch, split over the processes")
    opt.add_argument("--batching", choices=["caption", "image"], default="caption",
                     help="caption: captions shuffled one by one; image: all of a photo's captions in one batch, "
                          "so the feature cache is read once per photo per epoch (full COCO: 5x less I/O)")
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
    scst.add_argument("--scst-hallucination-penalty", type=float, default=0.0, metavar="P",
                      help="subtract P from a sample's CIDEr-D reward per object it names that no reference of "
                           "its image names (default 0: CIDEr-D alone)")
    scst.add_argument("--scst-dropout", action="store_true",
                      help="keep dropout on while sampling and in the gradient pass (the greedy baseline never "
                           "uses it); default off: one exact policy")

    run = p.add_argument_group("run")
    run.add_argument("--output-dir", type=Path, required=True)
    run.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default: OUTPUT/../.cache)")
    run.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run OUTPUT already holds (without it or --resume, such a folder is refused)")
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
    check_disjoint(train, val)
    return train, val


def build_vocab(train: Sequence[ImageRecord], extra_text_files: Sequence[Path], min_count: int,
                val: Sequence[ImageRecord]) -> Vocabulary:
    """The training captions' words, and those of `extra_text_files` other than the `val` photos' captions."""
    texts = [c for r in train for c in r.captions]
    val_ids = {r.image_id for r in val}
    for f in extra_text_files:
        texts.extend(load_caption_texts(f, exclude_image_ids=val_ids))
    return Vocabulary.build(texts, min_count=min_count)


# ----------------------------------------------------------------------------------------------------------
# One epoch


class CaptionModel(nn.Module):
    """What one training step runs: the decoder, with the encoder's tuned blocks in front when it is being
    fine-tuned (then batches hold the cached output of its frozen blocks; otherwise cached features). One module,
    so DDP wraps both."""

    def __init__(self, decoder: AttentionDecoder, encoder: Encoder | None = None):
        super().__init__()
        self.decoder, self.encoder = decoder, encoder

    def forward(self, inputs: torch.Tensor, captions: torch.Tensor, repeats: int = 1) -> DecoderOutput:
        """captions (B * repeats, T+1): each image's features serve `repeats` captions in a row (SCST's samples),
        so that the tuned blocks run once per image."""
        # When fine-tuning, batches hold the cached frozen part of the encoder (FrozenPart), not features.
        features = tuned_once_per_photo(self.encoder, inputs) if self.encoder is not None else inputs  # (B, L, D)
        return self.decoder(features.repeat_interleave(repeats, dim=0), captions)


def tuned_once_per_photo(encoder: Encoder, inputs: torch.Tensor) -> torch.Tensor:
    """encoder.tuned_part over (B, L', C), each run of equal consecutive rows (one photo's captions in an
    image-major batch, `--batching image`) through the tuned blocks once: 5x less of their work on COCO."""
    starts = torch.ones(inputs.size(0), dtype=torch.bool, device=inputs.device)
    starts[1:] = (inputs[1:] != inputs[:-1]).flatten(1).any(dim=1)
    return encoder.tuned_part(inputs[starts])[starts.cumsum(0) - 1]


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
            out = model(inputs, captions)
        normalizer = global_tokens.float() / env.world_size
        loss, ce = caption_loss(
            out.logits.float(), captions, out.alphas.float(), attention_reg=args.attention_reg,
            label_smoothing=args.label_smoothing, normalizer=normalizer,
        )
        if hard:
            reinforce, reward = hard_attention_loss(
                out.logits.float(), captions, out.alphas.float(), out.locations, _reinforce_baseline(decoder),
                args.reinforce_weight, args.entropy_weight, normalizer=normalizer,
            )
            loss = loss + reinforce
            _update_reinforce_baseline(decoder, reward, env)
        norm = optimizer_step(loss, optimizer, params, args.grad_clip, scaler)
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




# ----------------------------------------------------------------------------------------------------------
# The run: main() and its steps


@dataclass
class TrainingState:
    """What --resume needs besides the weights: the optimiser (with its schedule and fp16 scaler), where the run
    stands (last finished epoch, early stopping, the --average-best epochs) and every rank's RNG state. Read
    from last.pt when a run resumes, written to it after every epoch."""

    optimizer: torch.optim.Optimizer
    scheduler: Any = None  # a torch.optim.lr_scheduler, or None (--lr-schedule none)
    scaler: torch.amp.GradScaler | None = None
    epoch: int = 0  # the last finished epoch
    best_score: float = float("-inf")  # best validation --monitor score so far
    bad_epochs: int = 0  # epochs since it last improved
    top_epochs: list[tuple[float, int]] = field(default_factory=list)  # (val score, epoch) of the N best epochs
    rng: list[dict[str, Any]] = field(default_factory=list)  # every rank's RNG state, in rank order
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl's rows, epochs 1..`epoch`

    def record(self, epoch: int, score: float) -> bool:
        """Count a finished epoch with this validation score; True if it is the best so far."""
        improved = score > self.best_score
        self.epoch = epoch
        self.best_score, self.bad_epochs = (score, 0) if improved else (self.best_score, self.bad_epochs + 1)
        return improved

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "best_score": self.best_score,
            "bad_epochs": self.bad_epochs,
            "rng": self.rng,
            "top_epochs": [list(pair) for pair in self.top_epochs],
            "rows": self.rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best_score, self.bad_epochs = state["epoch"], state["best_score"], state["bad_epochs"]
        self.top_epochs = [(float(score), int(e)) for score, e in state.get("top_epochs", [])]
        self.rng = state["rng"]
        self.rows = state.get("rows")  # None in a last.pt written before checkpoints carried the rows

    def restore_rng(self, env: DistributedEnv, device: torch.device) -> None:
        """This rank's saved RNG state (rank 0's when the run had fewer processes)."""
        restore_rng(self.rng[env.rank] if env.rank < len(self.rng) else self.rng[0], device)


@dataclass
class StartingPoint:
    """The checkpoints a run starts from: last.pt when resuming, else --init-from's, else neither."""

    resume: Checkpoint | None = None
    init: Checkpoint | None = None

    @property
    def checkpoint(self) -> Checkpoint | None:
        return self.resume or self.init


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where it stopped and what --resume will do."""


@dataclass
class Progress:
    """Where a run is (the epoch, and the batches its loader has handed out), for the line Ctrl-C prints."""

    epoch: int | None = None
    step: int = 0
    steps: int = 0
    ctrl_c: bool = False  # set by the SIGINT handler of `noticing_ctrl_c`
    deferring: bool = False

    def stop_if_ctrl_c(self) -> None:
        """Raise the KeyboardInterrupt of a Ctrl-C that was deferred or dropped (see `noticing_ctrl_c`)."""
        if self.ctrl_c:
            raise KeyboardInterrupt

    @contextmanager
    def uninterrupted(self) -> Iterator[None]:
        """A Ctrl-C in here takes effect when the block is done: last.pt and the epoch's metrics row are written
        together, so that a resumed run finds every finished epoch's row (a Ctrl-C between the two lost it)."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        self.stop_if_ctrl_c()

    def count(self, loader: DataLoader) -> _CountedLoader:
        """`loader`, counting its batches into `step`."""
        self.step, self.steps = 0, len(loader)
        return _CountedLoader(loader, self)

    def interrupted(self, output_dir: Path) -> str:
        if self.epoch is None:
            return "interrupted before the first epoch (the feature cache keeps what was encoded): run it again"
        where = f"interrupted at epoch {self.epoch}, step {self.step}" + (f" of {self.steps}" if self.steps else "")
        if (output_dir / "last.pt").exists():  # written atomically: a kill never leaves half a file
            return f"{where}; {output_dir / 'last.pt'} is intact: --resume continues"
        return f"{where}, before the first checkpoint: run it again to start over"


@dataclass
class _CountedLoader:
    loader: DataLoader
    progress: Progress

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            self.progress.stop_if_ctrl_c()
            self.progress.step += 1
            yield batch


@contextmanager
def noticing_ctrl_c(progress: Progress) -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt as always, and is also remembered in `progress.ctrl_c`, which the loader
    checks before every batch: Python drops an exception raised while a destructor runs ("Exception ignored
    in ..."), so a Ctrl-C landing there would be lost and the run would go on to its last epoch. Inside
    `progress.uninterrupted()` it only sets the flag. A process started with SIGINT ignored (a background job)
    keeps ignoring it."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        yield
        return

    def on_sigint(signum, frame) -> None:
        progress.ctrl_c = True
        if not progress.deferring:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run a training; returns the best validation metrics. Safe to kill and `--resume` at any time: Ctrl-C
    raises TrainingInterrupted, whose message says where the run stopped."""
    env, device = init_distributed(args.device)
    progress = Progress()
    try:
        with noticing_ctrl_c(progress):
            return run_training(args, env, device, progress)
    except KeyboardInterrupt:
        raise TrainingInterrupted(progress.interrupted(args.output_dir)) from None
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        # A full disk or a read-only output folder: one line; every file was written atomically, so what was
        # already on disk (last.pt included) is intact and --resume continues once there is room.
        where = f": {exc.filename}" if exc.filename else ""
        raise SystemExit(f"captioner train: error: {exc.strerror}{where}") from None
    finally:
        stop_logging()
        shutdown(env)


def run_training(args: argparse.Namespace, env: DistributedEnv, device: torch.device,
                 progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or Progress()
    check_args(args, env)
    start_run(args, env)
    train_records, val_records = load_splits(args)
    log.info("data: %d training images, %d validation images", len(train_records), len(val_records))

    encoder = Encoder(args.encoder, pretrained=not args.random_encoder, image_size=args.image_size,
                      fine_tune_blocks=args.fine_tune_blocks).to(device)
    start = load_starting_point(args, encoder)
    check_start(args, start)
    vocab = start.checkpoint.vocab if start.checkpoint else build_vocab(train_records, args.vocab_text,
                                                                        args.min_word_count, val_records)
    log.info("vocabulary: %d words (min count %d)", len(vocab), args.min_word_count)

    train_set, val_store = build_datasets(args, train_records, val_records, encoder, vocab, env)
    if len(train_set) == 0:
        raise SystemExit("no usable training captions (every image failed to load?)")
    scst_stage = ScstStage.build(args, train_records, train_set) if args.scst else None

    # Seed again here: building the caches consumed random numbers (DataLoader seeding) only on a first run,
    # and a resumed or repeated run must initialise exactly the same way.
    set_seed(args.seed)
    decoder = build_decoder(args, vocab, encoder, start).to(device)
    model = build_model(args, decoder, encoder, env, device)
    # Dropout must differ between ranks (each sees other captions), yet be reproducible.
    torch.manual_seed(args.seed * 1000 + env.rank)

    optimizer = build_optimizer(args, decoder, encoder)
    amp_dtype, needs_scaler = _amp_settings(args, device)
    state = TrainingState(optimizer, make_scheduler(optimizer, args),
                          torch.amp.GradScaler(device.type) if needs_scaler else None)
    if start.resume is not None and start.resume.training is not None:
        state.load_state_dict(start.resume.training)
        state.restore_rng(env, device)
        log.info("resumed from %s at epoch %d (best %s %.4f)", args.output_dir / "last.pt", state.epoch + 1,
                 args.monitor, state.best_score)

    metrics_file = args.output_dir / "metrics.jsonl"
    state.rows = restore_metrics_rows(metrics_file, state.epoch, state.rows, write=env.is_main)
    best_metrics: dict[str, Any] = start.resume.metrics if start.resume is not None else {}
    for epoch in range(state.epoch + 1, args.epochs + 1):
        if state.bad_epochs >= args.patience:
            log.info("early stop: %d epochs without a better %s", state.bad_epochs, args.monitor)
            break
        progress.stop_if_ctrl_c()  # SCST epochs have no counted loader
        started = time.time()
        progress.epoch, progress.step, progress.steps = epoch, 0, 0
        row: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        if scst_stage is not None:
            row.update(scst_stage.train_one_epoch(model, vocab, optimizer, args, epoch, env))
        else:
            loader = progress.count(training_loader(train_set, args, env, epoch, device))
            row.update(train_one_epoch(model, loader, optimizer, args, epoch, env, state.scaler, amp_dtype))
        scores, predictions = validate(decoder, val_records, validation_features(args, encoder, val_store), vocab,
                                       batch_size=args.eval_batch_size, env=env)
        row.update(scores)
        row["seconds"] = round(time.time() - started, 2)
        score = scores[args.monitor]
        if state.scheduler is not None:
            state.scheduler.step(score) if args.lr_schedule == "plateau" else state.scheduler.step()
        row["best"] = improved = state.record(epoch, score)
        state.rows.append(row)
        log_epoch(row, predictions, args)
        state.rng = gather_objects(rng_state(device), env)  # every rank's, so each resumes its own stream
        if env.is_main:
            encoder_state = encoder.cnn.state_dict() if args.fine_tune_blocks else None
            if improved:
                best_metrics = {**{k: v for k, v in row.items() if isinstance(v, int | float)},
                                "args": args_record(args)}
                save_checkpoint(args.output_dir / "best.pt", decoder, vocab, encoder.name, encoder.preprocessing,
                                metrics=best_metrics, encoder_state=encoder_state)
            if args.average_best:
                state.top_epochs = _keep_top_epoch(state.top_epochs, score, epoch, args, decoder, vocab, encoder)
            with progress.uninterrupted():
                save_checkpoint(args.output_dir / "last.pt", decoder, vocab, encoder.name, encoder.preprocessing,
                                metrics=best_metrics, training=state.state_dict(), encoder_state=encoder_state)
                with metrics_file.open("a") as f:  # after the checkpoint, which carries the row too: a kill in
                    f.write(json.dumps(row) + "\n")  # between loses nothing (--resume writes it)
    if env.is_main:
        plot_training_curves(metrics_file, args.output_dir / "training_curves.png")
        if args.average_best and state.top_epochs:
            _write_averaged(state.top_epochs, args, val_records, val_store, vocab, encoder, device)
    barrier(env)
    return best_metrics


def check_args(args: argparse.Namespace, env: DistributedEnv) -> None:
    """Refuse impossible combinations up front, before minutes of feature encoding."""
    check_output_dir(args.output_dir, args.resume, getattr(args, "overwrite", False))
    if args.batch_size % env.world_size:
        raise SystemExit(f"--batch-size {args.batch_size} must divide evenly over {env.world_size} processes")
    if args.scst:
        if not (args.init_from or args.resume):
            raise SystemExit("--scst fine-tunes a trained model: give --init-from a cross-entropy checkpoint")
        if args.scst_samples < 1 or (args.scst_baseline == "mean" and args.scst_samples < 2):
            raise SystemExit("--scst-samples must be >= 1 (>= 2 with --scst-baseline mean)")
    if args.scst_hallucination_penalty < 0 or (args.scst_hallucination_penalty and not args.scst):
        raise SystemExit("--scst-hallucination-penalty must be >= 0 and needs --scst")
    if args.lr is None:
        args.lr = 1e-5 if args.scst else 1e-3  # SCST: 5e-5 overfit coco-mini within 3 epochs (training log)
    if args.average_best < 0:
        raise SystemExit("--average-best must be >= 0")
    if args.average_best and args.fine_tune_blocks:
        raise SystemExit("--average-best averages decoders only: it cannot be used with --fine-tune-blocks")


def start_run(args: argparse.Namespace, env: DistributedEnv) -> None:
    """The output folder (rank 0 makes it), the log (train.log) and the seed."""
    if env.is_main:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    barrier(env)
    setup_logging(args.output_dir / "train.log", env)
    set_seed(args.seed)


def load_starting_point(args: argparse.Namespace, encoder: Encoder) -> StartingPoint:
    """last.pt to resume (with --resume, when it exists), else --init-from's checkpoint; refuses checkpoints
    made with another backbone."""
    last_path = args.output_dir / "last.pt"
    resume = load_checkpoint(last_path) if args.resume and last_path.exists() else None
    if args.resume and resume is None:
        log.info("--resume: no %s yet, starting fresh", last_path)
    init = load_checkpoint(args.init_from) if args.init_from and resume is None else None
    for source, ckpt in ((last_path, resume), (args.init_from, init)):
        if ckpt is not None and ckpt.encoder_name != encoder.name:
            raise CheckpointError(f"{source} was trained with {ckpt.encoder_name}, not --encoder {encoder.name}")
        if ckpt is not None and ckpt.is_ensemble:
            raise CheckpointError(f"{source} is an ensemble: train from one of its members' checkpoints instead")
    start = StartingPoint(resume, init)
    if start.checkpoint is not None and start.checkpoint.encoder_state is not None:
        # Now, before any feature cache is built from the encoder, not when the decoder is.
        encoder.cnn.load_state_dict(start.checkpoint.encoder_state)
    return start


def check_start(args: argparse.Namespace, start: StartingPoint) -> None:
    """Refuse what only the starting checkpoint can tell is impossible."""
    if start.checkpoint is not None and start.checkpoint.encoder_state is not None and not args.fine_tune_blocks:
        # The feature cache is keyed by backbone and input size, not weights: it would serve the wheel's features.
        source = args.output_dir / "last.pt" if start.resume is not None else args.init_from
        raise SystemExit(f"{source} has a fine-tuned encoder: train on from it with --fine-tune-blocks")
    if args.scst and args.scst_dropout and start.checkpoint is not None and start.checkpoint.config.attention == "hard":
        # In training mode hard attention samples its locations: the sampling pass and the pass that scores the
        # samples would attend to different places, so the gradient would not be that of the sampled captions.
        raise SystemExit("--scst-dropout cannot be used with a hard-attention model: drop --scst-dropout")


def build_datasets(
    args: argparse.Namespace, train_records: Sequence[ImageRecord], val_records: Sequence[ImageRecord],
    encoder: Encoder, vocab: Vocabulary, env: DistributedEnv,
) -> tuple[CaptionDataset, FeatureStore]:
    """(training set, validation feature store). Every image is encoded once into the cache (rank 0 first, then
    the others read what it wrote). When fine-tuning, what is cached is the frozen blocks' output
    (`FrozenPart`), and each step runs only the tuned blocks on it: the same numbers as the whole encoder at every
    step (the photos are not augmented at random), at a fraction of the cost."""
    cache_root = args.cache_dir or args.output_dir.parent / ".cache"
    progress = not args.no_progress and env.is_main
    source, engine = (FrozenPart(encoder), "torch") if args.fine_tune_blocks else (encoder, "auto")
    views = ["original", *_parse_views(args.augment)]
    stores, val_store = {}, None
    for turn in ("main", "others"):
        if (turn == "main") == env.is_main:
            val_store = build_feature_store(val_records, source, cache_root, progress=progress, engine=engine)
            for view in views:
                stores[view] = build_feature_store(train_records, source, cache_root, progress=progress, view=view,
                                                   engine=engine)
        barrier(env)
    extra = [(view, store) for view, store in stores.items() if view != "original"]
    train_set = CaptionDataset(train_records, stores["original"], vocab, args.max_words, views=extra, seed=args.seed)
    return train_set, val_store


class TunedFeatures:
    """Validation features while fine-tuning: the cached frozen part through the tuned blocks as they are now
    (the cache alone would give the features of the encoder the run started from)."""

    def __init__(self, encoder: Encoder, frozen: FeatureStore):
        self.encoder, self.frozen = encoder.eval(), frozen

    def has(self, image_id: int) -> bool:
        return self.frozen.has(image_id)

    @torch.no_grad()
    def get(self, image_id: int) -> torch.Tensor:
        activations = self.frozen.get(image_id).to(next(self.encoder.parameters()).device)
        return self.encoder.tuned_part(activations.unsqueeze(0))[0]  # (L, D)


def validation_features(args: argparse.Namespace, encoder: Encoder, val_store: FeatureStore):
    return TunedFeatures(encoder, val_store) if args.fine_tune_blocks else val_store


def _parse_views(spec: str) -> list[str]:
    views = [v.strip() for v in spec.split(",") if v.strip()]
    unknown = [v for v in views if v not in VIEWS or v == "original"]
    if unknown:
        raise SystemExit(f"unknown --augment view(s) {unknown}; choose from {sorted(set(VIEWS) - {'original'})}")
    return views


@dataclass
class ScstStage:
    """What an SCST epoch needs besides the model: the training images' features and their prepared
    references, and CIDEr-D with document frequencies from all of them."""

    images: scst.ScstImageDataset
    cider: Any  # captioner.cider.CiderD
    references: list[dict[bool, list]]
    truths: list[set[str]]  # each image's reference objects, for --scst-hallucination-penalty

    @classmethod
    def build(cls, args: argparse.Namespace, train_records: Sequence[ImageRecord],
              train_set: CaptionDataset) -> ScstStage:
        images = scst.ScstImageDataset(train_records, train_set.stores[0][1], train_set.stores[1:], args.seed)
        cider, references = scst.reward_scorer(images.records)
        log.info("SCST: %d training images, CIDEr-D document frequencies from their %d references",
                 len(images), sum(len(r.captions) for r in images.records))
        return cls(images, cider, references, [reference_objects(r.captions) for r in images.records])

    def train_one_epoch(self, model: nn.Module, vocab: Vocabulary, optimizer: torch.optim.Optimizer,
                        args: argparse.Namespace, epoch: int, env: DistributedEnv) -> dict[str, float]:
        self.images.set_epoch(epoch)
        loader = DataLoader(self.images, batch_size=args.batch_size // env.world_size,
                            sampler=_sampler(self.images, args, env, epoch), collate_fn=scst.collate_images)
        return scst.train_one_epoch(model, loader, self.references, self.cider, vocab, optimizer, args, epoch, env,
                                    self.truths)


def build_decoder(args: argparse.Namespace, vocab: Vocabulary, encoder: Encoder,
                  start: StartingPoint) -> AttentionDecoder:
    """The starting checkpoint's decoder (its architecture wins over the flags), else a new one."""
    if start.checkpoint is not None:
        decoder = start.checkpoint.decoder
        if start.resume is None and args.semantic and not decoder.config.semantic_classes:
            decoder = _with_semantic_input(decoder, encoder.classifier.out_features)
        for option in ("cell", "attention"):
            if getattr(args, option) != getattr(decoder.config, option):
                log.warning("--%s %s ignored: the checkpoint's decoder has %s %s", option, getattr(args, option),
                            option, getattr(decoder.config, option))
    else:
        decoder = AttentionDecoder(config_from_args(args, len(vocab), encoder.feature_dim,
                                                    encoder.classifier.out_features))
    if start.resume is None and decoder.config.semantic_classes:
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


def build_model(args: argparse.Namespace, decoder: AttentionDecoder, encoder: Encoder, env: DistributedEnv,
                device: torch.device) -> nn.Module:
    """What a training step runs: CaptionModel, wrapped in DDP under torchrun, compiled with --compile on CUDA."""
    model: nn.Module = CaptionModel(decoder, encoder if args.fine_tune_blocks else None)
    if env.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        if device.type == "cuda":
            model = torch.compile(model)
        else:
            log.warning("--compile ignored on %s", device)
    return model


def build_optimizer(args: argparse.Namespace, decoder: AttentionDecoder, encoder: Encoder) -> torch.optim.Optimizer:
    param_groups = [{"params": [p for p in decoder.parameters() if p.requires_grad], "lr": args.lr}]
    trainable_encoder = [p for p in encoder.parameters() if p.requires_grad]
    if trainable_encoder:
        param_groups.append({"params": trainable_encoder, "lr": args.encoder_lr})
    # AdamW: with weight decay, decay the weights directly instead of adding an L2 gradient that Adam's
    # per-parameter scaling would distort (Loshchilov & Hutter 2019); without it, AdamW is Adam.
    return torch.optim.AdamW(param_groups, weight_decay=args.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace):
    if args.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=1)
    if args.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.epochs, 1))
    return None


def _amp_settings(args: argparse.Namespace, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether fp16 needs a gradient scaler). CPU training stays fp32."""
    if args.amp == "off":
        return None, False
    if device.type != "cuda":
        log.warning("--amp %s ignored on %s: the CPU path stays fp32", args.amp, device)
        return None, False
    return (torch.bfloat16, False) if args.amp == "bf16" else (torch.float16, True)


def training_loader(train_set: Dataset, args: argparse.Namespace, env: DistributedEnv, epoch: int,
                    device: torch.device) -> DataLoader:
    """This epoch's batches of (features or images, captions)."""
    if isinstance(train_set, CaptionDataset):
        train_set.set_epoch(epoch)
        if getattr(args, "batching", "caption") == "image":
            batches = ImageMajorBatchSampler(train_set, args.batch_size // env.world_size, args.seed, epoch,
                                             env.rank, env.world_size)
            return DataLoader(train_set, batch_sampler=batches, collate_fn=collate_captions,
                              num_workers=args.num_workers, pin_memory=device.type == "cuda")
    return DataLoader(train_set, batch_size=args.batch_size // env.world_size,
                      sampler=_sampler(train_set, args, env, epoch), collate_fn=collate_captions,
                      num_workers=args.num_workers, pin_memory=device.type == "cuda")


def _sampler(dataset: Dataset, args: argparse.Namespace, env: DistributedEnv, epoch: int) -> DistributedSampler:
    # Shuffling depends only on (seed, epoch), and N processes split exactly the permutation one process
    # would use, so a resumed run and a DDP run see the same global batches as a single process.
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=args.seed)
    sampler.set_epoch(epoch)
    return sampler


def log_epoch(row: dict[str, Any], predictions: dict[int, str], args: argparse.Namespace) -> None:
    train_part = (f"reward {row['train_reward_CIDEr']:.3f} (baseline {row['train_baseline_CIDEr']:.3f})"
                  if args.scst else f"ppl {row['train_perplexity']:.1f}")
    log.info(
        "epoch %d: loss %.3f %s | val ppl %.1f BLEU-4 %.3f CIDEr %.3f CHAIR-s %.3f CHAIR-i %.3f %s| %.0fs",
        row["epoch"], row["train_loss"], train_part, row["val_perplexity"], row["BLEU-4"],
        row["CIDEr"], row["CHAIR-s"], row["CHAIR-i"], "(best) " if row["best"] else "", row["seconds"],
    )
    log.info("  e.g. image %d: %s", *next(iter(predictions.items())))


# ----------------------------------------------------------------------------------------------------------
# Checkpoint averaging (--average-best N)


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
    scores, _ = validate(decoder, val_records, val_store, vocab, batch_size=args.eval_batch_size)
    metrics = {**scores, "averaged_epochs": epochs, "args": args_record(args)}
    save_checkpoint(args.output_dir / "averaged.pt", decoder, vocab, encoder.name, encoder.preprocessing,
                    metrics=metrics)
    log.info("averaged epochs %s: val ppl %.1f BLEU-4 %.3f CIDEr %.3f (best single epoch: %s %.3f)",
             epochs, scores["val_perplexity"], scores["BLEU-4"], scores["CIDEr"], args.monitor, top_epochs[0][0])
