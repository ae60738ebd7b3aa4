"""Batch captioning of large photo collections on Ray Data: `captioner caption-batch INPUT --output OUT`.

Ray Data reads the list of photos (`from_items`), `map_batches` runs them through a pool of actors that each hold
one loaded captioner (`load_captioner`, its default engine), and the driver writes the results as they come back.

Output and resuming: OUT is a folder of JSONL part files, one per finished batch, each written whole through
`checkpoint.atomic_path` (temp file, fsync, rename). A row is `{"path", "caption", "log_prob", "model", "version"}`
or, for a file that cannot be captioned, `{"path", "error"}` (a folder's other files: `{"path", "skipped"}`).
On start the paths already in OUT's part files are left out of the job, so a killed job resumes without redoing a
finished photo, and since a part file is either all there or not there at all, no row is lost or written twice.
`rows(OUT)` reads them back. Ray is an optional extra: `pip install 'captioner[ray]'`.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import atomic_path
from .imagefiles import find_images

INSTALL = "pip install 'captioner[ray]'"
PART_GLOB = "part-*.jsonl"
_PART_NUMBERS = itertools.count()


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the extra, not only the core)
    except ImportError as exc:
        raise SystemExit(f"captioner caption-batch needs Ray Data: {INSTALL}") from exc
    return ray


def list_inputs(inputs: Sequence[Path], recursive: bool = True) -> tuple[list[str], list[dict[str, str]]]:
    """Folders (their images, recursively by default: collections are trees), image files, and `.txt` files of
    paths (one per line). Returns (image paths, skip rows for a folder's files that are not images)."""
    listed: list[Path] = []
    for given in inputs:
        if given.suffix == ".txt" and given.is_file():
            listed.extend(Path(line.strip()) for line in given.read_text().splitlines() if line.strip())
        else:
            listed.append(given)
    images, skipped = find_images(listed, recursive)
    paths = list(dict.fromkeys(str(p) for p in images))  # one row per photo, even if a photo is named twice
    return paths, [{"path": str(s.path), "skipped": s.reason} for s in skipped]


def rows(output: Path) -> list[dict[str, Any]]:
    """Every row written so far in OUT, part file by part file."""
    found = []
    for part in sorted(Path(output).glob(PART_GLOB)):
        found.extend(json.loads(line) for line in part.read_text().splitlines() if line)
    return found


def finished_paths(output: Path) -> set[str]:
    return {row["path"] for row in rows(output)}


def _write_part(output: Path, batch_rows: list[dict[str, Any]]) -> Path:
    """One batch as one part file, whole or not at all. The name carries the pid and a counter: a resumed job
    (or a second driver) never overwrites a part."""
    part = output / f"part-{os.getpid()}-{next(_PART_NUMBERS):06d}.jsonl"
    with atomic_path(part) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in batch_rows))
    return part


class CaptionActor:
    """One loaded captioner per Ray actor; `__call__` captions a batch of paths ({"path": array of str})."""

    def __init__(self, checkpoint: str | None, threads: int, options: dict[str, Any] | None):
        import torch

        from .api import load_captioner
        from .options import recommended_options

        torch.set_num_threads(threads)  # each actor gets its share of the node's cores, not all of them
        self.captioner = load_captioner(checkpoint)
        self.captioner.decoder_threads = threads
        self.options = recommended_options(**(options or {}))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from .images import ImageError

        paths = [str(p) for p in batch["path"]]
        images, errors = {}, {}
        for path in paths:
            try:
                images[path] = self.captioner.open(path)
            except (ImageError, OSError) as exc:  # unreadable: a row that says why, never a failed job
                errors[path] = str(exc)
        results = dict(zip(images, self.captioner.caption(list(images.values()), self.options), strict=True)) \
            if images else {}
        out: dict[str, list] = {"path": [], "caption": [], "log_prob": [], "error": []}
        for path in paths:
            result = results.get(path)
            out["path"].append(path)
            # "" and nan rather than None: Arrow turns a None in a string column into a float nan
            out["caption"].append(result.caption if result else "")
            out["log_prob"].append(result.candidates[0].log_prob if result else float("nan"))
            out["error"].append(errors.get(path, ""))
        out["model"] = [self.captioner.name] * len(paths)
        out["version"] = [self.captioner.version] * len(paths)
        return out


@dataclass
class BatchSummary:
    captioned: int
    errors: int
    skipped: int
    already_done: int


def _row(batch: dict[str, Any], i: int) -> dict[str, Any]:
    if batch["error"][i]:
        return {"path": str(batch["path"][i]), "error": str(batch["error"][i])}
    return {"path": str(batch["path"][i]), "caption": str(batch["caption"][i]),
            "log_prob": float(batch["log_prob"][i]), "model": str(batch["model"][i]),
            "version": str(batch["version"][i])}


def caption_batch(
    inputs: Sequence[Path],
    output: Path,
    workers: int = 1,
    address: str | None = None,
    batch_size: int = 16,
    checkpoint: Path | None = None,
    options: dict[str, Any] | None = None,
    threads_per_worker: int = 1,
    log=None,
) -> BatchSummary:
    """Caption `inputs` into the part files of `output` on `workers` actors, skipping paths already there.
    Connects to `address` (or $RAY_ADDRESS) when given, else starts a local Ray cluster, unless this process
    is already connected to one."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths, skips = list_inputs(inputs)
    done = finished_paths(output)
    todo = [p for p in paths if p not in done]
    new_skips = [s for s in skips if s["path"] not in done]
    if new_skips:
        _write_part(output, new_skips)
    summary = BatchSummary(0, 0, len(new_skips), len(paths) - len(todo))
    log(f"{len(paths)} photos: {summary.already_done} already in {output}, {len(todo)} to caption; "
        f"{len(skips)} other files skipped")
    if not todo:
        return summary
    ray = _import_ray()
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=False,
                 include_dashboard=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Small blocks (a few batches each), so the actors share the work and results stream back as they finish.
    blocks = max(workers, -(-len(todo) // batch_size))
    ds = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=blocks)
    captions = ds.map_batches(
        CaptionActor,
        fn_constructor_kwargs={"checkpoint": str(checkpoint) if checkpoint else None,
                               "threads": threads_per_worker, "options": options},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers),  # the model is loaded once per actor
        num_cpus=threads_per_worker,
        batch_format="numpy",
    )
    for batch in captions.iter_batches(batch_size=None, batch_format="numpy"):
        batch_rows = [_row(batch, i) for i in range(len(batch["path"]))]
        _write_part(output, batch_rows)  # as each batch finishes: a killed job keeps these
        errors = sum("error" in r for r in batch_rows)
        summary.errors += errors
        summary.captioned += len(batch_rows) - errors
    log(f"captioned {summary.captioned}, unreadable {summary.errors}, skipped {summary.skipped}: rows in {output}")
    return summary
