"""Small builders for tests: subsets of the real COCO files, corrupt copies, a real server, system parts."""

from __future__ import annotations

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
import uvicorn

from service.app import create_app
from service.settings import Settings


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
