"""Checks of what a user typed, made before any work starts, each failing with one line that names the argument
and says what would be right. `captioner` (cli.py) prints a `UsageError` as `captioner CMD: error: ...` and exits
with status 2, argparse's status for usage errors; the argparse `type=` functions here make argparse do the same.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


class UsageError(ValueError):
    """An argument that cannot work (a missing folder, a device this machine lacks): exit status 2, one line."""


def device_type(value: str) -> str:
    """argparse `type=` for --device: a device torch knows and this machine has (cpu, cuda, cuda:1, mps)."""
    import torch  # here: the torch-free CLI (captioner/inference/cli.py) uses this module's other checks

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: use cpu, cuda, cuda:1 ... or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{value}: this machine has no CUDA GPU that PyTorch can use "
                                             "(torch.cuda.is_available() is False): use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{value}: this machine has {torch.cuda.device_count()} CUDA "
                                             f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{value}: this machine has no Apple GPU (MPS): use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{value}: captioner runs on cpu, cuda or mps")
    return value


def port_type(value: str) -> int:
    """argparse `type=` for --port: a TCP port number, 0 (any free port) to 65535."""
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a TCP port: use a number from 1 to 65535 (e.g. 8000)")
    return port


def check_coco_pair(captions: Path | None, images: Path | None, captions_flag: str, images_flag: str) -> None:
    """A COCO captions file and the folder of its photos: both exist, the file is COCO captions JSON, and the
    folder holds the photos it lists (at least the first of them), so a wrong folder is caught before minutes
    of work end in a vague error."""
    if captions is None or images is None:
        return  # the caller's own check asks for the missing one
    listed = coco_file_names(captions, captions_flag)
    if not images.is_dir():
        what = "is a file, not a folder" if images.exists() else "does not exist"
        raise UsageError(f"{images_flag} {images}: {what}: give the folder of the photos {captions_flag} lists")
    sample = listed[:20]
    if sample and not any((images / name).is_file() for name in sample):
        raise UsageError(f"{images_flag} {images} holds none of the photos {captions_flag} lists (e.g. "
                         f"{sample[0]}): give the folder they are in")


def coco_file_names(captions: Path, flag: str) -> list[str]:
    """The `file_name`s of a COCO captions file, or a UsageError saying why it is not one."""
    if not captions.is_file():
        what = "is a folder" if captions.is_dir() else "does not exist"
        raise UsageError(f"{flag} {captions}: {what}: give a COCO captions JSON file (e.g. captions_val2017.json)")
    try:
        data = json.loads(captions.read_bytes())
        names = [image["file_name"] for image in data["images"]]
        data["annotations"]  # noqa: B018 (present, or this is not a captions file)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UsageError(f"{flag} {captions}: not a JSON file: give a COCO captions file "
                         "(e.g. captions_val2017.json)") from None
    except (KeyError, TypeError):
        raise UsageError(f"{flag} {captions}: JSON without COCO's 'images' and 'annotations' (file_name, "
                         "caption): give a COCO captions file (e.g. captions_val2017.json)") from None
    return names


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """Training never replaces a run silently: a folder holding one needs --resume or --overwrite."""
    held = [name for name in ("last.pt", "best.pt", "metrics.jsonl") if (output_dir / name).exists()]
    if held and not (resume or overwrite):
        raise UsageError(f"{output_dir} already holds a run ({', '.join(held)}): pass --resume to continue it "
                         "or --overwrite to replace it")
    if resume and overwrite:
        raise UsageError("--resume continues the run in --output-dir, --overwrite replaces it: pass one of them")
