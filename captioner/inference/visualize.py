"""Where the model looked, word by word: attention heat maps, paper-style figures, GIFs and JSON.

Attention maps are drawn one way, here and on the service's web page (service/static/app.js):
- the payload (`attention_payload`, also the service's `attention` field): tokens, alphas T x h x w (row-major
  over the feature grid), betas, grid {"height": h, "width": w};
- upsampling (`upsample_attention`): bilinear with half-pixel centres (PyTorch's align_corners=False), onto the
  whole displayed photo (the encoder squashed the whole photo to a square, so the grid covers all of it), then
  scaled by the map's own peak (`normalize_heat`);
- colour (`attention_style()`): the `attention_colours()` lookup table (matplotlib's jet, 256 RGB entries) blended
  over the photo at 50% opacity. The page fetches this table and the opacity from the service
  (/attention-style.json) and upsamples the same way in JavaScript.

The maths lives in small pure functions on numpy arrays; the figure / GIF / JSON writers and `captioner visualize`
sit on top. Nothing here imports torch (it is part of the torch-free install, see captioner/inference/): the torch
engine's tensors are taken as they come, through `np.asarray`.

Shape legend: T generated words (END included, START excluded), L = h * w attention locations, (h, w) the
feature grid; a photo's size is (height, width) in pixels. Sizes passed to PIL are (width, height), arrays are
(height, width).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike  # numpy arrays (the slim engine), torch tensors, lists
from PIL import Image, ImageDraw, ImageFont

from ..images import ImageError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .captioner import CaptionResult

FORMATS = ("png", "pdf", "gif")
DEFAULT_COLUMNS = 5
DEFAULT_CMAP = "jet"
DEFAULT_OPACITY = 0.5  # share of the heat-map colour in the blend: the photo must stay recognisable
COLOUR_LEVELS = 256  # entries of the colour lookup table
FIGURE_MAX_SIDE = 640  # px the photo is shown at in figures (COCO photos are <= 640 anyway)
GIF_MAX_SIDE = 480
GIF_FRAME_MS = 700


# --------------------------------------------------------------------------------------------------------------
# The maths: pure functions on arrays (shared with the service).


def attention_grids(alphas: ArrayLike, grid: tuple[int, int]) -> np.ndarray:
    """alphas (T, L) -> (T, h, w) float32. L is row-major over the grid, like the encoder's flatten."""
    a = _numpy(alphas)
    h, w = grid
    if a.ndim != 2 or a.shape[1] != h * w:
        raise ValueError(f"alphas of shape {tuple(a.shape)} do not fit a {h}x{w} grid (expected (T, {h * w}))")
    return a.astype(np.float32).reshape(-1, h, w)


def upsample_attention(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One map (h, w) -> (height, width) float32 for size = (width, height), bilinear with half-pixel centres
    (smooth, not blocky), clipped at 0. static/app.js `upsample` computes the same numbers for the page.

    The whole image is squashed to the encoder's square input, so the grid covers the whole image: stretching it
    to the image's own W x H puts every cell back where it came from, whatever the aspect ratio.
    """
    width, height = size
    grid_map = np.asarray(grid_map, dtype=np.float32)
    rows = _bilinear_weights(grid_map.shape[0], height)  # (height, h)
    columns = _bilinear_weights(grid_map.shape[1], width)  # (width, w)
    return np.maximum(rows @ grid_map @ columns.T, 0.0).astype(np.float32)


def _bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation matrix with half-pixel centres, as PyTorch's interpolate(mode="bilinear",
    align_corners=False): output i samples the input at (i + 0.5) * n_in / n_out - 0.5, clamped to the edges."""
    source = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * np.float32(n_in / n_out)
                        - np.float32(0.5), 0.0)
    lower = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
    upper = np.minimum(lower + 1, n_in - 1)
    frac = (source - lower).astype(np.float32)
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    np.add.at(weights, (np.arange(n_out), lower), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), upper), frac)
    return weights


