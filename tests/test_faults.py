"""Faults in the middle of work: the service SIGKILLed mid-request and restarted; training SIGKILLed at random
steps and in the middle of writing last.pt, then resumed on the same trajectory; a full disk and a read-only
output folder; a damaged feature cache."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from captioner import train
from captioner.checkpoint import atomic_torch_save, load_checkpoint
from captioner.coco import load_coco_captions
from captioner.encoder import Encoder
from captioner.features import build_feature_store, cache_damage, cache_folder
from tests.helpers import metrics_rows, train_args, train_argv
from tests.test_soak import soak  # benchmarks/soak_service.py: its server runner

REPO = Path(__file__).resolve().parent.parent
PHOTO = "val/000000000790.jpg"




# --------------------------------------------------------------------------------------------------------------
# The service.


def test_service_killed_mid_request_comes_back_healthy(shipped_checkpoint, coco_mini):
    photo = (coco_mini / PHOTO).read_bytes()
    port = soak.free_port()
    env = soak.server_env(shipped_checkpoint, max_queue=64, CAPTIONER_MAX_LENGTH="12")
    outcomes: Counter = Counter()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            while not stop.is_set():
                try:
                    response = http.post("/v1/captions", files={"image": ("p.jpg", photo, "image/jpeg")})
                    outcomes[response.status_code] += 1
                except httpx.TransportError as exc:  # the server died under it: an error, never a hang
                    outcomes[type(exc).__name__] += 1
                    time.sleep(0.05)

    with soak.uvicorn_server(env, port) as (process, url):
        before = httpx.post(f"{url}/v1/captions", files={"image": ("p.jpg", photo, "image/jpeg")}, timeout=60).json()
        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        while outcomes[200] < 4:  # requests are flowing: several are in flight when it dies
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=10) == -signal.SIGKILL
        time.sleep(1.0)
        stop.set()
        for thread in clients:
            thread.join(timeout=40)
            assert not thread.is_alive(), "a client hung on a dead server"
    print("\nclients' outcomes around the kill:", dict(outcomes))
    assert set(outcomes) - {200} and all(k == 200 or isinstance(k, str) for k in outcomes), outcomes
    with soak.uvicorn_server(env, port) as (_, url):  # same port: a restarted service
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
        after = httpx.post(f"{url}/v1/captions", files={"image": ("p.jpg", photo, "image/jpeg")}, timeout=60)
        assert after.status_code == 200 and after.json()["caption"] == before["caption"]


# --------------------------------------------------------------------------------------------------------------
# Training.

# Run in a subprocess that SIGKILLs itself: after optimizer step `kill_step` (0: never), or in the middle of its
# `kill_write`-th write of last.pt (0: never), with half of the new file's bytes in the temporary file.
KILLED_RUN = r"""
import json, os, signal, sys
from contextlib import contextmanager
from pathlib import Path
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from captioner import checkpoint, train

argv, kill_step, kill_write = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
steps, writes = 0, 0

def after_step(*_):
    global steps
    steps += 1
    if steps == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)

real_atomic_path = checkpoint.atomic_path

