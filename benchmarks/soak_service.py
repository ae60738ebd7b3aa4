"""Soak test of the HTTP service: a real `uvicorn service.app:app` on 127.0.0.1 under a fixed concurrency for N
minutes, with a mix of good photos and bad input, then an overload phase at a multiple of that concurrency.

Mixed phase: each of `--concurrency` clients loops until the time is up, sending (in a fixed cycle) real COCO
photos, files that are not images, truncated JPEGs, out-of-range parameters and uploads over the server's upload
cap. Overload phase (`--overload-factor`, default 4x the concurrency): good photos only, to show the bounded
queue (CAPTIONER_MAX_QUEUE) answering 503 + Retry-After instead of letting latency grow; a refused client waits
its Retry-After (capped at 0.2 s) before it tries again. It prints requests/s, p50/p95/p99 latency, statuses by
kind of request, the server's RSS (psutil) after warm-up and at the end of each phase, and stops by itself.

    python benchmarks/soak_service.py --minutes 3 --concurrency 4
    python benchmarks/soak_service.py --seconds 20 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "coco-mini" / "val"
DEFAULT_CHECKPOINT = REPO / "captioner" / "weights" / "captioner-default.pt"
MAX_UPLOAD = 2 * 1024 * 1024
# The mixed phase's cycle of request kinds: mostly real photos, every kind of bad input among them.
MIX = ("photo", "photo", "photo", "photo", "photo", "photo", "not_image", "truncated", "bad_params", "oversized")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def uvicorn_server(env: dict[str, str], port: int | None = None, ready_s: float = 180) -> Iterator[
        tuple[subprocess.Popen, str]]:
    """`uvicorn service.app:app` in its own process on 127.0.0.1 with CAPTIONER_* `env`; yields (process, url)
    once /readyz answers, and ends it (SIGTERM, then SIGKILL) on the way out."""
    port = port or free_port()
    command = [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning"]
    process = subprocess.Popen(command, env={**os.environ, **env}, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url, ready_s)
        yield process, url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_ready(process: subprocess.Popen, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server was not ready within {timeout_s} s")
        time.sleep(0.2)


def request_bodies(images: Path, max_upload: int) -> dict[str, list[tuple[dict, dict]]]:
    """kind -> list of (httpx post kwargs: files/params). Photos: every JPEG of the folder."""
    photos = [p.read_bytes() for p in sorted(images.glob("*.jpg"))]
    if not photos:
        raise SystemExit(f"no JPEG photos in {images}")
    return {
        "photo": [{"files": {"image": ("photo.jpg", data, "image/jpeg")}} for data in photos],
        "not_image": [{"files": {"image": ("notes.jpg", b"these are not pixels\n" * 50, "image/jpeg")}}],
        "truncated": [{"files": {"image": ("cut.jpg", data[: len(data) // 3], "image/jpeg")}} for data in photos[:4]],
        "bad_params": [{"files": {"image": ("photo.jpg", photos[0], "image/jpeg")},
                        "params": {"beam_size": 99, "temperature": -1}}],
        "oversized": [{"files": {"image": ("big.jpg", os.urandom(max_upload + 4096), "image/jpeg")}}],
    }


@dataclass
class Phase:
    name: str
    concurrency: int
    seconds: float = 0.0
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # (kind, status) -> s
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # kind -> status -> n
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_every_10s_mb: list[float] = field(default_factory=list)
    retry_after_missing: int = 0  # 503 answers without a Retry-After header

    @property
    def requests(self) -> int:
        return sum(sum(c.values()) for c in self.statuses.values())

    def count(self, predicate) -> int:
        return sum(n for c in self.statuses.values() for s, n in c.items() if predicate(s))

    def percentiles(self, key: str) -> dict[str, float]:
        values = self.latencies.get(key, [])
        if not values:
            return {}
        return {f"p{q}": round(float(np.percentile(values, q)) * 1000, 1) for q in (50, 95, 99)}

    def summary(self) -> dict:
        return {
            "phase": self.name, "concurrency": self.concurrency, "seconds": round(self.seconds, 1),
            "requests": self.requests, "requests_per_s": round(self.requests / max(self.seconds, 1e-9), 2),
            "captions_per_s": round(self.statuses["photo"].get(200, 0) / max(self.seconds, 1e-9), 2),
            "statuses_by_kind": {k: {str(s): n for s, n in sorted(c.items(), key=str)} for k, c in
                                 self.statuses.items()},
            "server_errors_5xx_other_than_503": self.count(lambda s: isinstance(s, int) and s >= 500 and s != 503),
            "refused_503": self.count(lambda s: s == 503),
            "retry_after_missing": self.retry_after_missing,
            "transport_errors": self.count(lambda s: isinstance(s, str)),
            "photo_200_latency_ms": self.percentiles("photo:200"),
            "rss_mb": {"start": round(self.rss_start_mb, 1), "end": round(self.rss_end_mb, 1),
                       "peak": round(self.rss_peak_mb, 1), "every_10s": self.rss_every_10s_mb},
        }


def rss_mb(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


async def run_phase(url: str, server: psutil.Process, phase: Phase, bodies: dict, kinds: tuple[str, ...],
                    seconds: float) -> Phase:
    """`phase.concurrency` clients, each cycling through `kinds` until `seconds` have passed."""
    phase.rss_start_mb = phase.rss_peak_mb = rss_mb(server)
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient, offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            kind = kinds[i % len(kinds)]
            options = bodies[kind][i % len(bodies[kind])]
            i += 1
            started = time.perf_counter()
            try:
                response = await http.post("/v1/captions", **options)
                status: int | str = response.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            phase.statuses[kind][status] += 1
            phase.latencies[f"{kind}:{status}"].append(time.perf_counter() - started)
            if status == 503:
                phase.retry_after_missing += "retry-after" not in response.headers
                await asyncio.sleep(min(float(response.headers.get("retry-after", 1)), 0.2))

    async def sample_rss() -> None:
        samples = 0
        while time.perf_counter() < deadline:
            rss = rss_mb(server)
            phase.rss_peak_mb = max(phase.rss_peak_mb, rss)
            if samples % 20 == 0:
                phase.rss_every_10s_mb.append(round(rss, 1))
            samples += 1
            await asyncio.sleep(0.5)

    limits = httpx.Limits(max_connections=phase.concurrency, max_keepalive_connections=phase.concurrency)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(sample_rss(), *(client(http, k) for k in range(phase.concurrency)))
    phase.seconds = time.perf_counter() - started
    phase.rss_end_mb = rss_mb(server)
    phase.rss_peak_mb = max(phase.rss_peak_mb, phase.rss_end_mb)
    return phase


def soak(url: str, pid: int, images: Path, seconds: float, concurrency: int, overload_seconds: float,
         overload_factor: int, max_upload: int = MAX_UPLOAD, mixed_phases: int = 1) -> list[dict]:
    """Warm-up (every kind once), `mixed_phases` mixed phases of `seconds` each (the RSS of the later ones is
    past the allocators' warm-up), then the overload phase; one summary per phase."""
    server = psutil.Process(pid)
    bodies = request_bodies(images, max_upload)
    with httpx.Client(base_url=url, timeout=120) as http:
        for kind in MIX:
            http.post("/v1/captions", **bodies[kind][0])
    phases = [asyncio.run(run_phase(url, server, Phase("mixed", concurrency), bodies, MIX, seconds))
              for _ in range(mixed_phases)]
    if overload_seconds > 0:
        phases.append(asyncio.run(run_phase(url, server, Phase("overload", concurrency * overload_factor), bodies,
                                            ("photo",), overload_seconds)))
    return [p.summary() for p in phases]


def server_env(checkpoint: Path, max_queue: int, max_upload: int = MAX_UPLOAD, **extra: str) -> dict[str, str]:
    return {"CAPTIONER_CHECKPOINT": str(checkpoint), "CAPTIONER_MAX_QUEUE": str(max_queue),
            "CAPTIONER_MAX_UPLOAD_BYTES": str(max_upload), **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="length of the mixed phase (default 3)")
    length.add_argument("--seconds", type=float, help="length of the mixed phase, in seconds")
    parser.add_argument("--concurrency", type=int, default=4, help="clients in the mixed phase")
    parser.add_argument("--overload-factor", type=int, default=4, help="overload clients = this x --concurrency")
    parser.add_argument("--overload-seconds", type=float, default=60.0, help="0: no overload phase")
    parser.add_argument("--max-queue", type=int, default=4, help="the server's CAPTIONER_MAX_QUEUE")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's CAPTIONER_MAX_BATCH")
    parser.add_argument("--json", type=Path, help="also write the summaries here")
    args = parser.parse_args()
    seconds = args.seconds if args.seconds is not None else 60.0 * (args.minutes if args.minutes is not None else 3)
    env = server_env(args.checkpoint, args.max_queue, CAPTIONER_MAX_BATCH=str(args.max_batch))
    with uvicorn_server(env) as (process, url):
        summaries = soak(url, process.pid, args.images, seconds, args.concurrency, args.overload_seconds,
                         args.overload_factor)
    for summary in summaries:
        print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=1))


if __name__ == "__main__":
    main()
