"""`captioner` command line: argument parsing only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path

from service.serve import add_server_arguments

from . import __version__, evaluate, lm, train
from .evaluate import add_engine_arguments, engine_options
from .inference.visualize import add_output_arguments
from .options import add_decoding_arguments, decoding_options
from .usage import UsageError, check_coco_pair, device_type


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `captioner caption: error: ... (see captioner caption --help)`, status 2
    (argparse's own usage block runs to a dozen lines for the commands with decoding flags)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows every meaningful default, wraps prose paragraphs and keeps indented lines (examples) as
    written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if _no_default(action.default) or re.search(r"%\(default\)|\(default\)",
                                                                                action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = re.split(r"\n\s*\n", text.strip("\n"))
        return "\n\n".join(p if p.startswith(" ") else textwrap.fill(" ".join(p.split()), width,
                                                                       initial_indent=indent,
                                                                       subsequent_indent=indent)
                             for p in paragraphs)


def _no_default(value: object) -> bool:
    """Defaults not worth showing: unset, a flag's off, an empty list (by identity: 0 is a real default)."""
    return value is None or value is False or value is argparse.SUPPRESS or value == []


def _add_parser(sub, name: str, help: str, description: str, examples: str = "", **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose help opens with what it does for the user, then its options, then examples."""
    epilog = "examples:\n\n" + textwrap.indent(textwrap.dedent(examples).strip("\n"), "  ") if examples else None
    return sub.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=_HelpFormatter,
                          **kwargs)


def _add_input_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", type=Path,
                   help="image files (JPEG, PNG, WebP, HEIC, AVIF, GIF, ...) or folders of them")
    p.add_argument("--recursive", action="store_true", help="also look for images in the folders' subfolders")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: on a terminal, for more than 8 images)")


def _caption_parser(sub) -> None:
    p = _add_parser(sub, "caption", help="caption image files or folders",
                    description="Write a caption for each photo: files, or folders of them (their images found by "
                                "extension or content, sorted; other files reported and skipped). One line, or one "
                                "JSON object, per image, printed as soon as its batch is done. Every image is "
                                "tried; if any cannot be read, the last line says how many and the exit status "
                                "is 1.",
                    examples="""
                        captioner caption photo.jpg
                        captioner caption photos/ --recursive --json > captions.jsonl
                        captioner caption photo.jpg --method sample --num-captions 3 --seed 0
                        """)
    _add_input_arguments(p)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped model")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1 ..., mps")
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
        return 1
    if failures:  # every image was tried; a script must still notice the ones that failed
        print(f"captioner caption: {failures} of {len(paths)} images could not be read (see above)", file=sys.stderr)
        return 1
    return 0


def _caption_line(path: Path, result, as_json: bool) -> str:
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


def _caption_error_line(path: Path, message: str, as_json: bool) -> tuple[str, object]:
    if as_json:
        return json.dumps({"image": str(path), "error": message}), sys.stdout
    return f"{path}: error: {message}", sys.stderr


def _skip_line(path: Path, reason: str, as_json: bool) -> tuple[str, object]:
    if as_json:
        return json.dumps({"image": str(path), "skipped": reason}), sys.stdout
    return f"{path}: skipped: {reason}", sys.stderr


def _caption_batch_parser(sub) -> None:
    p = sub.add_parser("caption-batch", help="caption a large collection on a Ray cluster, resumably",
                       description="Caption a folder tree (or .txt lists of paths) with Ray Data: one loaded model "
                                   "per worker, results written to OUT as JSONL part files as batches finish. "
                                   "Run it again after an interruption: finished photos are not redone. Needs "
                                   "pip install 'captioner[ray]'.")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="folders, image files or .txt path lists")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder of part-*.jsonl result files")
    p.add_argument("--workers", type=int, default=1, help="actors, each with one loaded model")
    p.add_argument("--threads-per-worker", type=int, default=1, help="CPU cores each actor uses (and reserves)")
    p.add_argument("--address", default=None,
                   help="an existing Ray cluster (ray://HOST:10001, or HOST:6379 on a node); default $RAY_ADDRESS, "
                        "else a local cluster started here")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped model")
    p.add_argument("--batch-size", type=int, default=16, help="images per model pass (and per part file)")
    p.set_defaults(func=_run_caption_batch)


def _run_caption_batch(args: argparse.Namespace) -> int:
    from .batch import caption_batch

    if args.workers < 1 or args.batch_size < 1:
        print("captioner caption-batch: error: --workers and --batch-size must be at least 1", file=sys.stderr)
        return 2
    summary = caption_batch(args.inputs, args.output, workers=args.workers, address=args.address,
                            batch_size=args.batch_size, checkpoint=args.checkpoint,
                            threads_per_worker=args.threads_per_worker)
    return 1 if summary.captioned == 0 and summary.already_done == 0 and summary.errors else 0


def _train_parser(sub) -> None:
    p = _add_parser(sub, "train", parents=[train.get_args_parser(add_help=False)], help="train a captioner",
                    description="Train a captioner on your photos and their captions (COCO-format files, or a "
                                "Karpathy split). Each epoch writes OUTPUT/last.pt (what --resume continues "
                                "from), OUTPUT/best.pt (the best validation score so far) and a line of "
                                "OUTPUT/metrics.jsonl. Stop it at any time (Ctrl-C): --resume goes on from the "
                                "last finished epoch, exactly as if it had not stopped. A folder that already "
                                "holds a run is refused unless --resume or --overwrite says what to do with it.",
                    examples="""
                        captioner train --train-images train2017/ --train-captions captions_train2017.json \\
                            --val-images val2017/ --val-captions captions_val2017.json --output-dir runs/first
                        captioner train ... --output-dir runs/first --resume
                        captioner caption --checkpoint runs/first/best.pt photo.jpg
                        """)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    if not args.karpathy_split:
        _require(args, "--train-images", "--train-captions", "--val-images", "--val-captions",
                 alternative="--karpathy-split")
        check_coco_pair(args.train_captions, args.train_images, "--train-captions", "--train-images")
        check_coco_pair(args.val_captions, args.val_images, "--val-captions", "--val-images")
    train.main(args)
    return 0


def _require(args: argparse.Namespace, *flags: str, alternative: str) -> None:
    missing = [flag for flag in flags if getattr(args, flag.lstrip("-").replace("-", "_")) is None]
    if missing:
        raise UsageError(f"missing {' '.join(missing)}: give {' '.join(flags)}, or {alternative}")


def _pretrain_lm_parser(sub) -> None:
    p = _add_parser(sub, "pretrain-lm", parents=[lm.get_args_parser(add_help=False)],
                    help="pretrain the decoder as a caption language model on text alone",
                    description="Teach a decoder to write captions from caption text alone (no photos), as a "
                                "start for `captioner train --init-from`: with few photos, most of what a "
                                "captioner must learn is the language of captions.",
                    examples="""
                        captioner pretrain-lm --text captions_text_only.json --train-captions captions_train.json \\
                            --output-dir runs/lm --epochs 3
                        captioner train ... --init-from runs/lm/best.pt
                        """)
    p.set_defaults(func=lambda args: (lm.main(args), 0)[1])


def _concepts_parser(sub) -> None:
    from . import grounding

    p = _add_parser(sub, "concepts", parents=[grounding.get_args_parser(add_help=False)],
                    help="fit a concept head, for captions that invent fewer objects (--grounding)",
                    description="Fit the concept head that grounded decoding uses (`--grounding`): for each COCO "
                                "object and for 'several', how likely the photo's captions name it, learnt from "
                                "your training photos' own captions. With it, words for objects the photo does "
                                "not show become less likely.",
                    examples="""
                        captioner concepts --train-images train2017/ --train-captions captions_train2017.json \
                            -o runs/concepts.pt
                        captioner caption photo.jpg --grounding 1 --concepts runs/concepts.pt
                        """)

    def run(args: argparse.Namespace) -> int:
        check_coco_pair(args.train_captions, args.train_images, "--train-captions", "--train-images")
        grounding.main(args)
        return 0

    p.set_defaults(func=run)


def _export_parser(sub) -> None:
    p = _add_parser(sub, "export", help="write a slim checkpoint for shipping (no optimizer state, optional fp16)",
                    description="Copy a checkpoint without its training state, optionally in fp16; with "
                                "--ensemble, write several checkpoints over one backbone and vocabulary as "
                                "one ensemble file (their log-probabilities are averaged at every step).",
                    examples="""
                        captioner export runs/first/best.pt -o model.pt --half
                        captioner export runs/seed0/best.pt runs/seed1/best.pt --ensemble -o ensemble.pt
                        """)
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
    p = _add_parser(sub, "average", help="average the weights of several checkpoints of one model",
                    description="Write one checkpoint whose weights are the mean of the given ones (same model "
                                "config, vocabulary and encoder, e.g. a run's top-epochs/*.pt): often a little "
                                "better than any of them.",
                    examples="captioner average runs/first/top-epochs/*.pt -o averaged.pt")
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
    p = _add_parser(sub, "evaluate", parents=[evaluate.get_args_parser(add_help=False)],
                    help="score a checkpoint with the COCO metrics",
                    description="Caption photos that have reference captions and score the captions against them "
                                "(the official COCO metrics with Java, BLEU-4 and CIDEr-D without), with the "
                                "model's perplexity on the references.",
                    examples="""
                        captioner evaluate --images val2017/ --captions captions_val2017.json
                        captioner evaluate --checkpoint runs/first/best.pt --images val2017/ \\
                            --captions captions_val2017.json --results results.json --json
                        """)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    if not args.karpathy_split:
        _require(args, "--images", "--captions", alternative="--karpathy-split")
        check_coco_pair(args.captions, args.images, "--captions", "--images")
    try:
        evaluate.main(args)
    except ValueError as exc:
        if "no predictions to score" not in str(exc):  # metrics.py's word for "not one image could be read"
            raise
        folder = f"--images {args.images}" if not args.karpathy_split else f"--image-root {args.image_root}"
        raise UsageError(f"{folder}: not one of the listed photos could be read, nothing to score") from None
    return 0


def _visualize_parser(sub) -> None:
    p = _add_parser(sub, "visualize", help="draw where the model looked for each word",
                    description="Caption images and draw each word's attention map over the photo: a PNG or "
                                "PDF figure, or an animated GIF (by the extension of -o).",
                    examples="""
                        captioner visualize photo.jpg
                        captioner visualize photo.jpg -o attention.gif
                        captioner visualize photos/ -o figures/ --format pdf
                        """)
    _add_input_arguments(p)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped model")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1 ..., mps")
    add_output_arguments(p)
    add_engine_arguments(p)
    add_decoding_arguments(p, num_captions=False)
    p.set_defaults(func=_run_visualize)


def _run_visualize(args: argparse.Namespace) -> int:
    from .api import load_captioner
    from .inference import visualize

    return visualize.run(args, lambda: load_captioner(args.checkpoint, device=args.device, **engine_options(args)))


def _serve_parser(sub) -> None:
    p = _add_parser(sub, "serve", help="serve the captioner over HTTP",
                    description="Run the HTTP service with the shipped model (or --checkpoint): a web page at /, "
                                "the API at POST /v1/captions, its docs at /docs. Other settings come from "
                                "CAPTIONER_* environment variables (see docs/service.md).",
                    examples="""
                        captioner serve
                        captioner serve --host 0.0.0.0 --port 8080 --checkpoint runs/first/best.pt
                        curl -F image=@photo.jpg http://127.0.0.1:8000/v1/captions
                        """)
    add_server_arguments(p)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: $CAPTIONER_CHECKPOINT or the shipped model")
    p.add_argument("--device", default=None, help="default: $CAPTIONER_DEVICE or cpu")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from service.serve import run_server, server_settings

    from .api import default_checkpoint_path

    settings = server_settings(args, checkpoint=args.checkpoint, device=args.device)
    checkpoint = settings.checkpoint or default_checkpoint_path()
    if settings.engine != "slim" and not checkpoint.is_file():  # one line, not a start-up traceback
        raise UsageError(f"{_checkpoint_source(args.checkpoint)} {checkpoint}: no such checkpoint file")
    return run_server(settings, args)


def _checkpoint_source(given: Path | None) -> str:
    """Which setting named the checkpoint, for error messages (never "pass --checkpoint" to one who did)."""
    import os

    if given is not None:
        return "--checkpoint"
    if os.environ.get("CAPTIONER_CHECKPOINT"):
        return "CAPTIONER_CHECKPOINT"
    return "the shipped model (reinstall captioner, or pass --checkpoint)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="captioner", formatter_class=_HelpFormatter,
                     description="Caption photos with a Show, Attend and Tell model (one is shipped), train "
                                 "your own, score it, and serve it over HTTP.",
                     epilog="examples:\n\n  captioner caption photo.jpg\n  captioner serve\n  "
                            "captioner COMMAND --help")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    _caption_parser(sub)
    _caption_batch_parser(sub)
    _evaluate_parser(sub)
    _pretrain_lm_parser(sub)
    _concepts_parser(sub)
    _export_parser(sub)
    _average_parser(sub)
    _visualize_parser(sub)
    _serve_parser(sub)
    for command in sub.choices.values():
        for action in command._actions:
            if action.dest == "device":  # every --device names one this machine has, or argparse says so
                action.type = device_type
                action.help = action.help or "where the model runs: cpu, cuda, cuda:1 ..., mps"
            elif action.help is None and not _no_default(action.default):
                action.help = "default: %(default)s"  # argparse shows no default for an option without help
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    prog = f"captioner {args.command}"
    try:
        return args.func(args)
    except (UsageError, CheckpointError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: one line (training says where it stopped), the shell's status
        print(f"{prog}: {exc or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
