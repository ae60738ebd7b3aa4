"""Per-stage latency of captioning on CPU: eager torch vs the default engine, and today's code vs an older commit.

    python benchmarks/caption_latency.py [--old-main /tmp/oldmain] [--checkpoint PATH] [--repeats 5] [--threads 2]
    # --old-main: a checkout of the commit to compare with, e.g. `git worktree add --detach /tmp/oldmain bff4587`

Every pipeline runs warm in its own worker process (same model, same photos, same thread count), and the parent
takes the workers in turn, one round each, so a busy machine slows them all alike; medians over the rounds.
Pipelines: "old torch" (the old checkout, eager PyTorch), "torch" (this code, `engine="torch"`: eager fp32),
"default" (this code, `engine="auto"`: ONNX Runtime encoder + int8 torch decoder) and "slim" (the torch-free
install, captioner/inference/: the shipped model's ONNX graphs, int8 decoder step, in a process where importing
torch fails). Stages, in ms per image:
decode+resize (open the JPEG, preprocess to the input tensor), encoder, decoder; at batch 1 and 16, for greedy,
the default decoding (`RECOMMENDED`) and beam 3. Then a 12-megapixel JPEG (a
coco-mini photo upscaled, written to a temporary folder) against the same photo at 640 px, and the encoder at
batch 16 as one ONNX Runtime pass against 16 single passes (the service's choice).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COCO_VAL = REPO.parent / "shared" / "data" / "coco-mini" / "val"

# Runs in each worker process, against whichever checkout is first on its PYTHONPATH. It only uses names that the
# old code has too (load_captioner, open_image, caption_features, encoder.encode), and the new ones when present.
WORKER = r'''
import json, sys, time, warnings
warnings.simplefilter("ignore")
import torch
from captioner.api import load_captioner
from captioner.decoding import RECOMMENDED, DecodingOptions
from captioner.images import open_image

config = json.loads(sys.argv[1])
torch.set_num_threads(config["threads"])
captioner = load_captioner(config["checkpoint"], **config["load"])
if config.get("decoder_threads", "keep") != "keep":
    captioner.decoder_threads = config["decoder_threads"]
opener = getattr(captioner, "open", open_image)  # new code: JPEG draft decoding at the model's size
encode = getattr(captioner, "encode_pixels", None) or captioner.encoder.encode
METHODS = {"greedy": DecodingOptions(), "default": DecodingOptions(**RECOMMENDED),
           "beam-3": DecodingOptions(method="beam", beam_size=3)}
engine = getattr(captioner, "encoder_engine", None)
own_max_batch = getattr(engine, "max_batch", None)
print(json.dumps({"engine": getattr(captioner, "engine", "torch"), "encoder_max_batch": own_max_batch,
                  "decoder": "int8" if getattr(captioner, "quantized", False) else "fp32"}), flush=True)

def stages(paths, methods, encoder_runs=None):
    t0 = time.perf_counter()
    pixels = torch.stack([captioner.preprocessing(opener(p)) for p in paths])
    t1 = time.perf_counter()
    if own_max_batch is not None:  # ONNX Runtime: its own chunking, the whole batch in one run, or one image a run
        engine.max_batch = {"one": len(paths), "single": 1}.get(encoder_runs, own_max_batch)
    with torch.no_grad():
        features = encode(pixels)
    t2 = time.perf_counter()
    out = {"decode_resize": t1 - t0, "encoder": t2 - t1, "decoder": {}, "captions": {}}
    for m in methods:
        t3 = time.perf_counter()
        results = captioner.caption_features(features, METHODS[m])
        out["decoder"][m] = time.perf_counter() - t3
        out["captions"][m] = [r.caption for r in results]
    return out

for line in sys.stdin:
    request = json.loads(line)
    print(json.dumps(stages(request["paths"], request["methods"], request.get("encoder_runs"))), flush=True)
'''

# The torch-free pipeline, same protocol. `import torch` fails in it (as in the slim install); the default bundle
# is the shipped model's, so --checkpoint does not apply to it.
SLIM_WORKER = r'''
import json, sys, time

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(name)

sys.meta_path.insert(0, BlockTorch())
import numpy as np
from captioner.inference import load_bundle
from captioner.options import RECOMMENDED, DecodingOptions

config = json.loads(sys.argv[1])
captioner = load_bundle(threads=config["threads"])
METHODS = {"greedy": DecodingOptions(), "default": DecodingOptions(**RECOMMENDED),
           "beam-3": DecodingOptions(method="beam", beam_size=3)}
engine = captioner.encoder
own_max_batch = engine.max_batch
print(json.dumps({"engine": "onnx (no torch)", "encoder_max_batch": own_max_batch,
                  "decoder": "onnx int8" if captioner.quantized else "onnx fp32"}), flush=True)

def stages(paths, methods, encoder_runs=None):
    t0 = time.perf_counter()
    pixels = np.stack([captioner.preprocessing(captioner.open(p)) for p in paths])
    t1 = time.perf_counter()
    engine.max_batch = {"one": len(paths), "single": 1}.get(encoder_runs, own_max_batch)
    features = engine(pixels)
    t2 = time.perf_counter()
    out = {"decode_resize": t1 - t0, "encoder": t2 - t1, "decoder": {}, "captions": {}}
    for m in methods:
        t3 = time.perf_counter()
        results = captioner.caption_features(features, METHODS[m])
        out["decoder"][m] = time.perf_counter() - t3
        out["captions"][m] = [r.caption for r in results]
    return out

for line in sys.stdin:
    request = json.loads(line)
    print(json.dumps(stages(request["paths"], request["methods"], request.get("encoder_runs"))), flush=True)
'''

METHODS = ("greedy", "default", "beam-3")


class Worker:
    def __init__(self, name: str, pythonpath: Path, checkpoint: Path, threads: int, load: dict,
                 decoder_threads: int | None | str = "keep", script: str = WORKER):
        self.name = name
        config = {"checkpoint": str(checkpoint), "threads": threads, "load": load, "decoder_threads": decoder_threads}
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
        self.process = subprocess.Popen([sys.executable, "-c", script, json.dumps(config)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env, cwd=pythonpath)
        self.info = json.loads(self.process.stdout.readline())

    def run(self, paths: list[Path], methods=METHODS, encoder_runs: str | None = None) -> dict:
        """encoder_runs: None (the engine's own chunks), "one" (the whole batch in one run), "single"."""
        request = {"paths": [str(p) for p in paths], "methods": list(methods), "encoder_runs": encoder_runs}
        # The worker before this one leaves its OpenMP threads spinning for a while after its turn; without a
        # pause they steal the CPU from this worker's first stage (decode+resize read 3x too high).
        time.sleep(0.5)
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def rounds(workers: list[Worker], repeats: int, *args, **kwargs) -> dict[str, list[dict]]:
    """Warm-up once each, then `repeats` rounds taking the workers in turn."""
    for w in workers:
        w.run(*args, **kwargs)
    runs: dict[str, list[dict]] = {w.name: [] for w in workers}
    for _ in range(repeats):
        for w in workers:
            runs[w.name].append(w.run(*args, **kwargs))
    return runs


def median_ms(runs: list[dict], key: str, method: str | None = None, per: int = 1) -> float:
    values = [(r[key][method] if method else r[key]) for r in runs]
    return 1000 * statistics.median(values) / per


def make_big_jpeg(source: Path, folder: Path, megapixels: float = 12.0) -> Path:
    """The photo upscaled to ~12 MP (4:3 like a phone's), saved as a JPEG the way cameras do (quality 90)."""
    from PIL import Image

    image = Image.open(source).convert("RGB")
    scale = (megapixels * 1e6 / (image.width * image.height)) ** 0.5
    big = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    path = folder / f"{source.stem}-{big.width}x{big.height}.jpg"
    big.save(path, quality=90)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=REPO / "captioner" / "weights" / "captioner-default.pt")
    p.add_argument("--images", type=Path, default=COCO_VAL)
    p.add_argument("--old-main", type=Path, default=None, help="checkout of the commit to compare with")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each figure as soon as it is measured

    photos = sorted(args.images.glob("*.jpg"))[:16]
    specs = []
    if args.old_main:
        specs.append(("old torch", args.old_main, {}))
    specs += [("torch", REPO, {"engine": "torch"}), ("default", REPO, {"engine": "auto"}), ("slim", REPO, None)]
    workers = [Worker(name, path, args.checkpoint, args.threads, load or {},
                      script=SLIM_WORKER if load is None else WORKER) for name, path, load in specs]
    print(f"checkpoint {args.checkpoint.name}, {args.threads} threads, median of {args.repeats} rounds; pipelines: "
          + ", ".join(f"{w.name} = {w.info['engine']} encoder + {w.info['decoder']} decoder" for w in workers))
    report: dict = {"threads": args.threads, "repeats": args.repeats, "pipelines": {}}
    try:
        print(f"\n{'pipeline':>10} {'batch':>5} {'method':>8} {'decode+resize':>13} {'encoder':>8} {'decoder':>8} "
              f"{'total':>8}   ms per image")
        totals: dict[tuple, float] = {}
        stage: dict[tuple, float] = {}
        for batch in args.batch_sizes:
            runs = rounds(workers, args.repeats, photos[:batch])
            for w in workers:
                r = runs[w.name]
                dr, enc = median_ms(r, "decode_resize", per=batch), median_ms(r, "encoder", per=batch)
                stage[(w.name, batch, "decode_resize")], stage[(w.name, batch, "encoder")] = dr, enc
                for m in METHODS:
                    dec = median_ms(r, "decoder", m, per=batch)
                    stage[(w.name, batch, m)] = dec
                    totals[(w.name, batch, m)] = dr + enc + dec
                    print(f"{w.name:>10} {batch:>5} {m:>8} {dr:>13.1f} {enc:>8.1f} {dec:>8.1f} {dr + enc + dec:>8.1f}")
            report["pipelines"][f"batch{batch}"] = {w.name: runs[w.name] for w in workers}

        for pipeline in ("default", "slim"):
            print(f"\nratios ({pipeline} / torch eager, this code):")
            for batch in args.batch_sizes:
                enc = stage[(pipeline, batch, "encoder")] / stage[("torch", batch, "encoder")]
                parts = [f"encoder {enc:.2f}x"]
                for m in METHODS:
                    dec = stage[(pipeline, batch, m)] / stage[("torch", batch, m)]
                    tot = totals[(pipeline, batch, m)] / totals[("torch", batch, m)]
                    parts.append(f"{m}: decoder {dec:.2f}x total {tot:.2f}x")
                print(f"  batch {batch:>2}: " + "; ".join(parts))
            if args.old_main:
                ratio = totals[(pipeline, 1, "default")] / totals[("old torch", 1, "default")]
                print(f"  default caption at batch 1, {pipeline} / old main's torch pipeline: {ratio:.2f}x "
                      f"(target <= 0.35)")
                report[f"{pipeline}_vs_old_batch1"] = ratio
            dec_enc = stage[(pipeline, 1, "default")] / stage[(pipeline, 1, "encoder")]
            print(f"  decoder / encoder, {pipeline}, batch 1, default decoding: {dec_enc:.2f}x (target <= 0.5)")
            report[f"{pipeline}_decoder_over_encoder_batch1"] = dec_enc
        same = all(totals_caption == runs_caption for totals_caption, runs_caption in [
            (report["pipelines"][f"batch{b}"]["slim"][0]["captions"], report["pipelines"][f"batch{b}"]["default"][0]
             ["captions"]) for b in args.batch_sizes])
        print(f"  slim and default give the same captions: {same}")

        # Big photo: the same scene as a 12 MP JPEG and at its original 640 px, default decoding, batch 1.
        with tempfile.TemporaryDirectory() as tmp:
            small = photos[0]
            big = make_big_jpeg(small, Path(tmp))
            print(f"\nbig photo: {big.name} ({big.stat().st_size / 1e6:.1f} MB) vs {small.name} (640 px), "
                  "default decoding:")
            for pipeline in ("default", "slim"):
                worker = next(w for w in workers if w.name == pipeline)
                for path in (big, small):  # warm-up
                    worker.run([path], methods=("default",))
                both: dict[str, list[dict]] = {"12mp": [], "640": []}
                for _ in range(args.repeats):
                    both["12mp"].append(worker.run([big], methods=("default",)))
                    both["640"].append(worker.run([small], methods=("default",)))
                totals_ms = {}
                for name, r in both.items():
                    dr, enc, dec = (median_ms(r, "decode_resize"), median_ms(r, "encoder"),
                                    median_ms(r, "decoder", "default"))
                    totals_ms[name] = dr + enc + dec
                    print(f"  {pipeline:>7} {name:>5}: decode+resize {dr:6.1f}  encoder {enc:6.1f}  decoder "
                          f"{dec:6.1f}  total {dr + enc + dec:6.1f} ms  caption: {r[0]['captions']['default'][0]!r}")
                same = both["12mp"][0]["captions"] == both["640"][0]["captions"]
                ratio = totals_ms["12mp"] / totals_ms["640"]
                print(f"  {pipeline}: 12 MP / 640 px: {ratio:.2f}x (target <= 1.5); same caption: {same}")
                report[f"{pipeline}_big_over_small"] = ratio

        # The service's choice: one ONNX Runtime run over a micro-batch of 16, or 16 runs of one image.
        default = [w for w in workers if w.name == "default"][0]
        one_pass, single = [], []
        for _ in range(args.repeats):
            one_pass.append(default.run(photos, methods=(), encoder_runs="one"))
            single.append(default.run(photos, methods=(), encoder_runs="single"))
        a, b = median_ms(one_pass, "encoder", per=16), median_ms(single, "encoder", per=16)
        print(f"\nencoder at batch 16, default engine (its own runs: {default.info['encoder_max_batch']} images at "
              f"most): one run {a:.1f} ms/image, one image a run {b:.1f} ms/image (one run / single: {a / b:.2f}x)")
        report["encoder_batch16_one_pass_over_single"] = a / b
    finally:
        for w in workers:
            w.close()
    if args.json:
        args.json.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
