"""Load test of the HTTP service: a real uvicorn on 127.0.0.1, with and without micro-batching.

Two `uvicorn service.app:app` subprocesses, one with micro-batching (max_batch 16) and one with max_batch 1 (one
request through the model at a time). At each concurrency level, a bounded number of caption requests (real
photos, multipart uploads) goes to each in turn from that many concurrent clients; it prints requests/s,
p50/p95 latency and the mean batch size the server formed. Between levels, the bare pipeline (the same model,
engine and decoding in a plain process: open, preprocess, encode, decode, batches of --batch-size, no HTTP) is
timed on the same photos, and the last lines give each mode's images/s at the highest concurrency as a share of
the bare pipeline's, measured in the same run.

    python benchmarks/load_service.py --checkpoint captioner/weights/captioner-default.pt
    python benchmarks/load_service.py --checkpoint runs/mini/best.pt --concurrency 1 4 16 --requests 32
    python benchmarks/load_service.py --untrained     # no checkpoint needed: default-size decoder, random weights
    python benchmarks/load_service.py --engine slim   # the shipped model's exported graphs, as the slim install serves
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "coco-mini" / "val"


@dataclass
class Row:
    mode: str
    concurrency: int
    requests: int
    seconds: float
    latencies: list[float]
    mean_batch: float

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000.0


def untrained_checkpoint(path: Path, captions: Path) -> Path:
    """An untrained decoder of the default size on efficientnet-lite0 with the real vocabulary: the compute of a
    real model (captions are gibberish and never end early, so every caption takes max_length steps)."""
    import torch

    from captioner.checkpoint import save_checkpoint
    from captioner.coco import load_coco_captions
    from captioner.encoder import DEFAULT_IMAGE_SIZE, Preprocessing, get_backbone
    from captioner.model import AttentionDecoder, CaptionerConfig
    from captioner.vocab import Vocabulary

    records = load_coco_captions(captions, captions.parent)  # only the captions are read
    vocab = Vocabulary.build((c for r in records for c in r.captions), min_count=5)
    spec = get_backbone("efficientnet-lite0")
    torch.manual_seed(0)
    decoder = AttentionDecoder(CaptionerConfig(vocab_size=len(vocab), feature_dim=spec.feature_dim))
    save_checkpoint(path, decoder, vocab, spec.name, Preprocessing(DEFAULT_IMAGE_SIZE, spec.mean, spec.std))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_env(args: argparse.Namespace) -> dict[str, str]:
    """The CAPTIONER_* variables that pick the model and its decoding, the same for the servers and the bare
    pipeline."""
    env = {**os.environ, "CAPTIONER_METHOD": args.method}
    env.pop("CAPTIONER_CHECKPOINT", None)
    if args.checkpoint:
        env["CAPTIONER_CHECKPOINT"] = str(args.checkpoint)
    if args.engine:
        env["CAPTIONER_ENGINE"] = args.engine
    if args.threads:
        env["CAPTIONER_THREADS"] = str(args.threads)
    return env


def start_server(args: argparse.Namespace, max_batch: int, port: int) -> subprocess.Popen:
    env = {
        **model_env(args),
        "CAPTIONER_MAX_BATCH": str(max_batch),
        "CAPTIONER_MAX_WAIT_MS": str(args.max_wait_ms),
        "CAPTIONER_MAX_QUEUE": "1024",
    }
    if args.encoder_batch:
        env["CAPTIONER_ENCODER_BATCH"] = str(args.encoder_batch)
    command = [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, cwd=REPO)
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.terminate()
            raise SystemExit("the server did not become ready in 180 s")
        time.sleep(0.25)


async def run_level(base_url: str, photos: list[tuple[str, bytes]], concurrency: int, total: int) -> Row:
    latencies: list[float] = []
    next_index = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < total:
            name, data = photos[next_index % len(photos)]
            next_index += 1
            started = time.perf_counter()
            response = await http.post("/v1/captions", files={"image": (name, data, "image/jpeg")})
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text}")
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http:
        before = (await http.get("/v1/stats")).json()
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        after = (await http.get("/v1/stats")).json()
    batches = max(after["batches"] - before["batches"], 1)
    mean_batch = (after["requests"] - before["requests"]) / batches
    return Row("", concurrency, total, seconds, latencies, mean_batch)


BARE = r'''
import json, sys, time, warnings
warnings.simplefilter("ignore")
from service.model import load_model
from service.settings import Settings

settings = Settings()  # the same CAPTIONER_* environment, engine and threads as the servers
captioner = load_model(settings)
options = settings.default_decoding()
paths, batch = json.loads(sys.argv[1]), int(sys.argv[2])
for line in sys.stdin:
    total = int(line)
    started = time.perf_counter()
    for start in range(0, total, batch):
        chunk = [paths[i % len(paths)] for i in range(start, min(start + batch, total))]
        captioner.caption([captioner.open(p) for p in chunk], options)
    print(time.perf_counter() - started, flush=True)
'''


class BarePipeline:
    """The model without the service, in its own process: images/s of open + preprocess + encode + decode."""

    def __init__(self, args: argparse.Namespace, paths: list[Path]):
        env = model_env(args)
        self.process = subprocess.Popen([sys.executable, "-c", BARE, json.dumps([str(p) for p in paths]),
                                         str(args.batch_size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env, cwd=REPO)

    def images_per_second(self, total: int) -> float:
        self.process.stdin.write(f"{total}\n")
        self.process.stdin.flush()
        return total / float(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def benchmark(args: argparse.Namespace, photos: list[tuple[str, bytes]]) -> list[Row]:
    """Both servers stay up and the modes alternate at every level, so a change in machine load between levels
    (other processes on a shared box) hits both modes alike instead of biasing one."""
    modes = [(f"micro-batching (max {args.batch_size})", args.batch_size), ("one at a time", 1)]
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    bare = BarePipeline(args, sorted(args.images.glob("*.jpg")))
    bare_rates: list[float] = []
    try:
        bare.images_per_second(args.warmup)
        for mode, max_batch in modes:
            port = free_port()
            servers[mode] = (start_server(args, max_batch, port), f"http://127.0.0.1:{port}")
            asyncio.run(run_level(servers[mode][1], photos, 1, args.warmup))  # first calls pay lazy set-up
        rows = []
        for concurrency in args.concurrency:
            total = max(args.requests, 2 * concurrency)
            for mode, _ in modes:
                row = asyncio.run(run_level(servers[mode][1], photos, concurrency, total))
                row.mode = mode
                print(format_row(row), flush=True)
                rows.append(row)
            bare_rates.append(bare.images_per_second(total))
        bare_rate = statistics.median(bare_rates)
        print(f"\nbare pipeline (no HTTP, batches of {args.batch_size}): {bare_rate:.2f} images/s "
              f"(median of {len(bare_rates)}, one run between levels)")
        top = max(args.concurrency)
        for row in rows:
            if row.concurrency == top:
                print(f"{row.mode} at concurrency {top}: {row.throughput / bare_rate:.0%} of the bare pipeline's "
                      "images/s (target >= 85%)")
        return rows
    finally:
        bare.close()
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=30)


def format_row(row: Row) -> str:
    return (f"| {row.mode:<23} | {row.concurrency:>11} | {row.requests:>8} | {row.throughput:>10.2f} | "
            f"{row.percentile(50):>8.0f} | {row.percentile(95):>8.0f} | {row.mean_batch:>10.1f} |")


HEADER = ("| mode                    | concurrency | requests | requests/s | p50 (ms) | p95 (ms) | mean batch |\n"
          "|-------------------------|-------------|----------|------------|----------|----------|------------|")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", type=Path, help="default: the shipped model")
    model.add_argument("--untrained", action="store_true", help="build an untrained default-size model to load")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of JPEG photos to upload")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=16, help="requests per level (at least 2 x concurrency)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="max_batch of the micro-batching run")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--method", default="beam", choices=["greedy", "beam", "sample"],
                   help="beam: the service's default decoding (captioner.options.RECOMMENDED)")
    p.add_argument("--engine", default=None, choices=["auto", "slim", "onnx", "torch"],
                   help="default: the server's (auto); slim: the exported graphs, no torch (no --checkpoint)")
    p.add_argument("--encoder-batch", type=int, default=None, help="images per CNN pass (default: the server's)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per process (default: one a core)")
    return p


def main(args: argparse.Namespace) -> None:
    photos = [(p.name, p.read_bytes()) for p in sorted(args.images.glob("*.jpg"))]
    if not photos:
        raise SystemExit(f"no .jpg photos in {args.images}")
    with tempfile.TemporaryDirectory(prefix="captioner-bench-") as folder:
        if args.untrained:
            captions = args.images.parent / "annotations" / "captions_train.json"
            args.checkpoint = untrained_checkpoint(Path(folder) / "untrained.pt", captions)
        print(f"checkpoint {args.checkpoint or 'shipped'}, {len(photos)} photos from {args.images}, "
              f"method {args.method}, "
              f"engine {args.engine or 'auto'}, max_wait_ms {args.max_wait_ms}, "
              f"encoder_batch {args.encoder_batch or 'default'}, "
              f"threads {args.threads or 'default'}, {os.cpu_count()} CPU cores\n")
        print(HEADER, flush=True)
        benchmark(args, photos)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
