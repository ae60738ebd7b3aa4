"""Self-critical sequence training (Rennie et al. 2017): a second stage that optimises CIDEr-D directly.

    captioner train --scst --init-from runs/xe/best.pt ... --output-dir runs/scst

For each training image the current policy samples N captions. Each is scored against the image's references
with CIDEr-D (document frequencies from all training references, computed once: `captioner.cider`), and its
log-probability is weighted by the advantage, reward minus a baseline:
- "greedy" (the paper's self-critical baseline): the reward of the image's greedy caption;
- "mean": the mean reward of the image's other N-1 samples (no extra decoding; Luo 2020).

With `--scst-hallucination-penalty P` the reward is CIDEr-D minus P per object mention (COCO category,
`captioner.hallucination`) that none of the image's references names: CHAIR-i's count, on training images. CIDEr-D
barely penalises an invented object (Rohrbach et al. 2018); this makes the policy pay for one.

Sampling and the gradient pass both run with dropout off (unless `--scst-dropout`): REINFORCE needs the
log-probabilities of the very policy that sampled, and that is also the network that decodes at test time.
Log-probabilities are taken over the tokens decoding may emit (no PAD/START/UNK, no END first, END forced
after `max_length` words), exactly the distribution the sampler drew from.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .cider import CiderD
from .coco import ImageRecord, choose_view, flip_caption
from .decoding import DecodingOptions, Hypothesis, allowed_logits, generate
from .distributed import SINGLE_PROCESS, DistributedEnv, all_reduce_sum, unwrap_model
from .features import FeatureStore
from .hallucination import caption_objects
from .utils import optimizer_step
from .vocab import Vocabulary, tokenize

BASELINES = ("greedy", "mean")


class ScstImageDataset(Dataset):
    """(features (L, D), index into `records`, mirrored?) for every training image with cached features: SCST
    works per image, not per caption, since an image's references all score each sample.

    With extra views (`--augment`: (name, store) pairs), each image reads one view per epoch, chosen by
    (seed, epoch, index) as in `CaptionDataset`; a mirrored view is scored against mirrored references."""

    def __init__(self, records: Sequence[ImageRecord], store: FeatureStore,
                 views: Sequence[tuple[str, FeatureStore]] = (), seed: int = 0):
        self.stores = [("original", store), *views]
        self.records = [r for r in records if all(s.has(r.image_id) for _, s in self.stores)]
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        name, store = self.stores[choose_view(self.seed, self.epoch, index, len(self.stores))]
        return store.get(self.records[index].image_id), index, "flip" in name


def collate_images(batch: Sequence[tuple[torch.Tensor, int, bool]]) -> tuple[torch.Tensor, list[tuple[int, bool]]]:
    return torch.stack([f for f, _, _ in batch]), [(i, mirrored) for _, i, mirrored in batch]


def reward_scorer(records: Sequence[ImageRecord]) -> tuple[CiderD, list[dict[bool, list]]]:
    """CIDEr-D with document frequencies from these (training) references, and each record's references
    prepared for scoring, in record order: [{False: as written, True: mirrored (left <-> right)}, ...]."""
    references = [[tokenize(c) for c in r.captions] for r in records]
    cider = CiderD(references)
    prepared = [{False: cider.prepare(refs), True: cider.prepare([tokenize(flip_caption(c)) for c in r.captions])}
                for r, refs in zip(records, references, strict=True)]
    return cider, prepared


def invented_objects(words: Sequence[str], truth: set[str]) -> int:
    """How many of a caption's object mentions name a category outside `truth` (its image's reference objects)."""
    return sum(m.category not in truth for m in caption_objects(words))


def scst_loss(
    token_log_probs: torch.Tensor, mask: torch.Tensor, advantage: torch.Tensor, normalizer: torch.Tensor | float
) -> torch.Tensor:
    """-(reward - baseline) * log p(caption), summed over real tokens and divided by `normalizer`.

    token_log_probs (N, T), mask (N, T) bool, advantage (N,). Minimising it raises the probability of
    captions that beat their baseline and lowers that of captions that fall short."""
    weighted = torch.where(mask, advantage.detach().unsqueeze(1) * token_log_probs, 0.0)
    return -weighted.sum() / normalizer


def sequence_log_probs(
    logits: torch.Tensor, captions: torch.Tensor, vocab: Vocabulary, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of captions[:, 1:] under the decoding distribution.

    logits (N, T, V), captions (N, T+1) -> log-probs (N, T) (0 at padding), mask (N, T)."""
    targets = captions[:, 1:]
    mask = targets != vocab.pad_id
    # The sampler's own masking rules, step by step (differentiable: they only write -inf into a copy).
    allowed = torch.stack([allowed_logits(logits[:, t].float(), vocab, t, max_length) for t in range(logits.size(1))],
                          dim=1)  # (N, T, V)
    log_probs = F.log_softmax(allowed, dim=-1).gather(2, targets.unsqueeze(2)).squeeze(2)
    return torch.where(mask, log_probs, 0.0), mask


