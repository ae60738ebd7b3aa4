"""Prepare full COCO 2017 for `captioner train`: download (resumable, checked), unpack, the Karpathy split.

    python data/prepare_coco.py --root ~/data/coco                      # ~20 GB download, ~40 GB free needed
    python data/prepare_coco.py --root ~/data/coco --karpathy dataset_coco.json --sha256 coco2017.sha256

Run it again after an interruption: finished archives are kept, a partial one continues where it stopped (HTTP
Range), unpacked ones are not unpacked again. It ends by printing the `captioner train` command for the data.
The logic lives in captioner/datasets_prep.py (tested there on local files; nothing downloads in tests).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from captioner.datasets_prep import (
    COCO_FILES,
    PrepError,
    download,
    karpathy_to_2017,
    read_manifest,
    train_command,
    unpack,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="where train2017/, val2017/, annotations/ will be")
    p.add_argument("--sha256", type=Path, default=None, help="`sha256sum` manifest of the archives to check")
    p.add_argument("--karpathy", type=Path, default=None,
                   help="Karpathy's dataset_coco.json (from caption_datasets.zip): rewritten for the 2017 folders")
    p.add_argument("--only", nargs="+", choices=sorted(COCO_FILES), default=sorted(COCO_FILES))
    p.add_argument("--keep-archives", action="store_true", help="keep the zips after unpacking")
    args = p.parse_args(argv)
    sums = read_manifest(args.sha256) if args.sha256 else {}
    try:
        for name in args.only:
            archive = args.root / "archives" / name
            if (args.root / f".{name}.done").is_file():
                continue  # unpacked by an earlier run
            with tqdm(unit="B", unit_scale=True, desc=name, file=sys.stderr) as bar:
                download(COCO_FILES[name], archive, sums.get(name), progress=bar.update)
            unpack(archive, args.root)
            if not args.keep_archives:
                archive.unlink()
        karpathy = None
        if args.karpathy:
            karpathy = args.root / "dataset_coco_2017.json"
            counts = karpathy_to_2017(args.karpathy, args.root, karpathy)
            print(f"{karpathy}: " + ", ".join(f"{split} {n:,}" for split, n in counts.items()), file=sys.stderr)
    except PrepError as exc:
        print(f"prepare_coco: error: {exc}", file=sys.stderr)
        return 1
    print(train_command(args.root, karpathy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