def normalize_heat(heat: np.ndarray) -> np.ndarray:
    """Scale a map to [0, 1] by its own maximum. Not min-max: a diffuse map then stays diffuse on screen
    instead of its small differences being stretched into hot spots the model never had."""
    peak = float(heat.max()) if heat.size else 0.0
    return heat / peak if peak > 0 else np.zeros_like(heat)


def attention_colours(cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """The colour ramp as a lookup table: (256, 3) uint8, entry i for heat in [i / 256, (i + 1) / 256)."""
    return _colour_table(cmap).copy()


@cache
def _colour_table(cmap: str) -> np.ndarray:
    import matplotlib  # here, not at import: the service imports this module and needs matplotlib only once

    table = matplotlib.colormaps[cmap].resampled(COLOUR_LEVELS)(np.arange(COLOUR_LEVELS))[:, :3]
    return (table * 255).round().astype(np.uint8)


def colour_index(heat: np.ndarray) -> np.ndarray:
    """Heat in [0, 1] -> lookup-table entries 0..255 (as matplotlib indexes a colormap: floor(heat * 256),
    1.0 -> the last entry)."""
    return np.minimum((np.clip(heat, 0.0, 1.0) * COLOUR_LEVELS).astype(np.int64), COLOUR_LEVELS - 1)


def attention_style(cmap: str = DEFAULT_CMAP, opacity: float = DEFAULT_OPACITY) -> dict:
    """What the web page needs to colour a map exactly as the figures do (JSON-ready)."""
    return {"colours": attention_colours(cmap).tolist(), "opacity": opacity}


def overlay(image: Image.Image | np.ndarray, heat: np.ndarray, cmap: str = DEFAULT_CMAP,
            opacity: float = DEFAULT_OPACITY) -> np.ndarray:
    """RGB image (height, width, 3) + heat (height, width) in [0, 1] -> blended RGB uint8 (height, width, 3)."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if rgb.shape[:2] != heat.shape:
        raise ValueError(f"heat map {heat.shape} does not match the image {rgb.shape[:2]}")
    colours = attention_colours(cmap)[colour_index(heat)].astype(np.float32)
    return (rgb * (1.0 - opacity) + colours * opacity).round().astype(np.uint8)


def attention_overlays(image: Image.Image, alphas: ArrayLike, grid: tuple[int, int],
                       cmap: str = DEFAULT_CMAP, opacity: float = DEFAULT_OPACITY) -> list[np.ndarray]:
    """One blended RGB array (height, width, 3) per generated word, at the image's own size."""
    return [
        overlay(image, normalize_heat(upsample_attention(g, image.size)), cmap, opacity)
        for g in attention_grids(alphas, grid)
    ]


def attention_payload(words: Sequence[str], alphas: ArrayLike, betas: ArrayLike,
                      grid: tuple[int, int], decimals: int = 5) -> dict:
    """JSON-ready weights: {"tokens", "alphas" (T x h x w nested lists), "betas" (T), "grid" {"height", "width"}}.
    What `--json` writes and what the service returns for a web page to draw the overlays itself."""
    grids = attention_grids(alphas, grid)
    if len(words) != len(grids):
        raise ValueError(f"{len(words)} words but {len(grids)} attention maps")
    b = _floats(betas)
    if len(b) != len(grids):
        raise ValueError(f"{len(b)} betas but {len(grids)} attention maps")
    return {
        "tokens": list(words),
        "alphas": np.round(grids.astype(np.float64), decimals).tolist(),
        "betas": [round(float(x), decimals) for x in b],
        "grid": {"height": int(grid[0]), "width": int(grid[1])},
    }


def _floats(values: ArrayLike) -> list[float]:
    """betas (T,) or (T, 1), array, tensor or list -> T Python floats."""
    return [float(v) for v in _numpy(values).astype(np.float64).reshape(-1)]


def _numpy(values: ArrayLike) -> np.ndarray:
    """A numpy array of a numpy array, a list, or a torch tensor (the torch engine's results), without importing
    torch: this module is part of the torch-free install."""
    if hasattr(values, "detach"):  # a torch tensor, perhaps on a GPU or in bfloat16
        values = values.detach().float().cpu().numpy()
    return np.asarray(values)


def display_image(image: Image.Image, max_side: int) -> Image.Image:
    """Shrink (never enlarge) so the longer side is at most max_side, keeping the aspect ratio."""
    image = image.convert("RGB")
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


# --------------------------------------------------------------------------------------------------------------
# Figures, GIFs, files.


def _text(s: str) -> str:
    return s.replace("$", r"\$")  # a lone "$" would switch matplotlib to mathtext


def render_figure(image: Image.Image, words: Sequence[str], alphas: ArrayLike,
                  betas: ArrayLike, grid: tuple[int, int], caption: str | None = None,
                  columns: int = DEFAULT_COLUMNS, max_side: int = FIGURE_MAX_SIDE, panel_width: float = 2.6,
                  cmap: str = DEFAULT_CMAP) -> Figure:
    """The paper's figure: the photo, then one panel per word (END included) with its attention overlaid and
    the word and gate beta as the title. Panels wrap after `columns`. Axes are labelled "image" and "word-<t>"
    so callers (and tests) can find the word panels."""
    from matplotlib.figure import Figure

    if len(words) == 0:
        raise ValueError("nothing to draw: no generated words")
    if columns < 1:
        raise ValueError("columns must be at least 1")
    shown = display_image(image, max_side)
    overlays = attention_overlays(shown, alphas, grid, cmap)
    b = _floats(betas)
    if not len(words) == len(overlays) == len(b):
        raise ValueError(f"{len(words)} words, {len(overlays)} attention maps and {len(b)} betas")

    panels = len(words) + 1
    ncols = min(columns, panels)
    nrows = math.ceil(panels / ncols)
    panel_height = panel_width * shown.height / shown.width
    title_room = 0.55  # inches per row for the two-line titles
    fig = Figure(figsize=(ncols * panel_width, nrows * (panel_height + title_room) + 0.5), layout="constrained")
    if caption:
        # ~8 characters per inch at 13 pt: long captions wrap instead of running off the figure.
        fig.suptitle(_text(textwrap.fill(caption, max(20, int(ncols * panel_width * 8)))), fontsize=13)
    ax = fig.add_subplot(nrows, ncols, 1, label="image")
    ax.imshow(np.asarray(shown), interpolation="antialiased")
    ax.set_axis_off()
    for t, (word, picture, beta) in enumerate(zip(words, overlays, b, strict=True)):
        ax = fig.add_subplot(nrows, ncols, t + 2, label=f"word-{t}")
        ax.imshow(picture, interpolation="antialiased")  # aspect="equal" (default): never squashed
        ax.set_title(f"{_text(word)}\nβ = {beta:.2f}", fontsize=11, linespacing=1.3)
        ax.set_axis_off()
    return fig


def word_axes(fig: Figure) -> list:
    """The word panels of a figure from render_figure, in caption order."""
    return [ax for ax in fig.axes if ax.get_label().startswith("word-")]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # matplotlib ships DejaVu Sans, which has "β"; PIL's bitmap default font does not.
    import matplotlib

    try:
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except OSError:
        return ImageFont.load_default()


def gif_frames(image: Image.Image, words: Sequence[str], alphas: ArrayLike,
               betas: ArrayLike, grid: tuple[int, int], max_side: int = GIF_MAX_SIDE,
               cmap: str = DEFAULT_CMAP) -> list[Image.Image]:
    """One RGB frame per word: the overlay above a strip reading "word   beta = 0.53   t/T"."""
    shown = display_image(image, max_side)
    overlays = attention_overlays(shown, alphas, grid, cmap)
    b = _floats(betas)
    strip = max(28, shown.height // 9)
    font, small = _font(int(strip * 0.6)), _font(int(strip * 0.45))
    frames = []
    for t, (word, picture, beta) in enumerate(zip(words, overlays, b, strict=True)):
        frame = Image.new("RGB", (shown.width, shown.height + strip), (0, 0, 0))
        frame.paste(Image.fromarray(picture), (0, 0))
        draw = ImageDraw.Draw(frame)
        middle = shown.height + strip // 2
        draw.text((10, middle), word, fill=(255, 255, 255), font=font, anchor="lm")
        # The step counter also keeps frames distinct: PIL merges identical consecutive GIF frames.
        draw.text((shown.width - 10, middle), f"β = {beta:.2f}   {t + 1}/{len(words)}", fill=(200, 200, 200),
                  font=small, anchor="rm")
        frames.append(frame)
    return frames


def save_visualization(path: str | Path, image: Image.Image, words: Sequence[str],
                       alphas: ArrayLike, betas: ArrayLike,
                       grid: tuple[int, int], caption: str | None = None, columns: int = DEFAULT_COLUMNS,
                       dpi: int = 100) -> Path:
    """Write a figure (.png, .pdf) or an animated GIF (.gif, one frame per word), chosen by the extension."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"{path}: unsupported output format {path.suffix or '(none)'!r}: use .png, .pdf or .gif")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "gif":
        # GIF holds 256 colours a frame: an adaptive palette per frame keeps the photo and heat map faithful.
        frames = [f.quantize(256, method=Image.Quantize.FASTOCTREE)
                  for f in gif_frames(image, words, alphas, betas, grid)]
        frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)
    else:
        fig = render_figure(image, words, alphas, betas, grid, caption=caption, columns=columns)
        fig.savefig(path, format=fmt, dpi=dpi)
    return path


# --------------------------------------------------------------------------------------------------------------
# `captioner visualize` (its parsers: captioner/cli.py, and cli.py here in the torch-free install).


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """The figure flags of `captioner visualize`, in both CLIs (captioner/cli.py, captioner/inference/cli.py)."""
    p.add_argument("-o", "--output", default=None,
                   help="file (.png, .pdf, .gif) for one image, or a folder (several images, or ending in /); "
                        "default: <stem>-attention.png here")
    p.add_argument("--format", choices=list(FORMATS), default=None, help="format for folder outputs")
    p.add_argument("--columns", type=int, default=DEFAULT_COLUMNS, help="panels per row")
    p.add_argument("--dpi", type=int, default=100, help="PNG resolution")
    p.add_argument("--batch-size", type=int, default=8, help="images per pass through the model")
    p.add_argument("--json", action="store_true", help="also write tokens, alphas (T x h x w) and betas as JSON")


def plan_outputs(images: Sequence[Path], out: str | None, fmt: str | None = None,
                 names: Sequence[Path] | None = None) -> list[Path]:
    """Where each image's figure goes. `names` (default: the stems) are `imagefiles.output_names`: a photo found
    in a subfolder keeps its subfolder. One image: `out` itself if it names a file, else `<name>-attention.<fmt>`
    (in the current folder, or in `out` when it is a folder). Several images, or `out` ending in "/" or an
    existing folder: `out/<name>.<fmt>`. Raises ValueError on an unusable combination."""
    names = [Path(p.stem) for p in images] if names is None else list(names)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unsupported format {fmt!r}: use one of {', '.join(FORMATS)}")
    if out is None:
        return _unique([name.with_name(f"{name.name}-attention") for name in names], fmt or "png")
    target = Path(out)
    is_folder = out.endswith(("/", "\\")) or target.is_dir() or len(images) > 1
    if not is_folder and target.suffix:
        suffix = target.suffix.lower().lstrip(".")
        if suffix not in FORMATS:
            raise ValueError(f"{out}: unsupported output format {target.suffix!r}: use .png, .pdf or .gif")
        if fmt is not None and fmt != suffix:
            raise ValueError(f"-o {out} and --format {fmt} disagree")
        return [target]
    if is_folder and target.suffix.lower().lstrip(".") in FORMATS and not target.is_dir():
        raise ValueError(f"-o {out} names a file, but {len(images)} images need a folder (e.g. -o figures/)")
    if not is_folder:  # one image, -o without an extension: a file in that format
        return [target.with_name(f"{target.name}.{fmt or 'png'}")]
    return _unique([target / name for name in names], fmt or "png")


def _unique(stems: list[Path], fmt: str) -> list[Path]:
    """Append -2, -3, ... to repeated names (files a/x.jpg and b/x.jpg, given as files, must not overwrite each
    other)."""
    seen: dict[Path, int] = {}
    paths = []
    for stem in stems:
        seen[stem] = seen.get(stem, 0) + 1
        name = stem.name if seen[stem] == 1 else f"{stem.name}-{seen[stem]}"
        paths.append(stem.with_name(f"{name}.{fmt}"))
    return paths


def run(args: argparse.Namespace, load_captioner: Callable[[], Any]) -> int:
    """Caption each image (folders expanded, in batches), write its figure (and JSON), print what was written as
    each batch finishes. Exit 1 if any image failed, 2 on bad arguments; the good images are rendered either way.
    `load_captioner()` gives the model: the torch side's (captioner/cli.py) or the exported graphs' (cli.py here);
    both have the same `caption`."""
    from ..imagefiles import emit, find_images, output_names, progress_bar, read_batches
    from ..options import decoding_options

    images, skipped = find_images(args.images, args.recursive)
    try:
        if not images:
            raise ValueError(f"no images in {' '.join(map(str, args.images))}")
        outputs = plan_outputs(images, args.output, args.format, output_names(args.images, images))
        options = decoding_options(args)
        if args.columns < 1 or args.dpi < 1 or args.batch_size < 1:
            raise ValueError("--columns, --dpi and --batch-size must be at least 1")
    except ValueError as exc:
        print(f"captioner visualize: error: {exc}", file=sys.stderr)
        return 2
    captioner = load_captioner()
    out_path = dict(zip(images, outputs, strict=True))
    failures = 0
    with progress_bar(len(images), args.progress) as bar:
        for item in skipped:
            emit(bar, f"{item.path}: skipped: {item.reason}", sys.stderr)
        for batch in read_batches(images, args.batch_size):
            readable = [(path, image) for path, image in batch if not isinstance(image, Exception)]
            results = captioner.caption([im for _, im in readable], options) if readable else []
            done = dict(zip([path for path, _ in readable], results, strict=True))
            for image_path, image in batch:
                try:
                    if isinstance(image, Exception):
                        raise image
                    written = _write_outputs(image_path, image, done[image_path], out_path[image_path], args)
                except (ImageError, OSError) as exc:
                    failures += 1
                    emit(bar, f"captioner visualize: error: {exc}", sys.stderr)
                    continue
                emit(bar, "\n".join([f"{image_path}: {done[image_path].candidates[0].caption}",
                                     *(f"  wrote {path}" for path in written)]))
            bar.update(len(batch))
    return 1 if failures else 0


def _write_outputs(image_path: Path, image: Image.Image, result: CaptionResult, out_path: Path,
                   args: argparse.Namespace) -> list[Path]:
    """The figure (or GIF) of one image, and its JSON with --json; returns the paths written."""
    best = result.candidates[0]  # greedy's caption, the chosen beam, or the first sample
    save_visualization(out_path, image, best.words, best.alphas, best.betas, result.grid,
                       caption=best.caption, columns=args.columns, dpi=args.dpi)
    written = [out_path]
    if args.json:
        payload = {"image": str(image_path), "caption": best.caption,
                   **attention_payload(best.words, best.alphas, best.betas, result.grid)}
        json_path = out_path.with_suffix(".json")
        json_path.write_text(json.dumps(payload) + "\n")
        written.append(json_path)
    return written
