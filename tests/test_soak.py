"""A short soak of the real service (benchmarks/soak_service.py, bounded to ~20 s): a mix of real photos and bad
input at fixed concurrency gives no 5xx and a flat RSS; 4x that concurrency against a small queue is refused with
503 + Retry-After while the accepted requests keep a bounded latency."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RSS_GROWTH_MB = 60  # after warm-up; measured: +16 MB over 3 minutes at concurrency 4 (docs/service.md)


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


soak = load_benchmark("soak_service")


def test_short_soak_has_no_5xx_flat_memory_and_clean_overload(shipped_checkpoint, coco_mini):
    env = soak.server_env(shipped_checkpoint, max_queue=2, CAPTIONER_MAX_BATCH="4", CAPTIONER_MAX_LENGTH="12")
    with soak.uvicorn_server(env) as (process, url):
        warm, mixed, overload = soak.soak(url, process.pid, coco_mini / "val", seconds=5, concurrency=3,
                                          overload_seconds=6, overload_factor=4, mixed_phases=2)
    print("\nshort soak:", mixed, overload, sep="\n")
    for phase in (warm, mixed):
        assert phase["server_errors_5xx_other_than_503"] == 0 and phase["refused_503"] == 0, phase
        assert phase["transport_errors"] == 0, phase
        kinds = phase["statuses_by_kind"]
        assert set(kinds["photo"]) == {"200"} and set(kinds["not_image"]) == {"415"}, kinds
        assert set(kinds["truncated"]) == {"400"} and set(kinds["bad_params"]) == {"422"}, kinds
        assert set(kinds["oversized"]) == {"413"}, kinds
    assert mixed["rss_mb"]["end"] - mixed["rss_mb"]["start"] < RSS_GROWTH_MB, mixed["rss_mb"]
    # 12 clients, at most 4 in the model's batch and 2 waiting: the rest are refused, never a 500 or a timeout.
    photo = overload["statuses_by_kind"]["photo"]
    assert set(photo) == {"200", "503"} and photo["200"] > 0, photo
    assert overload["server_errors_5xx_other_than_503"] == 0 and overload["transport_errors"] == 0, overload
    assert overload["retry_after_missing"] == 0, overload
