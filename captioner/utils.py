"""Small helpers a training run needs around the model: logging, seeds and RNG state, the args record, the
metrics log and its plot. Shared by `captioner train` and `captioner pretrain-lm`."""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_path
from .distributed import SINGLE_PROCESS, DistributedEnv


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                   max_norm: float, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """One update: gradients of `loss`, clipped to a global L2 norm of `max_norm` over all `params` (not per
    tensor: clipping keeps the update's direction), then the optimiser's step. Returns the norm before clipping.
    With an fp16 `scaler` the loss is scaled so small gradients survive, and unscaled before clipping."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return norm


def setup_logging(log_file: Path, env: DistributedEnv = SINGLE_PROCESS) -> None:
    """Rank 0 logs to `log_file` and the terminal; other ranks only print warnings. `stop_logging` undoes it."""
    root = logging.getLogger("captioner")
    root.setLevel(logging.INFO if env.is_main else logging.WARNING)
    stop_logging()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if env.is_main:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._captioner = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def stop_logging() -> None:
    """Detach and close the handlers `setup_logging` added: a run's log file must not outlive the run (a later
    message in the same process, e.g. a service started after a training, would write to, or fail on, a file
    whose folder may be gone)."""
    root = logging.getLogger("captioner")
    for handler in list(root.handlers):
        if getattr(handler, "_captioner", False):
            root.removeHandler(handler)
            handler.close()


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The generators a training step draws from (torch's, and the device's on CUDA)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def args_record(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line arguments as JSON-ready values (paths as strings), for checkpoints' metrics."""
    return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
            for k, v in vars(args).items() if not callable(v)}


def restore_metrics_rows(metrics_file: Path, epoch: int, saved_rows: list[dict] | None,
                         write: bool = True) -> list[dict]:
    """Make metrics.jsonl hold the rows of epochs 1..`epoch` (the last one last.pt finished), and return them.
    They come from last.pt (`saved_rows`), so an epoch killed after its checkpoint but before its row keeps its
    row, and one killed before its checkpoint loses the row it may have written. A last.pt from before
    checkpoints carried rows (None): the file's own rows up to `epoch`. Written atomically, if `write` (the
    main process)."""
    file_rows = ([json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
                 if metrics_file.exists() else [])
    rows = list(saved_rows) if saved_rows is not None else [row for row in file_rows if row["epoch"] <= epoch]
    if write and rows != file_rows:
        with atomic_path(metrics_file) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


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
