"""The torch-free install: the decoder's init_state / step exported to ONNX (matching torch's step on real photos),
the shipped model's graphs (captioner/weights/onnx/, up to date, same captions as torch), and `captioner caption`
in a process where importing torch fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.api import default_checkpoint_path, load_captioner
from captioner.checkpoint import load_checkpoint
from captioner.engine import DECODER_TOLERANCE, export_bundle, export_decoder
from captioner.inference import BundleError, load_bundle, shipped_bundle_path
from captioner.inference.captioner import file_sha256
from captioner.inference.onnx_decoder import OnnxDecoder
from captioner.options import recommended_options

REPO = Path(__file__).resolve().parents[1]


def _val_photos(coco_mini: Path, n: int) -> list[Path]:
    return sorted((coco_mini / "val").glob("*.jpg"))[:n]


@pytest.fixture(scope="module")
def shipped():
    return load_captioner(default_checkpoint_path({}), engine="torch")  # eager fp32: the reference


@pytest.mark.parametrize("rows_per_photo", [1, 2])
def test_onnx_step_matches_torch_step_on_real_photos(shipped, coco_mini, tmp_path, rows_per_photo):
    """fp32 graphs against AttentionDecoder.init_state / step, 8 steps on the torch model's own words, 3 photos
    with one row each (greedy) and two (as beam 2 runs them): logits, alpha, beta, h and c within
    DECODER_TOLERANCE of torch, relative to each output's largest value. The shipped kind's step is exported
    regrouped (captioner.engine._SoftLstmStepGraph), so this checks the regrouping too."""
    decoder = shipped.decoder
    features = shipped.encode([shipped.open(p) for p in _val_photos(coco_mini, 3)])  # (3, 196, 1280)
    export_decoder(decoder, tmp_path / "init.onnx", tmp_path / "step.onnx", features.size(1))
    graphs = OnnxDecoder(tmp_path / "init.onnx", tmp_path / "step.onnx")
    rows = torch.arange(3).repeat_interleave(rows_per_photo)
    with torch.no_grad():
        state = decoder.init_state(features).select(rows)
        array_state = graphs.init_state(features.numpy()).select(rows.numpy())
        tokens = torch.full((len(rows),), shipped.vocab.start_id)
        for _ in range(8):
            logits, alpha, state = decoder.step(state, tokens)
            got_logits, got_alpha, array_state = graphs.step(array_state, tokens.numpy())
            for expected, got in [(logits, got_logits), (alpha, got_alpha), (state.beta, array_state.beta),
                                  (state.h, array_state.h), (state.c, array_state.c)]:
                assert got.shape == tuple(expected.shape)
                diff = np.abs(got - expected.numpy()).max() / expected.abs().max().item()
                assert diff < DECODER_TOLERANCE, diff
            tokens = logits.argmax(1)
            if rows_per_photo == 2:
                tokens[1::2] = logits[1::2].topk(2).indices[:, 1]  # a photo's second row: its second-best word


def test_both_engines_caption_12_photos_alike(shipped, coco_mini, tmp_path):
    """torch against ONNX Runtime with the recommended decoding (beam 2, no repeated bigram), and greedy. The fp32
    graphs give torch's captions and log p. The shipped int8 graphs may turn a near-tie the other way, and which
    ones can depend on the CPU (they did with the signed weights shipped before: ONNX Runtime's U8S8 kernels
    saturate without AVX-512 VNNI). On coco-3k val 13 of 300 captions differ, within 0.01 CIDEr
    (docs/performance.md), so they must give torch's caption on at least 9 of the 12 photos, with log p within
    0.01 per word wherever the caption is the same."""
    photos = _val_photos(coco_mini, 12)
    expected = shipped.caption(photos)
    export_bundle(default_checkpoint_path({}), tmp_path / "fp32", quantize=False)
    for bundle in (load_bundle(tmp_path / "fp32"), load_bundle()):
        got = bundle.caption(photos)
        same = [g.caption == e.caption for g, e in zip(got, expected, strict=True)]
        if bundle.quantized:
            assert sum(same) >= 9, ([r.caption for r in got], [r.caption for r in expected])
        else:
            assert [r.caption for r in got] == [r.caption for r in expected], bundle.folder
        tolerance = 0.01 if bundle.quantized else 1e-4  # fp32: the same to float rounding
        for g, e, is_same in zip(got, expected, same, strict=True):
            got_shape, expected_shape = g.candidates[0].alphas.shape, tuple(e.candidates[0].alphas.shape)  # (T, L)
            assert got_shape[1] == expected_shape[1]
            if is_same:
                assert got_shape == expected_shape
                assert abs(g.candidates[0].mean_log_prob - e.candidates[0].mean_log_prob) < tolerance
    greedy = recommended_options(method="greedy", no_repeat_ngram_size=0)
    assert [r.caption for r in load_bundle(tmp_path / "fp32").caption(photos[:4], greedy)] == \
        [r.caption for r in shipped.caption(photos[:4], greedy)]


def test_shipped_graphs_are_those_of_the_shipped_model():
    """Rebuild with `python scripts/export_onnx_bundle.py` when the shipped checkpoint changes."""
    manifest = json.loads((shipped_bundle_path() / "manifest.json").read_text())
    assert manifest["checkpoint_sha256"] == file_sha256(default_checkpoint_path({}))
    checkpoint = load_checkpoint(default_checkpoint_path({}))
    assert manifest["vocab"] == checkpoint.vocab.itos
    assert manifest["preprocessing"] == json.loads(json.dumps(checkpoint.preprocessing.to_json()))
    assert sum((shipped_bundle_path() / f).stat().st_size for f in manifest["sha256"]) < 30e6  # the repo stays small


def test_a_damaged_bundle_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(shipped_bundle_path(), folder)
    step = folder / "decoder0-step.onnx"
    step.write_bytes(step.read_bytes()[:1000])
    with pytest.raises(BundleError, match="decoder0-step.onnx: damaged"):
        load_bundle(folder)
    with pytest.raises(BundleError, match="no exported graphs"):
        load_bundle(tmp_path)


BLOCK_TORCH = '''
import sys

class BlockTorch:
    """Any `import torch` fails, as in an install without it."""
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, BlockTorch())
'''


def test_captioner_caption_runs_without_torch(coco_mini, tmp_path):
    """The `captioner` entry point in a process that cannot import torch: `caption` works from the shipped graphs
    (same caption as in-process), everything else says which install it needs."""
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("CAPTIONER_BUNDLE", None)
    photo = _val_photos(coco_mini, 1)[0]
    script = textwrap.dedent(f"""
        import sys
        from captioner.inference.cli import main
        code = main(["caption", {str(photo)!r}, "--json"])
        assert "torch" not in sys.modules and "captioner.api" not in sys.modules, "torch was imported"
        sys.exit(code)
    """)
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    line = json.loads(run.stdout)
    assert line["image"] == str(photo)
    assert line["caption"] == load_bundle().caption(photo).caption
    assert "import torch" not in run.stderr

    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0  # the blocker works
    train = subprocess.run([sys.executable, "-c", "import sys; from captioner.inference.cli import main; "
                            "sys.exit(main(['train']))"], env=env, capture_output=True, text=True, timeout=60)
    assert train.returncode == 2
    assert train.stderr.strip().splitlines() == [
        'captioner train: needs PyTorch, which this install leaves out: pip install "captioner[train]"']


MODULES_AT_EXIT = '''
import atexit, json, os, sys

@atexit.register
def _record():  # what the process had imported, for the test to read once it has stopped
    with open(os.environ["RECORD_MODULES"], "w") as f:
        json.dump(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "captioner")), f)
'''


def _torch_blocked_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH + MODULES_AT_EXIT)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1",
           "RECORD_MODULES": str(tmp_path / "modules.json")}
    for name in ("CAPTIONER_BUNDLE", "CAPTIONER_CHECKPOINT", "CAPTIONER_ENGINE"):
        env.pop(name, None)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_captioner_serve_runs_without_torch(coco_mini, tmp_path):
    """`captioner serve` in a process that cannot import torch: a real uvicorn on 127.0.0.1 serves the shipped
    model's graphs (engine "slim"); a real photo gets the in-process caption, with attention maps; the process never
    loaded torch or the torch side (captioner.api)."""
    import signal

    import httpx

    env = _torch_blocked_env(tmp_path)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", "import sys; from captioner.inference.cli import main; "
                               f"sys.exit(main(['serve', '--port', '{port}', '--log-level', 'warning']))"],
                              env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    photo = _val_photos(coco_mini, 2)[1]
    try:
        url = f"http://127.0.0.1:{port}"
        ready = _wait_until_ready(url, server)
        response = httpx.post(f"{url}/v1/captions", params={"attention": True}, timeout=60,
                              files={"image": (photo.name, photo.read_bytes(), "image/jpeg")})
    finally:
        server.send_signal(signal.SIGINT)  # uvicorn's graceful stop: the atexit record gets written
        _, stderr = server.communicate(timeout=60)
    assert ready["model"]["engine"] == "slim" and ready["model"]["encoder"] == "efficientnet-lite0"
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["caption"] == load_bundle().caption(photo).caption
    attention = body["attention"]
    assert len(attention["tokens"]) == len(attention["alphas"]) == len(attention["betas"]) and attention["tokens"]
    assert all(abs(np.sum(a) - 1.0) < 1e-3 for a in attention["alphas"])
    modules = json.loads((tmp_path / "modules.json").read_text())
    assert "captioner.inference" in modules and not [m for m in modules if m.startswith("torch")], modules
    assert "captioner.api" not in modules, modules
    assert "Traceback" not in stderr, stderr


def _wait_until_ready(url: str, server: subprocess.Popen) -> dict:
    import time

    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode}: {server.stderr.read()}")
        try:
            ready = httpx.get(f"{url}/readyz", timeout=2)
            if ready.status_code == 200:
                return ready.json()
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the torch-free server was not ready within 120 s")


def test_captioner_visualize_runs_without_torch(coco_mini, tmp_path):
    """`captioner visualize` with torch blocked: a PNG figure and its JSON (the in-process caption, one attention
    map per word), and a clear refusal to serve a checkpoint without torch."""
    env = _torch_blocked_env(tmp_path)
    photo = _val_photos(coco_mini, 1)[0]
    figure = tmp_path / "figure.png"
    run = subprocess.run([sys.executable, "-c", "import sys; from captioner.inference.cli import main; "
                          f"sys.exit(main(['visualize', {str(photo)!r}, '-o', {str(figure)!r}, '--json']))"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    from PIL import Image

    with Image.open(figure) as png:
        assert png.format == "PNG" and png.width > 400
    payload = json.loads(figure.with_suffix(".json").read_text())
    expected = load_bundle().caption(photo)
    assert payload["caption"] == expected.caption
    assert len(payload["alphas"]) == len(payload["tokens"]) == len(expected.candidates[0].words)
    assert not [m for m in json.loads((tmp_path / "modules.json").read_text()) if m.startswith("torch")]

    refused = subprocess.run([sys.executable, "-c", "import sys; from captioner.inference.cli import main; "
                              "sys.exit(main(['serve']))"], env={**env, "CAPTIONER_CHECKPOINT": str(tmp_path / "x.pt")},
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"captioner serve: error: the checkpoint {tmp_path / 'x.pt'} needs PyTorch, which this install leaves out: "
        'pip install "captioner[train]" (or serve the shipped model\'s exported graphs: leave CAPTIONER_CHECKPOINT '
        'unset)']
