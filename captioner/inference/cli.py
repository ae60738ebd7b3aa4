"""The `captioner` command's entry point: the full CLI (captioner/cli.py) when PyTorch is installed; in the
torch-free install, `captioner caption`, `visualize` and `serve` on the shipped model's exported graphs
(captioner/weights/onnx/, or --bundle) and a one-line answer naming the full install for everything else."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.serve import add_server_arguments

from ..imagefiles import emit, find_images, progress_bar, read_batches
from ..options import add_decoding_arguments, decoding_options
from ..usage import UsageError
from .visualize import add_output_arguments

SLIM_COMMANDS = ("caption", "visualize", "serve")

FULL_INSTALL = 'pip install "captioner[train]"'  # what brings torch back (README: "Serve without PyTorch")


def main(argv: list[str] | None = None) -> int:
    try:  # the full CLI imports torch anyway: nothing is lost by trying here
        import torch  # noqa: F401
    except ImportError:
        return slim_main(argv)
    from ..cli import main as full_main

    return full_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description="Caption photos (torch-free install: ONNX Runtime).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("caption", help="caption image files or folders",
                       description="One line, or one JSON object, per image, from the shipped model's exported "
                                   "graphs (or --bundle). Unreadable images: a line each, then exit status 1.")
    _add_input_arguments(p)
    p.add_argument("--batch-size", type=int, default=16, help="images per pass through the encoder")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    add_decoding_arguments(p)
    p.set_defaults(func=run_caption)

    p = sub.add_parser("visualize", help="draw where the model looked for each word",
                       description="Caption images and draw each word's attention map over the photo: a PNG or "
                                   "PDF figure, or an animated GIF (by the extension of -o).")
    _add_input_arguments(p)
    add_output_arguments(p)
    add_decoding_arguments(p, num_captions=False)
    p.set_defaults(func=run_visualize)

    p = sub.add_parser("serve", help="serve the captioner over HTTP",
                       description="The HTTP service on the shipped model's exported graphs (or --bundle): a web "
                                   "page at /, the API at POST /v1/captions, its docs at /docs. Other settings "
                                   "come from CAPTIONER_* environment variables (docs/service.md).")
    add_server_arguments(p)
    p.add_argument("--bundle", type=Path, default=None, help="a folder of exported graphs (default: the shipped "
                   "model's, or $CAPTIONER_BUNDLE)")
    p.set_defaults(func=run_serve)
    return parser


def _add_input_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", type=Path, help="image files or folders of them")
    p.add_argument("--recursive", action="store_true", help="also look for images in the folders' subfolders")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar on stderr")
    p.add_argument("--bundle", type=Path, default=None,
                   help="a folder of exported graphs (default: the shipped model's)")


def slim_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in (*SLIM_COMMANDS, "-h", "--help"):
        print(f"captioner {argv[0]}: needs PyTorch, which this install leaves out: {FULL_INSTALL}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"captioner {args.command}: error: {exc}", file=sys.stderr)
        return 2


def run_visualize(args: argparse.Namespace) -> int:
    from . import visualize
    from .captioner import load_bundle

    return visualize.run(args, lambda: load_bundle(args.bundle))


def run_serve(args: argparse.Namespace) -> int:
    from service.serve import run_server, server_settings

    return run_server(server_settings(args, bundle=args.bundle), args)


def run_caption(args: argparse.Namespace) -> int:
    from .captioner import BundleError, load_bundle

    if args.batch_size < 1:
        print("captioner caption: error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    options = decoding_options(args)
    paths, skipped = find_images(args.images, args.recursive)
    try:
        captioner = load_bundle(args.bundle)
    except BundleError as exc:
        print(f"captioner caption: error: {exc}", file=sys.stderr)
        return 1
    failures = 0
    with progress_bar(len(paths), args.progress) as bar:
        for item in skipped:
            emit(bar, f"{item.path}: skipped: {item.reason}", sys.stderr)
        for batch in read_batches(paths, args.batch_size, captioner.open):
            readable = [image for _, image in batch if not isinstance(image, Exception)]
            results = iter(captioner.caption(readable, options)) if readable else iter(())
            for path, image in batch:
                if isinstance(image, Exception):
                    failures += 1
                    emit(bar, *_error_line(path, str(image), args.json))
                else:
                    emit(bar, _caption_line(path, next(results), args.json))
            bar.update(len(batch))
    if not paths:
        print(f"captioner caption: error: no images in {' '.join(map(str, args.images))}", file=sys.stderr)
        return 1
    if failures:
        print(f"captioner caption: {failures} of {len(paths)} images could not be read (see above)", file=sys.stderr)
        return 1
    return 0


def _caption_line(path: Path, result, as_json: bool) -> str:
    """The same line as the full CLI's (captioner/cli.py _caption_line)."""
    if as_json:
        return json.dumps({
            "image": str(path),
            "caption": result.caption,
            "mean_log_prob": round(result.mean_log_prob, 4),
            "uncertain": result.uncertain,
            "candidates": [{"caption": c.caption, "log_prob": c.log_prob, "mean_log_prob": round(c.mean_log_prob, 4)}
                           for c in result.candidates],
        })
    flag = f"(uncertain: {result.mean_log_prob:.2f} per word) " if result.uncertain else ""
    return "\n".join([f"{path}: {flag}{result.caption}", *(f"    {c.log_prob:8.3f}  {c.caption}"
                                                             for c in result.candidates[1:])])


def _error_line(path: Path, message: str, as_json: bool) -> tuple[str, object]:
    if as_json:
        return json.dumps({"image": str(path), "error": message}), sys.stdout
    return f"{path}: error: {message}", sys.stderr


if __name__ == "__main__":
    sys.exit(main())
