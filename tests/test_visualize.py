"""Attention visualisation: the maths, the figure / GIF / PDF / JSON writers and `captioner visualize`, on real
COCO photos through the real efficientnet-lite0 encoder (untrained decoder: gibberish words, real shapes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.api import load_captioner
from captioner.cli import main
from captioner.images import open_image
from captioner.inference.visualize import (
    attention_grids,
    attention_overlays,
    attention_payload,
    normalize_heat,
    plan_outputs,
    render_figure,
    save_visualization,
    upsample_attention,
    word_axes,
)


@pytest.fixture(scope="module")
def captioner(lite0_checkpoint):
    return load_captioner(lite0_checkpoint)


@pytest.fixture(scope="module")
def photo_path(coco_mini) -> Path:
    return sorted((coco_mini / "val").glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def photo(photo_path) -> Image.Image:
    return open_image(photo_path)


@pytest.fixture(scope="module")
def result(captioner, photo):
    return captioner.caption([photo], method="greedy", max_length=8)[0]


def test_grids_are_distributions_over_the_feature_grid(result):
    best = result.candidates[0]
    grids = attention_grids(best.alphas, result.grid)  # before any upsampling
    assert grids.shape == (len(best.words), *result.grid)
    np.testing.assert_allclose(grids.reshape(len(grids), -1).sum(axis=1), 1.0, atol=1e-5)
    assert (grids >= 0).all()
    with pytest.raises(ValueError, match="grid"):
        attention_grids(best.alphas, (result.grid[0], result.grid[1] + 1))


def test_upsampled_map_is_image_sized_and_smooth(result):
    grid_map = attention_grids(result.candidates[0].alphas, result.grid)[0]
    heat = upsample_attention(grid_map, (640, 422))  # size is (W, H)
    assert heat.shape == (422, 640) and heat.dtype == np.float32
    # Smooth, not blocky: far more distinct values than grid cells, and no jumps between neighbouring pixels
    # (a nearest-neighbour upsampling would jump by whole cell differences at every cell border).
    assert len(np.unique(heat)) > 20 * grid_map.size
    cell_jump = max(np.abs(np.diff(grid_map, axis=0)).max(), np.abs(np.diff(grid_map, axis=1)).max())
    pixel_jump = max(np.abs(np.diff(heat, axis=0)).max(), np.abs(np.diff(heat, axis=1)).max())
    assert pixel_jump < cell_jump / 10
    shown = normalize_heat(heat)
    assert shown.max() == pytest.approx(1.0) and shown.min() >= 0


@pytest.mark.parametrize("grid,size", [((14, 14), (640, 422)), ((14, 14), (427, 640)), ((7, 9), (5, 3)),
                                       ((14, 14), (14, 14)), ((2, 3), (17, 1000)), ((14, 14), (1, 1))])
def test_upsampling_is_pytorchs_bilinear_without_torch(result, grid, size):
    """The numpy upsampling (the torch-free install draws with it) gives torch's interpolate(bilinear,
    align_corners=False) numbers: enlarging, shrinking, odd grids, one pixel."""
    import torch
    import torch.nn.functional as F

    h, w = grid
    real = attention_grids(result.candidates[0].alphas, result.grid)[0]
    grid_map = real if grid == result.grid else np.random.default_rng(h * w).random(grid).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(grid_map)[None, None], size=(size[1], size[0]), mode="bilinear",
                             align_corners=False)[0, 0].clamp(min=0).numpy()
    np.testing.assert_allclose(upsample_attention(grid_map, size), expected, rtol=0, atol=2e-6)


def test_non_square_image_keeps_its_aspect_ratio(captioner, photo):
    wide = photo.resize((640, 320))  # 2:1, unlike any COCO photo
    res = captioner.caption([wide], max_length=4)[0]
    best = res.candidates[0]
    overlays = attention_overlays(wide, best.alphas, res.grid)
    assert [o.shape for o in overlays] == [(320, 640, 3)] * len(best.words)
    fig = render_figure(wide, best.words, best.alphas, best.betas, res.grid, caption=best.caption)
    for ax in fig.axes:
        left, right, bottom, top = ax.get_images()[0].get_extent()
        assert (right - left) / (bottom - top) == pytest.approx(2.0)
        assert ax.get_aspect() == 1.0  # pixels stay square on the page


def test_one_panel_per_word_end_included(captioner, photo):
    # Beam search with a long caption: panels wrap over several rows.
    res = captioner.caption([photo], method="beam", beam_size=2, max_length=12)[0]
    best = res.candidates[0]
    assert best.words[-1] == "<end>"
    fig = render_figure(photo, best.words, best.alphas, best.betas, res.grid, caption=best.caption, columns=4)
    panels = word_axes(fig)
    assert len(panels) == len(best.words)
    assert fig.axes[0].get_label() == "image" and len(fig.axes) == len(best.words) + 1
    for ax, word, beta in zip(panels, best.words, best.betas.tolist(), strict=True):
        assert ax.get_title() == f"{word}\nβ = {beta:.2f}"
    rows = {round(ax.get_position().y0, 3) for ax in fig.axes}
    assert len(rows) == -(-(len(best.words) + 1) // 4)


@pytest.mark.parametrize("suffix", ["png", "pdf", "gif"])
def test_files_are_written_and_decode(tmp_path, photo, result, suffix):
    best = result.candidates[0]
    path = save_visualization(tmp_path / f"fig.{suffix}", photo, best.words, best.alphas, best.betas, result.grid,
                              caption=best.caption, dpi=40)
    data = path.read_bytes()
    if suffix == "pdf":
        assert data.startswith(b"%PDF")
        return
    with Image.open(path) as im:
        im.load()
        assert im.format == suffix.upper()
        if suffix == "gif":
            assert im.n_frames == len(best.words)
            assert im.info["duration"] > 0 and im.info["loop"] == 0
            # Longer side shrunk to 480, aspect kept, plus a text strip under the photo.
            photo_height = 480 * photo.height / photo.width
            assert im.width == 480 and photo_height < im.height < photo_height + 60


def test_unknown_extension_is_refused(tmp_path, photo, result):
    best = result.candidates[0]
    with pytest.raises(ValueError, match="unsupported output format"):
        save_visualization(tmp_path / "fig.jpg", photo, best.words, best.alphas, best.betas, result.grid)


def test_payload_is_json_ready(result):
    best = result.candidates[0]
    payload = json.loads(json.dumps(attention_payload(best.words, best.alphas, best.betas, result.grid)))
    assert payload["tokens"] == best.words
    assert (payload["grid"]["height"], payload["grid"]["width"]) == result.grid
    assert np.asarray(payload["alphas"]).shape == (len(best.words), *result.grid)
    assert len(payload["betas"]) == len(best.words)


def test_plan_outputs():
    a, b = Path("x/a.jpg"), Path("y/b.png")
    assert plan_outputs([a], None) == [Path("a-attention.png")]
    assert plan_outputs([a], "fig.gif") == [Path("fig.gif")]
    assert plan_outputs([a], "fig") == [Path("fig.png")]
    assert plan_outputs([a], "figs/") == [Path("figs/a.png")]
    assert plan_outputs([a, b], "figs", "pdf") == [Path("figs/a.pdf"), Path("figs/b.pdf")]
    assert plan_outputs([a, Path("z/a.jpg")], "figs") == [Path("figs/a.png"), Path("figs/a-2.png")]
    names = [Path("a"), Path("z/a")]  # found in folders: output_names keeps the subfolder
    assert plan_outputs([a, Path("z/a.jpg")], "figs", names=names) == [Path("figs/a.png"), Path("figs/z/a.png")]
    assert plan_outputs([Path("z/a.jpg")], None, names=names[1:]) == [Path("z/a-attention.png")]
    with pytest.raises(ValueError, match="folder"):
        plan_outputs([a, b], "fig.png")
    with pytest.raises(ValueError, match="unsupported"):
        plan_outputs([a], "fig.jpg")


def test_cli_bad_path_is_reported_and_good_images_still_rendered(tmp_path, lite0_checkpoint, photo_path, capsys):
    missing = tmp_path / "no-such-photo.jpg"
    out = tmp_path / "figs"
    code = main(["visualize", str(photo_path), str(missing), "-o", f"{out}/", "--checkpoint", str(lite0_checkpoint),
                 "--json", "--method", "beam", "--beam-size", "2", "--max-length", "6", "--dpi", "40"])
    captured = capsys.readouterr()
    assert code != 0
    assert str(missing) in captured.err and "no such file" in captured.err
    figure = out / f"{photo_path.stem}.png"
    with Image.open(figure) as im:
        im.verify()
    assert str(figure) in captured.out
    data = json.loads((out / f"{photo_path.stem}.json").read_text())
    assert set(data) == {"image", "caption", "tokens", "alphas", "betas", "grid"}
    alphas = np.asarray(data["alphas"])
    grid = (data["grid"]["height"], data["grid"]["width"])
    assert alphas.shape == (len(data["tokens"]), *grid) and len(data["betas"]) == len(data["tokens"])
    np.testing.assert_allclose(alphas.sum(axis=(1, 2)), 1.0, atol=1e-3)
    assert data["tokens"][-1] == "<end>" and data["caption"] in captured.out


def test_cli_sampling_gif(tmp_path, lite0_checkpoint, photo_path, captioner, capsys, monkeypatch):
    # The real loading path is covered above; reuse the loaded model to keep the suite fast.
    monkeypatch.setattr("captioner.api.load_captioner", lambda *args, **kwargs: captioner)
    gif = tmp_path / "steps.gif"
    code = main(["visualize", str(photo_path), "-o", str(gif), "--checkpoint", str(lite0_checkpoint),
                 "--method", "sample", "--seed", "1", "--max-length", "5"])
    assert code == 0
    with Image.open(gif) as im:
        assert 2 <= im.n_frames <= 6
    assert str(gif) in capsys.readouterr().out


def test_cli_bad_output_is_a_clean_error(tmp_path, lite0_checkpoint, photo_path, capsys):
    code = main(["visualize", str(photo_path), "-o", str(tmp_path / "fig.jpg"), "--checkpoint", str(lite0_checkpoint)])
    assert code == 2 and "unsupported output format" in capsys.readouterr().err
