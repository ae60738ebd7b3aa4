"""Val CIDEr-D of the torch-free pipeline (captioner/inference/) against the torch ones, same photos, default decoding.

    python benchmarks/slim_quality.py [--data ../shared/data/coco-3k] [--limit 300] [--bundle other/ ...]

Pipelines: "torch" (eager fp32, the reference), "default" (ONNX encoder + int8 torch decoder), "slim fp32" (ONNX
graphs exported now into a temporary folder, fp32 decoder) and "slim int8" (the shipped graphs,
captioner/weights/onnx/); `--bundle`: other bundles of the same model, one row each (e.g. another quantisation,
`python scripts/export_onnx_bundle.py --out DIR`). The int8 graphs ship only while they stay within 0.01 CIDEr of
fp32, on CPUs with and without AVX-512 VNNI (ONNX Runtime's int8 kernels differ between them).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from captioner.api import default_checkpoint_path, load_captioner
from captioner.engine import export_bundle
from captioner.inference import load_bundle
from captioner.metrics import fast_scores

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "coco-3k")
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--bundle", type=Path, nargs="*", default=[], help="more bundles of the shipped model")
    args = p.parse_args()
    coco = json.loads((args.data / "annotations" / "captions_val.json").read_text())
    images = sorted(coco["images"], key=lambda im: im["id"])[: args.limit]
    references: dict[int, list[str]] = {}
    for a in coco["annotations"]:
        references.setdefault(a["image_id"], []).append(a["caption"])
    paths = [args.data / "val" / im["file_name"] for im in images]
    with tempfile.TemporaryDirectory() as tmp:
        export_bundle(default_checkpoint_path({}), tmp, quantize=False)
        pipelines = {"torch": load_captioner(engine="torch"), "default": load_captioner(),
                     "slim fp32": load_bundle(tmp), "slim int8": load_bundle(),
                     **{str(folder): load_bundle(folder) for folder in args.bundle}}
        captions = {}
        for name, captioner in pipelines.items():
            captions[name] = [r.caption for i in range(0, len(paths), 16) for r in captioner.caption(paths[i : i + 16])]
    print(f"{len(paths)} photos of {args.data.name} val, default decoding (CIDEr-D, BLEU-4: captioner.metrics):")
    for name, caps in captions.items():
        scores = fast_scores({im["id"]: c for im, c in zip(images, caps, strict=True)}, references)
        differ = sum(a != b for a, b in zip(caps, captions["torch"], strict=True))
        print(f"  {name:>10}: CIDEr-D {scores['CIDEr']:.4f}  BLEU-4 {scores['BLEU-4']:.4f}  "
              f"captions unlike torch's: {differ}")


if __name__ == "__main__":
    main()
