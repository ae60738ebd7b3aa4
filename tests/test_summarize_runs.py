"""scripts/summarize_runs.py: the numbers of docs/training-log.md come from run folders, so check its arithmetic."""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from captioner.options import RECOMMENDED

_spec = importlib.util.spec_from_file_location(
    "summarize_runs", Path(__file__).resolve().parents[1] / "scripts" / "summarize_runs.py")
summarize_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarize_runs)


def _fake_run(folder: Path, val_cider: list[float], official_cider: float, sweep: dict[str, float]) -> Path:
    folder.mkdir()
    rows = [{"epoch": e, "CIDEr": c, "seconds": 30.0} for e, c in enumerate(val_cider, start=1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "eval-best.json").write_text(json.dumps({"BLEU-4": 0.2, "METEOR": 0.18, "CIDEr": official_cider}))
    decodings = {
        "recommended": dict(RECOMMENDED),
        "beam5": {"method": "beam", "beam_size": 5, "length_penalty": 1.0, "no_repeat_ngram_size": 2},
    }
    (folder / "sweep.json").write_text(json.dumps(
        [{"BLEU-4": 0.1, "CIDEr": cider, "decoding": decodings[name]} for name, cider in sweep.items()]))
    return folder


def test_rows_are_mean_and_spread_over_seeds_of_the_best_epoch(tmp_path):
    runs = [_fake_run(tmp_path / "s0", [0.3, 0.5, 0.4], 0.6, {"recommended": 0.6, "beam5": 0.5}),
            _fake_run(tmp_path / "s1", [0.2, 0.45], 0.7, {"recommended": 0.62, "beam5": 0.7})]
    cells = [c.strip() for c in summarize_runs.summarize("x", runs).strip("|").split("|")]
    assert cells[1] == "2"
    assert cells[2] == f"{statistics.mean([0.5, 0.45]):.3f} +- {statistics.stdev([0.5, 0.45]):.3f}"
    assert cells[5] == f"{0.65:.3f} +- {statistics.stdev([0.6, 0.7]):.3f}"
    assert cells[7] == "2/3 2/2"
    assert cells[8] == "1 min"  # (90 + 60) / 2 seconds

    sweep = [c.strip() for c in summarize_runs.summarize_sweeps("x", runs).strip("|").split("|")]
    assert sweep[2] == f"0.610 +- {statistics.stdev([0.6, 0.62]):.3f}"  # the recommended decoding's row
    assert sweep[3] == f"0.650 +- {statistics.stdev([0.6, 0.7]):.3f}"  # each run's best setting
    assert sweep[4] == f"{summarize_runs._label(RECOMMENDED)} beam5/lp1/nr2"


def test_a_sweep_without_the_recommended_decoding_is_refused(tmp_path):
    run = _fake_run(tmp_path / "s0", [0.3], 0.6, {"beam5": 0.5})
    with pytest.raises(SystemExit, match="recommended"):
        summarize_runs.summarize_sweeps("x", [run])
