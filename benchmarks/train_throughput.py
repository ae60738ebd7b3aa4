"""Training throughput in captions/s on synthetic data shaped like COCO.

    python benchmarks/train_throughput.py                # CPU: well under 2 minutes
    python benchmarks/train_throughput.py --device cuda  # adds fp32 vs bf16/fp16 AMP and a full-COCO epoch estimate
    python benchmarks/train_throughput.py --cache-io 2000  # feature-cache reads: caption-major vs image-major

Compares, with the same decoder (E=256, H=512, A=256, V=10,000 like full COCO at min count 5, captions of 12
tokens + START/END): cached 14x14x1280 features vs the efficientnet-lite0 encoder in the loop (448 px images),
fine-tuning its last 2 blocks with the whole encoder in the loop vs on the cached output of its frozen blocks
(14x14x192), fp32 vs mixed precision (CUDA only: the CPU path stays fp32), and 1 vs 2 DistributedDataParallel processes.
Each figure is the median over timed steps after warm-up; ratios are against the cached fp32 1-process run.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from captioner.encoder import Encoder, prepare_cpu_inference
from captioner.features import FeatureStore
from captioner.model import AttentionDecoder, CaptionerConfig, caption_loss
from captioner.train import tuned_once_per_photo

COCO_TRAIN_CAPTIONS = 591_753  # captions_train2017.json
L, D, V, T = 196, 1280, 10_000, 14  # locations, feature dim, vocabulary, START + 12 words + END


def _batch(batch_size: int, device: torch.device, images: bool, seed: int = 0, shape: tuple[int, int] = (L, D)):
    g = torch.Generator().manual_seed(seed)
    captions = torch.randint(4, V, (batch_size, T), generator=g)
    captions[:, 0], captions[:, -1] = 1, 2
    if images:
        inputs = torch.rand(batch_size, 3, 448, 448, generator=g)
    else:
        inputs = torch.randn(batch_size, *shape, generator=g)
    return inputs.to(device), captions.to(device)


def _decoder(device: torch.device) -> AttentionDecoder:
    torch.manual_seed(0)
    return AttentionDecoder(CaptionerConfig(vocab_size=V, feature_dim=D)).to(device)


def time_steps(
    device: torch.device, batch_size: int, steps: int, encoder_in_loop: bool = False,
    amp: torch.dtype | None = None, model=None, rank: int = 0, tuned_blocks: int = 0, per_photo: int = 1,
) -> float:
    """Median seconds per training step. `tuned_blocks`: fine-tuning that many of the encoder's last blocks, with
    the whole encoder in the loop (`encoder_in_loop`) or on its cached frozen part (`tuned_once_per_photo`), with
    `per_photo` captions of each photo in a row (`--batching image`)."""
    decoder = _decoder(device)
    model = model(decoder) if model is not None else decoder
    encoder = None
    if encoder_in_loop or tuned_blocks:
        encoder = Encoder("efficientnet-lite0", pretrained=False, fine_tune_blocks=tuned_blocks).to(device).eval()
    trained = [*model.parameters(), *(encoder.parameters() if tuned_blocks else ())]
    optimizer = torch.optim.Adam([p for p in trained if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    frozen_shape = None
    if tuned_blocks and not encoder_in_loop:
        channels, height, width = encoder.frozen_shape()
        frozen_shape = (height * width, channels)  # (L', C)
    inputs, captions = _batch(batch_size, device, encoder_in_loop, seed=rank, shape=frozen_shape or (L, D))
    inputs = inputs[::per_photo].repeat_interleave(per_photo, dim=0)[:batch_size]
    times = []
    for step in range(steps + 2):  # two warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            if encoder is not None and tuned_blocks:
                encoder.train()  # the tuned blocks only: the frozen ones stay in eval mode
                features = encoder(inputs) if encoder_in_loop else tuned_once_per_photo(encoder, inputs)
            elif encoder is not None:
                with torch.no_grad():
                    features = encoder(inputs)
            else:
                features = inputs
            out = model(features, captions)
        loss, _ = caption_loss(out.logits.float(), captions, out.alphas.float())
        optimizer.zero_grad()
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trained, 5.0)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ddp_worker(rank: int, world: int, port: int, batch_size: int, steps: int, threads: int, out: str) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        seconds = time_steps(torch.device("cpu"), batch_size // world, steps,
                             model=lambda d: torch.nn.parallel.DistributedDataParallel(d), rank=rank)
        if rank == 0:
            Path(out).write_text(str(seconds))
    finally:
        dist.destroy_process_group()


def ddp_cpu_seconds(world: int, batch_size: int, steps: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, (os.cpu_count() or 2) // world)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seconds")
        mp.spawn(_ddp_worker, args=(world, port, batch_size, steps, threads, out), nprocs=world)
        return float(Path(out).read_text())


def _synthetic_cache(folder: Path, photos: int, captions_per_photo: int):
    """A real cache folder (captioner.features layout) of `photos` random 14x14x1280 fp16 rows, and records
    with `captions_per_photo` random 12-word captions each."""
    import json

    import numpy as np

    from captioner.coco import ImageRecord
    from captioner.features import DONE

    folder.mkdir(parents=True)
    features = np.lib.format.open_memmap(folder / "features.npy", mode="w+", dtype=np.float16, shape=(photos, L, D))
    rng = np.random.default_rng(0)
    for start in range(0, photos, 256):
        rows = features[start : start + 256]
        rows[:] = rng.standard_normal(rows.shape, dtype=np.float32).astype(np.float16)
    features.flush()
    del features
    np.save(folder / "status.npy", np.full(photos, DONE, dtype=np.int8))
    (folder / "index.json").write_text(json.dumps({"grid": [14, 14], "image_ids": list(range(photos))}))
    words = [f"w{i}" for i in range(200)]
    records = [ImageRecord(i, Path(f"{i}.jpg"), tuple(" ".join(rng.choice(words, 12))
                                                      for _ in range(captions_per_photo))) for i in range(photos)]
    return records, words


class _CountingStore(FeatureStore):
    reads = 0

    def get(self, image_id: int) -> torch.Tensor:
        self.reads += 1
        return super().get(image_id)


def _drop_page_cache(store) -> None:
    """Evict the cache file from memory: unmap this process's pages of it, then drop them from the page cache
    (clean pages, so the kernel honours POSIX_FADV_DONTNEED). The next read of any row goes to the disk."""
    import mmap

    store.features._mmap.madvise(mmap.MADV_DONTNEED)
    fd = os.open(store.folder / "features.npy", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cache_read_rates(photos: int, batch_size: int, captions_per_photo: int = 5) -> list[tuple[str, float, float]]:
    """Captions/s and GB read of one epoch of the training DataLoader alone (no model), caption-major vs
    image-major batches, over a synthetic cache with the page cache dropped after every batch: the regime of a
    cache far larger than RAM (full COCO's 59 GB), where a row is gone before its photo's next caption comes."""
    from torch.utils.data import DataLoader

    from captioner.coco import CaptionDataset, ImageMajorBatchSampler, collate_captions
    from captioner.vocab import Vocabulary

    out = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("CACHE_BENCH_DIR")) as tmp:
        records, words = _synthetic_cache(Path(tmp) / "cache", photos, captions_per_photo)
        vocab = Vocabulary.build([" ".join(words)], min_count=1)
        for label in ("caption-major (shuffled captions)", "image-major (--batching image)"):
            store = _CountingStore(Path(tmp) / "cache")
            dataset = CaptionDataset(records, store, vocab)
            if label.startswith("image"):
                loader = DataLoader(dataset, batch_sampler=ImageMajorBatchSampler(dataset, batch_size),
                                    collate_fn=collate_captions)
            else:
                loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_captions)
            _drop_page_cache(store)
            start = time.perf_counter()
            for _ in loader:
                _drop_page_cache(store)
            seconds = time.perf_counter() - start
            out.append((label, len(dataset) / seconds, store.reads * L * D * 2 / 1e9))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-io", type=int, default=0, metavar="PHOTOS",
                   help="instead: time the cache reads of one epoch over PHOTOS synthetic photos (490 KiB each, "
                        "5 captions), caption-major vs image-major, page cache dropped after every batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 128 on CUDA")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 20 on CUDA)")
    args = p.parse_args()
    if args.cache_io:
        batch = args.batch_size or 32
        print(f"training DataLoader alone, {args.cache_io} synthetic photos x 5 captions, 14x14x1280 fp16 rows "
              f"({args.cache_io * L * D * 2 / 1e9:.2f} GB), batch {batch}, page cache dropped after every batch")
        rates = cache_read_rates(args.cache_io, batch)
        print(f"{'batching':<36} {'captions/s':>11} {'GB read':>8} {'vs caption-major':>17}")
        for label, rate, gb in rates:
            print(f"{label:<36} {rate:>11.1f} {gb:>8.2f} {rate / rates[0][1]:>16.2f}x")
        for label, rate, _ in rates:
            print(f"full COCO epoch ({COCO_TRAIN_CAPTIONS:,} captions) if reading were the bottleneck, {label}: "
                  f"{COCO_TRAIN_CAPTIONS / rate / 3600:.2f} h per loader process")
        return
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (128 if cuda else 32)
    steps = args.steps or (20 if cuda else 3)
    if not cuda:
        prepare_cpu_inference()
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; batch {batch}; synthetic COCO-shaped data (L={L}, D={D}, V={V}, T={T})")

    rows: list[tuple[str, float]] = []
    base = time_steps(device, batch, steps)
    rows.append(("cached features, fp32, 1 process", base))
    rows.append(("encoder in the loop (lite0, 448 px), fp32", time_steps(device, batch, max(1, steps // 2), True)))
    rows.append(("fine-tuning 2 blocks, whole encoder in the loop", time_steps(device, batch, max(1, steps // 2), True,
                                                                            tuned_blocks=2)))
    rows.append(("fine-tuning 2 blocks on the cached frozen part", time_steps(device, batch, steps, tuned_blocks=2)))
    rows.append(("  the same, 5 captions of a photo in a row", time_steps(device, batch, steps, tuned_blocks=2,
                                                                      per_photo=5)))
    if cuda:
        rows.append(("cached features, bf16 autocast", time_steps(device, batch, steps, amp=torch.bfloat16)))
        rows.append(("cached features, fp16 autocast + scaler", time_steps(device, batch, steps, amp=torch.float16)))
    else:
        print("AMP: skipped on CPU (the CPU path stays fp32); run with --device cuda")
        rows.append(("cached features, fp32, 2 DDP processes (gloo)", ddp_cpu_seconds(2, batch, steps)))
    print(f"{'setting':<48} {'captions/s':>11} {'vs cached fp32':>15}")
    for label, seconds in rows:
        print(f"{label:<48} {batch / seconds:>11.1f} {base / seconds:>14.2f}x")
    best = min(seconds for label, seconds in rows if label.startswith("cached"))
    hours = COCO_TRAIN_CAPTIONS / (batch / best) / 3600
    print(f"projected epoch over full COCO train2017 ({COCO_TRAIN_CAPTIONS:,} captions) at the best cached "
          f"setting: {hours:.2f} h")


if __name__ == "__main__":
    main()