@contextmanager
def dying_atomic_path(path, suffix=".tmp"):
    global writes
    with real_atomic_path(path, suffix) as tmp:
        yield tmp
        if Path(path).name == "last.pt":
            writes += 1
            if writes == kill_write:
                os.truncate(tmp, tmp.stat().st_size // 2)
                os.kill(os.getpid(), signal.SIGKILL)

register_optimizer_step_post_hook(after_step)
checkpoint.atomic_path = dying_atomic_path
train.main(train.get_args_parser().parse_args(argv))
"""


def killed_run(argv: list[str], kill_step: int = 0, kill_write: int = 0) -> None:
    result = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(argv), str(kill_step), str(kill_write)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


def assert_no_corrupt_last(out: Path) -> None:
    """last.pt is absent (killed before its first write) or a whole checkpoint that loads."""
    if (out / "last.pt").exists():
        assert load_checkpoint(out / "last.pt").training is not None


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_training_killed_anywhere_resumes_on_the_same_trajectory(tmp_path, coco_mini):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    steps = []
    handle = register_optimizer_step_post_hook(lambda *_: steps.append(1))
    try:
        train.main(train_args(tmp_path, coco_mini, straight, epochs=3))
    finally:
        handle.remove()
    total = len(steps)
    argv = train_argv(tmp_path / "data", killed, tmp_path / "cache", 3, dropout=0.3, patience=100)

    rng = random.Random(29)  # a random step, then a random write of last.pt, the same in every run of the test
    first_kill = rng.randint(total // 3 + 1, total - 1)  # after epoch 1: there is a last.pt to resume from
    killed_run(argv, kill_step=first_kill)
    assert_no_corrupt_last(killed)
    epoch_before = load_checkpoint(killed / "last.pt").training["epoch"]
    killed_run([*argv, "--resume"], kill_write=1)  # dies writing the next epoch's last.pt
    assert_no_corrupt_last(killed)
    assert load_checkpoint(killed / "last.pt").training["epoch"] == epoch_before  # the old file, whole
    assert list(killed.glob(".last.pt.*")), "the half-written temporary file should be what the kill left"
    train.main(train.get_args_parser().parse_args([*argv, "--resume"]))

    assert without_seconds(metrics_rows(killed)) == without_seconds(metrics_rows(straight))
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(killed / "last.pt")
    for (name, x), (_, y) in zip(a.decoder.state_dict().items(), b.decoder.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


@pytest.fixture
def tiny_disk(tmp_path) -> Iterator[callable]:
    """mount(size_kb, read_only) -> a folder on a tmpfs of that size (needs root, as in CI's container)."""
    mounts: list[Path] = []

    def mount(size_kb: int, read_only: bool = False) -> Path:
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        options = f"size={size_kb}k" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            pytest.skip(f"a full disk is simulated with a tiny tmpfs, which needs root: {result.stderr.strip()}")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)  # lazy: training's log may still be open


def test_full_disk_leaves_the_previous_checkpoint_whole(tiny_disk):
    disk = tiny_disk(256)
    atomic_torch_save({"w": torch.ones(1000)}, disk / "last.pt")
    with pytest.raises(OSError, match=r"cannot write .*last\.pt: No space left on device"):
        atomic_torch_save({"w": torch.zeros(200_000)}, disk / "last.pt")  # 800 kB on a 256 kB disk
    assert torch.equal(torch.load(disk / "last.pt", weights_only=True)["w"], torch.ones(1000))
    assert [p.name for p in disk.iterdir()] == ["last.pt"]  # no half-written temporary file


@pytest.mark.parametrize("read_only", [False, True], ids=["full-disk", "read-only"])
def test_training_on_a_full_or_read_only_disk_says_so_in_one_line(tmp_path, coco_mini, tiny_disk, read_only):
    disk = tiny_disk(48, read_only)
    out = disk / "run"
    with pytest.raises(SystemExit) as stopped:
        train.main(train_args(tmp_path, coco_mini, out, epochs=2))
    message = str(stopped.value)
    print("\n" + message)
    # The run's log file is let go with the run: a handler left on the "captioner" logger would make every later
    # log message of this process (a service started next) fail once the disk is gone.
    assert not [h for h in logging.getLogger("captioner").handlers if isinstance(h, logging.FileHandler)]
    assert message.startswith("captioner train: error: ") and "\n" not in message, message
    assert ("Read-only file system" if read_only else "No space left on device") in message
    if not read_only:
        assert_no_corrupt_last(out)
        assert not list(out.glob(".*.tmp")), "a temporary file was left behind"


# --------------------------------------------------------------------------------------------------------------
# The feature cache.


def test_damaged_feature_cache_is_detected_and_rebuilt(tmp_path, coco_mini, caplog):
    records = load_coco_captions(coco_mini / "annotations" / "captions_val.json", coco_mini / "val")[:3]
    torch.manual_seed(0)
    encoder = Encoder("efficientnet-lite0", pretrained=False, image_size=64).eval()
    store = build_feature_store(records, encoder, tmp_path, progress=False, engine="torch")
    expected = {r.image_id: store.get(r.image_id) for r in records}
    folder = cache_folder(tmp_path, encoder, records)
    assert cache_damage(folder, [r.image_id for r in records]) is None
    pristine = tmp_path / "pristine"
    shutil.copytree(folder, pristine)

    def truncate_features(f: Path) -> None:
        os.truncate(f / "features.npy", (f / "features.npy").stat().st_size - 100)

    damages = {
        "truncated features": truncate_features,
        "index not JSON": lambda f: (f / "index.json").write_text('{"encoder": "efficientnet-lite0", "grid'),
        "status overwritten": lambda f: np.save(f / "status.npy", np.full(7, 9, dtype=np.int64)),
        "features of another shape": lambda f: np.save(f / "features.npy", np.zeros((3, 2, 2), np.float16)),
        "status file gone": lambda f: (f / "status.npy").unlink(),
    }
    for name, damage in damages.items():
        shutil.rmtree(folder)
        shutil.copytree(pristine, folder)
        damage(folder)
        assert cache_damage(folder, [r.image_id for r in records]) is not None, name
        caplog.clear()
        store = build_feature_store(records, encoder, tmp_path, progress=False, engine="torch")
        assert "is damaged" in caplog.text, name
        for image_id, features in expected.items():
            assert torch.equal(store.get(image_id), features), name
        assert cache_damage(folder, [r.image_id for r in records]) is None, name