def captions_tensor(hypotheses: Sequence[Hypothesis], vocab: Vocabulary, device: torch.device) -> torch.Tensor:
    """START + generated tokens (END included), padded: (N, T+1)."""
    longest = max(len(h.tokens) for h in hypotheses)
    out = torch.full((len(hypotheses), longest + 1), vocab.pad_id, dtype=torch.long)
    out[:, 0] = vocab.start_id
    for row, h in enumerate(hypotheses):
        out[row, 1 : len(h.tokens) + 1] = torch.tensor(h.tokens)
    return out.to(device)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    references: Sequence[dict[bool, list]],
    cider: CiderD,
    vocab: Vocabulary,
    optimizer: torch.optim.Optimizer,
    args: argparse.Namespace,
    epoch: int,
    env: DistributedEnv = SINGLE_PROCESS,
    truths: Sequence[set[str]] = (),
) -> dict[str, float]:
    """One SCST pass over the training images. `model` is the (possibly DDP-wrapped) CaptionModel: decoding
    uses its decoder directly, the gradient pass goes through the wrapper. `references[i]` are record i's
    prepared references (`reward_scorer`), `truths[i]` its reference objects (needed with a hallucination
    penalty; with them the objects samples invent are counted). Returns epoch means over all ranks."""
    decoder, encoder = unwrap_model(model).decoder, unwrap_model(model).encoder
    device = next(decoder.parameters()).device
    params = [p for group in optimizer.param_groups for p in group["params"]]
    samples_per_image = args.scst_samples
    sampling = DecodingOptions(method="sample", num_captions=samples_per_image, max_length=args.scst_max_length)
    greedy = DecodingOptions(method="greedy", max_length=args.scst_max_length)
    penalty = getattr(args, "scst_hallucination_penalty", 0.0)
    if penalty and not truths:
        raise ValueError("a hallucination penalty needs each image's reference objects (truths)")

    def reward(words: list[str], index: int, mirrored: bool) -> tuple[float, int]:
        invented = invented_objects(words, truths[index]) if truths else 0
        return cider.score(words, references[index][mirrored]) - penalty * invented, invented

    sums = torch.zeros(5, dtype=torch.float64)  # loss * tokens, sample reward, baseline reward, samples, invented
    tokens_seen, max_norm = 0.0, 0.0
    bar = tqdm(loader, desc=f"scst {epoch}", unit="batch", disable=args.no_progress or not env.is_main, leave=False)
    for inputs, keys in bar:  # keys: (record index, mirrored view?) per image
        inputs = inputs.to(device)  # features, or when fine-tuning the encoder's cached frozen part
        model.train(args.scst_dropout)  # the policy: see the module doc
        with torch.no_grad():
            features = encoder.tuned_part(inputs) if encoder is not None else inputs  # (B, L, D)
            seed = int(torch.randint(0, 2**62, ()))  # drawn from the run's RNG: reproducible and resumable
            samples = generate(decoder, features, vocab, replace(sampling, seed=seed))
            scored = torch.tensor([[reward(vocab.decode_words(h.tokens), i, mirrored) for h in hyps]
                                   for (i, mirrored), hyps in zip(keys, samples, strict=True)])  # (B, N, 2)
            rewards, invented = scored[..., 0], scored[..., 1]
            if args.scst_baseline == "greedy":
                best = generate(decoder.eval(), features, vocab, greedy)
                model.train(args.scst_dropout)
                baseline = torch.tensor([reward(vocab.decode_words(hyps[0].tokens), i, mirrored)[0]
                                         for (i, mirrored), hyps in zip(keys, best, strict=True)]).unsqueeze(1)
            else:  # the mean of the image's other samples
                baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (samples_per_image - 1)  # (B, N)
            advantage = (rewards - baseline).flatten().to(device)  # (B*N,)
        flat = [h for hyps in samples for h in hyps]
        captions = captions_tensor(flat, vocab, device)  # (B*N, T+1)
        logits = model(inputs, captions, repeats=samples_per_image).logits  # each image's row N times
        token_log_probs, mask = sequence_log_probs(logits, captions, vocab, args.scst_max_length)
        local_tokens = mask.sum()
        global_tokens = all_reduce_sum(local_tokens.double(), env)
        loss = scst_loss(token_log_probs, mask, advantage, global_tokens.float() / env.world_size)
        norm = optimizer_step(loss, optimizer, params, args.grad_clip)
        sums += torch.tensor([float(loss.detach()) * float(global_tokens) / env.world_size,
                              float(rewards.sum()), float(baseline.expand_as(rewards).sum()), rewards.numel(),
                              float(invented.sum())],
                             dtype=torch.float64)
        tokens_seen += float(local_tokens)
        max_norm = max(max_norm, float(norm))
        bar.set_postfix(reward=f"{float(rewards.mean()):.3f}", baseline=f"{float(baseline.mean()):.3f}")
    sums = all_reduce_sum(sums.to(device), env).tolist()
    tokens_seen = float(all_reduce_sum(torch.tensor(tokens_seen, dtype=torch.float64, device=device), env))
    loss_sum, reward_sum, baseline_sum, count, invented_sum = sums
    row = {
        "train_loss": loss_sum / max(tokens_seen, 1.0),
        "train_reward_CIDEr": reward_sum / max(count, 1.0),  # minus the penalty, when there is one
        "train_baseline_CIDEr": baseline_sum / max(count, 1.0),
        "max_grad_norm_before_clip": max_norm,
    }
    if truths:  # what CHAIR-i counts, on the training samples: logged with or without a penalty
        row["train_invented_objects_per_sample"] = invented_sum / max(count, 1.0)
    return row
