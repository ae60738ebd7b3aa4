"""Small builders for tests: tiny model configs and checkpoints, argv of tiny training runs, subsets of the real
COCO files (with corrupt copies), a real uvicorn server, system parts."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import uvicorn

from captioner import train
from captioner.checkpoint import save_checkpoint
from captioner.encoder import Preprocessing, get_backbone
from captioner.model import AttentionDecoder, CaptionerConfig
from captioner.vocab import Vocabulary
from service.app import create_app
from service.settings import Settings


def tiny_config(vocab_size: int, feature_dim: int = 16, **overrides) -> CaptionerConfig:
    """A decoder small enough to train in seconds (embedding 24, hidden 32, attention 16, no dropout)."""
    settings = dict(embed_dim=24, hidden_dim=32, attention_dim=16, dropout=0.0)
    settings.update(overrides)
    return CaptionerConfig(vocab_size=vocab_size, feature_dim=feature_dim, **settings)


def save_tiny_checkpoint(path: Path, vocab: Vocabulary, encoder: str = "efficientnet-lite0", image_size: int = 448,
                         seed: int = 0, **overrides) -> AttentionDecoder:
    """An untrained tiny decoder for `encoder`'s features, saved as a checkpoint like a trained one."""
    torch.manual_seed(seed)
    spec = get_backbone(encoder)
    decoder = AttentionDecoder(tiny_config(len(vocab), feature_dim=spec.feature_dim, **overrides))
    save_checkpoint(path, decoder, vocab, spec.name, Preprocessing(image_size, spec.mean, spec.std))
    return decoder


def train_argv(data: Path, out: Path, cache: Path, epochs: int = 2, **flags) -> list[str]:
    """argv of a tiny `captioner train` run (random 64-px encoder, tiny decoder) on a `write_coco_subset` folder.
    `flags` add or replace options: dropout=0 -> --dropout 0, resume=True -> --resume."""
    options = {
        "train_images": data / "train", "train_captions": data / "captions_train.json",
        "val_images": data / "val", "val_captions": data / "captions_val.json",
        "output_dir": out, "cache_dir": cache, "random_encoder": True, "image_size": 64, "min_word_count": 1,
        "embed_dim": 16, "hidden_dim": 32, "attention_dim": 16, "batch_size": 8, "epochs": epochs, "lr": 3e-3,
        "no_progress": True, "device": "cpu", **flags,
    }
    argv = []
    for name, value in options.items():
        if value is False or value is None:
            continue
        argv.append("--" + name.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return argv


def train_args(tmp_path: Path, coco_mini: Path, out: Path, epochs: int, **overrides) -> argparse.Namespace:
    """Parsed arguments of a tiny training run on 8 real training photos (one of them corrupt) and 3 validation
    photos, written once under tmp_path/data; `overrides` replace parsed values (Python values, not strings)."""
    data = tmp_path / "data"
    if not data.exists():
        write_coco_subset(coco_mini, "train", 8, data, corrupt=1)
        write_coco_subset(coco_mini, "val", 3, data)
    argv = train_argv(data, out, tmp_path / "cache", epochs, dropout=0.3, patience=100)
    args = train.get_args_parser().parse_args(argv)
    vars(args).update(overrides)
    return args


def metrics_rows(out: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def running_in_ci() -> bool:
    """CI sets CI=true (as GitHub Actions and most CI systems do): there, nothing the suite needs may be missing."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_command(names: tuple[str, ...], install: str, purpose: str) -> str:
    """The path of the first of `names` on PATH. Missing: the test skips with the exact command that installs it,
    so the README's `pytest -q` passes on a fresh machine, except in CI, where it fails (CI installs it)."""
    for name in names:
        if path := shutil.which(name):
            return path
    message = f"{purpose} needs `{names[0]}`: install it with `{install}` (bash .ci/run does)"
    if running_in_ci():
        pytest.fail(f"{message}; CI=true: a missing system part fails instead of skipping")
    pytest.skip(message)


CHROMIUM = (("chromium", "chromium-browser", "google-chrome"), "apt-get install chromium", "headless Chromium")
JAVA = (("java",), "apt-get install default-jre-headless", "METEOR and the PTB tokenizer (official COCO metrics)")


def write_coco_subset(coco_mini: Path, split: str, n_images: int, out_dir: Path, corrupt: int = 0) -> tuple[Path, Path]:
    """Copy the first `n_images` of a coco-mini split (photos + captions) into out_dir; the last `corrupt` photos
    are replaced by truncated JPEG bytes. Returns (images_dir, captions_file)."""
    data = json.loads((coco_mini / "annotations" / f"captions_{split}.json").read_text())
    images = sorted(data["images"], key=lambda im: im["id"])[:n_images]
    keep = {im["id"] for im in images}
    images_dir = out_dir / split
    images_dir.mkdir(parents=True, exist_ok=True)
    for k, im in enumerate(images):
        src = coco_mini / split / im["file_name"]
        if k >= n_images - corrupt:
            (images_dir / im["file_name"]).write_bytes(src.read_bytes()[:300])  # truncated JPEG
        else:
            shutil.copy(src, images_dir / im["file_name"])
    subset = {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}
    captions = out_dir / f"captions_{split}.json"
    captions.write_text(json.dumps(subset))
    return images_dir, captions


@contextmanager
def running_server(settings: Settings) -> Iterator[str]:
    """A real uvicorn server in a background thread, on a free port of 127.0.0.1; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start (see the log above)")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
