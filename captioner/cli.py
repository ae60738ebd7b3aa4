"""`captioner` command line: argument parsing only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import evaluate, lm, train
from .evaluate import add_engine_arguments, engine_options
from .options import add_decoding_arguments, decoding_options


def _add_input_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", type=Path,
                   help="image files (JPEG, PNG, WebP, HEIC, AVIF, GIF, ...) or folders of them")
    p.add_argument("--recursive", action="store_true", help="also look for images in the folders' subfolders")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: on a terminal, for more than 8 images)")


def _caption_parser(sub) -> None:
    p = sub.add_parser("caption", help="caption image files or folders",
                       description="Caption images: files, or folders of them (their images found by extension or "
                                   "content, sorted; other files reported and skipped). One line, or one JSON "
                                   "object, per image, printed as soon as its batch is done.")
    _add_input_arguments(p)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16, help="images per pass through the model")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    add_engine_arguments(p)
    add_decoding_arguments(p)
    p.set_defaults(func=_run_caption)


def _run_caption(args: argparse.Namespace) -> int:
    from .api import load_captioner
    from .imagefiles import emit, find_images, progress_bar, read_batches

    if args.batch_size < 1:
        print("captioner caption: error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    options = decoding_options(args)
    paths, skipped = find_images(args.images, args.recursive)
    captioner = load_captioner(args.checkpoint, device=args.device, **engine_options(args))
    failures = 0
    with progress_bar(len(paths), args.progress) as bar:
        for item in skipped:
            emit(bar, *_skip_line(item.path, item.reason, args.json))
        for batch in read_batches(paths, args.batch_size, captioner.open):
            readable = [(path, image) for path, image in batch if not isinstance(image, Exception)]
            results = iter(captioner.caption([im for _, im in readable], options)) if readable else iter(())
            for path, image in batch:  # keep the order the user gave
                if isinstance(image, Exception):
                    failures += 1
                    emit(bar, *_caption_error_line(path, str(image), args.json))
                else:
                    emit(bar, _caption_line(path, next(results), args.json))
            bar.update(len(batch))
    if not paths:
        print(f"captioner caption: error: no images in {' '.join(map(str, args.images))}", file=sys.stderr)
    return 1 if failures == len(paths) else 0


def _caption_line(path: Path, result, as_json: bool) -> str:
    if as_json:
        return json.dumps({
            "image": str(path),
            "caption": result.caption,
            "candidates": [{"caption": c.caption, "log_prob": c.log_prob} for c in result.candidates],
        })
    return "\n".join([f"{path}: {result.caption}", *(f"    {c.log_prob:8.3f}  {c.caption}"
                                                      for c in result.candidates[1:])])


def _caption_error_line(path: Path, message: str, as_json: bool) -> tuple[str, object]:
    if as_json:
        return json.dumps({"image": str(path), "error": message}), sys.stdout
    return f"{path}: error: {message}", sys.stderr


def _skip_line(path: Path, reason: str, as_json: bool) -> tuple[str, object]:
    if as_json:
        return json.dumps({"image": str(path), "skipped": reason}), sys.stdout
    return f"{path}: skipped: {reason}", sys.stderr


def _train_parser(sub) -> None:
    p = sub.add_parser("train", parents=[train.get_args_parser(add_help=False)], help="train a captioner",
                       description=train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args: (train.main(args), 0)[1])


def _pretrain_lm_parser(sub) -> None:
    p = sub.add_parser("pretrain-lm", parents=[lm.get_args_parser(add_help=False)],
                       help="pretrain the decoder as a caption language model on text alone",
                       description=lm.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args: (lm.main(args), 0)[1])


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a slim checkpoint for shipping (no optimizer state, optional fp16)",
                       description="Copy a checkpoint without its training state, optionally in fp16; with "
                                   "--ensemble, write several checkpoints over one backbone and vocabulary as "
                                   "one ensemble file (their log-probabilities are averaged at every step).")
    p.add_argument("checkpoints", type=Path, nargs="+", metavar="checkpoint")
    p.add_argument("--ensemble", action="store_true", help="combine all the given checkpoints into one ensemble")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--half", action="store_true", help="store float weights as fp16 (they load back as fp32)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .checkpoint import ensemble_checkpoints, load_checkpoint, save_checkpoint

    if len(args.checkpoints) > 1 and not args.ensemble:
        raise SystemExit("several checkpoints: pass --ensemble to combine them into one ensemble file")
    ckpt = ensemble_checkpoints(args.checkpoints) if args.ensemble else load_checkpoint(args.checkpoints[0])
    save_checkpoint(args.output, ckpt.decoder, ckpt.vocab, ckpt.encoder_name, ckpt.preprocessing,
                    encoder_state=ckpt.encoder_state, metrics=ckpt.metrics, half=args.half)
    print(f"{args.output}: {args.output.stat().st_size / 1e6:.1f} MB")
    return 0


def _average_parser(sub) -> None:
    p = sub.add_parser("average", help="average the weights of several checkpoints of one model",
                       description="Checkpoint averaging: write one checkpoint whose weights are the mean of the "
                                   "given ones (same model config, vocabulary and encoder, e.g. a run's "
                                   "top-epochs/*.pt).")
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=_run_average)


def _run_average(args: argparse.Namespace) -> int:
    from .checkpoint import average_checkpoints, save_checkpoint

    avg = average_checkpoints(args.checkpoints)
    save_checkpoint(args.output, avg.decoder, avg.vocab, avg.encoder_name, avg.preprocessing,
                    encoder_state=avg.encoder_state, metrics=avg.metrics)
    print(f"{args.output}: mean of {len(args.checkpoints)} checkpoints")
    return 0


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", parents=[evaluate.get_args_parser(add_help=False)],
                       help="score a checkpoint with the COCO metrics", description=evaluate.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args: (evaluate.main(args), 0)[1])


def _visualize_parser(sub) -> None:
    p = sub.add_parser("visualize", help="draw where the model looked for each word",
                       description="Caption images and draw each word's attention map over the photo: a PNG or "
                                   "PDF figure, or an animated GIF (by the extension of -o).")
    _add_input_arguments(p)
    p.add_argument("-o", "--output", default=None,
                   help="file (.png, .pdf, .gif) for one image, or a folder (several images, or ending in /); "
                        "default: <stem>-attention.png here")
    p.add_argument("--format", choices=["png", "pdf", "gif"], default=None, help="format for folder outputs")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--columns", type=int, default=5, help="panels per row")
    p.add_argument("--dpi", type=int, default=100, help="PNG resolution")
    p.add_argument("--batch-size", type=int, default=8, help="images per pass through the model")
    p.add_argument("--json", action="store_true", help="also write tokens, alphas (T x h x w) and betas as JSON")
    add_engine_arguments(p)
    add_decoding_arguments(p, num_captions=False)
    p.set_defaults(func=_run_visualize)


def _run_visualize(args: argparse.Namespace) -> int:
    from . import visualize

    return visualize.run(args)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the captioner over HTTP",
                       description="Run the HTTP service: web page at /, API at POST /v1/captions, docs at /docs. "
                       "Other settings come from CAPTIONER_* environment variables (see docs/service.md).")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: $CAPTIONER_CHECKPOINT or the shipped model")
    p.add_argument("--device", default=None, help="default: $CAPTIONER_DEVICE or cpu")
    p.add_argument("--max-batch", type=int, default=None, help="micro-batch size (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=None, help="how long a micro-batch waits to fill")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from service.app import create_app
    from service.settings import Settings

    from .api import default_checkpoint_path

    given = {"checkpoint": args.checkpoint, "device": args.device, "max_batch": args.max_batch,
             "max_wait_ms": args.max_wait_ms}
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        print(f"captioner: error: invalid settings: {exc}", file=sys.stderr)
        return 2
    checkpoint = settings.checkpoint or default_checkpoint_path()
    if not checkpoint.is_file():  # fail here, with one line, rather than in the server's start-up traceback
        raise FileNotFoundError(f"checkpoint {checkpoint} not found: pass --checkpoint or set CAPTIONER_CHECKPOINT")
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description="Show, Attend and Tell image captioning")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _caption_parser(sub)
    _evaluate_parser(sub)
    _pretrain_lm_parser(sub)
    _export_parser(sub)
    _average_parser(sub)
    _visualize_parser(sub)
    _serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"captioner: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
