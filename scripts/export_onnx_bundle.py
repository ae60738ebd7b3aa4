"""Build step: the shipped model's graphs for the torch-free install (captioner/weights/onnx/), from the full install.

    python scripts/export_onnx_bundle.py                      # shipped model -> captioner/weights/onnx/
    python scripts/export_onnx_bundle.py --checkpoint run/best.pt --out bundle/ [--fp32]

Run it again whenever captioner/weights/captioner-default.pt changes (tests/test_inference_engine.py fails until
then: the manifest records the checkpoint's sha256).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from captioner.api import default_checkpoint_path
from captioner.engine import export_bundle

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped model")
    p.add_argument("--out", type=Path, default=ROOT / "captioner" / "weights" / "onnx")
    p.add_argument("--fp32", action="store_true", help="keep the decoder in fp32 (3x larger; int8 is the default)")
    args = p.parse_args()
    manifest = export_bundle(args.checkpoint or default_checkpoint_path({}), args.out, quantize=not args.fp32)
    print(f"wrote {args.out}: {', '.join(manifest['sha256'])}")


if __name__ == "__main__":
    main()
