"""Images/s of `captioner caption-batch` (Ray Data, 1 and N local workers) against `captioner caption DIR`.

    python benchmarks/batch_throughput.py --photos 60          # coco-mini val photos, shipped model

Each command runs end to end as a user runs it (a fresh process: model load, and for Ray the local cluster's
start), on the same photos in one run. The steady rate counts the images after the first result over the time from
it to the last (start-up left out); "vs caption" compares steady rates.
Needs the ray extra (pip install 'captioner[ray]').
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COCO_MINI = Path(os.environ.get("COCO_MINI", REPO.parent / "shared" / "data" / "coco-mini"))


def _caption_times(command: list[str]) -> tuple[float, float]:
    """(wall seconds, seconds from the first result line to the last) of `captioner caption`."""
    start = time.perf_counter()
    stamps = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}) as proc:
        for _ in proc.stdout:
            stamps.append(time.perf_counter())
    if proc.returncode:
        raise SystemExit(f"{command} failed")
    return time.perf_counter() - start, stamps[-1] - stamps[0]


def _batch_times(command: list[str], out: Path) -> tuple[float, float]:
    """(wall seconds, seconds from the first part file written to the last) of `captioner caption-batch`."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    written = sorted(part.stat().st_mtime for part in out.glob("part-*.jsonl"))
    return wall, written[-1] - written[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=60)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    photos = sorted((COCO_MINI / "val").glob("*.jpg")) + sorted((COCO_MINI / "train").glob("*.jpg"))
    photos = photos[: args.photos]
    cli = [sys.executable, "-m", "captioner"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for photo in photos:
            shutil.copy(photo, folder / photo.name)
        n = len(photos)
        # steady rate: the images after the first result (line or batch) over the time to the last one
        rows = [("captioner caption DIR (1 process)", n - 1,
                 *_caption_times([*cli, "caption", str(folder), "--batch-size", str(args.batch_size)]))]
        for workers in args.workers:
            out = Path(tmp) / f"out-{workers}"
            command = [*cli, "caption-batch", str(folder), "-o", str(out), "--workers", str(workers),
                       "--batch-size", str(args.batch_size)]
            rows.append((f"captioner caption-batch, {workers} Ray worker(s)", n - args.batch_size,
                         *_batch_times(command, out)))
    print(f"{n} coco-mini photos, shipped model, batch {args.batch_size}, {os.cpu_count()} CPU cores; end to end "
          "= process start, model load (and Ray's local cluster start) included")
    base_steady = rows[0][3] / rows[0][1]  # seconds per image after the first result
    print(f"{'command':<44} {'seconds':>8} {'images/s end to end':>20} {'steady images/s':>16} {'vs caption':>11}")
    for label, after_first, wall, steady in rows:
        print(f"{label:<44} {wall:>8.1f} {n / wall:>20.2f} {after_first / steady:>16.2f} "
              f"{base_steady / (steady / after_first):>10.2f}x")


if __name__ == "__main__":
    main()
