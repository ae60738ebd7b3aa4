"""Summarise training runs over seeds: the rows of docs/training-log.md.

    python scripts/summarize_runs.py "plain=runs/plain-s0,runs/plain-s1,runs/plain-s2" "semantic=runs/sem-s*"

Each group is NAME=RUN_DIR[,RUN_DIR...] (shell globs are expanded). For each run it reads
- metrics.jsonl (what `captioner train` logs): the best epoch's greedy val CIDEr, epochs run, seconds;
- eval-best.json / eval-averaged.json (written by `captioner evaluate --checkpoint RUN/best.pt ... --json`,
  official pycocoevalcap metrics with the recommended decoding), when present;
and prints one markdown row per group: mean +- sample standard deviation over the runs, and the runs' count.
Runs without eval-best.json (unfinished, or killed before their evaluation) are left out.

With --sweep it prints the decoding table instead, from each run's sweep.json (written by
`scripts/decoding_sweep.py RUN/best.pt ... --json RUN/sweep.json`): val CIDEr (fast metrics) with the
recommended decoding, and with the best setting of the sweep chosen for that run.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
from pathlib import Path

from captioner.decoding import RECOMMENDED


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(name: str, runs: list[Path]) -> str:
    greedy, epochs, minutes = [], [], []
    official: dict[str, dict[str, list[float]]] = {"best": {}, "averaged": {}}
    for run in runs:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if not rows:
            continue
        best = max(rows, key=lambda r: r["CIDEr"])
        greedy.append(best["CIDEr"])
        epochs.append(f"{best['epoch']}/{len(rows)}")
        minutes.append(sum(r["seconds"] for r in rows) / 60)
        for kind in official:
            scores = _read_json(run / f"eval-{kind}.json")
            for metric in ("BLEU-4", "METEOR", "CIDEr"):
                if scores and metric in scores:
                    official[kind].setdefault(metric, []).append(scores[metric])
    cells = [
        name,
        str(len(greedy)),
        _mean_sd(greedy),
        *(_mean_sd(official["best"].get(m, [])) for m in ("BLEU-4", "METEOR", "CIDEr")),
        _mean_sd(official["averaged"].get("CIDEr", [])),
        " ".join(epochs),
        f"{statistics.mean(minutes):.0f} min" if minutes else "-",
    ]
    return "| " + " | ".join(cells) + " |"


def _label(decoding: dict) -> str:
    if decoding["method"] == "greedy":
        return f"greedy/nr{decoding['no_repeat_ngram_size']}"
    return f"beam{decoding['beam_size']}/lp{decoding['length_penalty']:g}/nr{decoding['no_repeat_ngram_size']}"


def summarize_sweeps(name: str, runs: list[Path]) -> str:
    recommended, chosen, labels = [], [], []
    for run in runs:
        rows = _read_json(run / "sweep.json")
        if not rows:
            continue
        matches = [r for r in rows if all(r["decoding"][k] == v for k, v in RECOMMENDED.items())]
        if not matches:
            raise SystemExit(f"{run}/sweep.json has no row with the recommended decoding {RECOMMENDED}")
        best = max(rows, key=lambda r: r["CIDEr"])
        recommended.append(matches[0]["CIDEr"])
        chosen.append(best["CIDEr"])
        labels.append(_label(best["decoding"]))
    if not chosen:
        return f"| {name} | 0 | not run | | |"
    return f"| {name} | {len(chosen)} | {_mean_sd(recommended)} | {_mean_sd(chosen)} | {' '.join(labels)} |"


SWEEP_HEADER = (
    "| setting | seeds | CIDEr, recommended decoding | CIDEr, decoding chosen per run | chosen per run |\n"
    "|---|---|---|---|---|"
)

HEADER = (
    "| setting | seeds | greedy val CIDEr (best epoch) | BLEU-4 | METEOR | CIDEr | CIDEr of averaged.pt "
    "| best epoch / epochs | time per run |\n|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("groups", nargs="+", help="NAME=RUN_DIR[,RUN_DIR...]")
    p.add_argument("--sweep", action="store_true", help="the decoding table, from each run's sweep.json")
    args = p.parse_args()
    print(SWEEP_HEADER if args.sweep else HEADER)
    for group in args.groups:
        name, _, spec = group.partition("=")
        runs = [Path(path) for pattern in spec.split(",") for path in sorted(glob.glob(pattern))]
        # A run counts once it is finished and evaluated: a killed run (to be resumed) has no eval-best.json.
        runs = [r for r in runs if (r / "metrics.jsonl").exists() and (r / "eval-best.json").exists()]
        if args.sweep:
            print(summarize_sweeps(name, runs))
        else:
            print(summarize(name, runs) if runs else f"| {name} | 0 | not run | | | | | | |")


if __name__ == "__main__":
    main()
