"""Two processes with DistributedDataParallel (gloo, CPU) follow the single-process trajectory."""

import json
import os
import subprocess
import sys

import torch

from captioner import train
from captioner.checkpoint import load_checkpoint
from tests.helpers import train_argv, write_coco_subset


def _argv(data, out, cache, epochs=2, **flags):
    return train_argv(data, out, cache, epochs, dropout=0, lr_schedule="none", seed=3, **flags)


def test_ddp_with_two_processes_matches_one_process(coco_mini, tmp_path):
    data = tmp_path / "data"
    write_coco_subset(coco_mini, "train", 6, data)
    write_coco_subset(coco_mini, "val", 3, data)
    n_captions = len(json.loads((data / "captions_train.json").read_text())["annotations"])
    assert n_captions % 2 == 0  # else DistributedSampler pads with a repeated caption and the runs differ

    single, double = tmp_path / "single", tmp_path / "ddp"
    train.main(train.get_args_parser().parse_args(_argv(data, single, tmp_path / "cache")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "captioner", "train", *_argv(data, double, tmp_path / "cache2")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = load_checkpoint(single / "last.pt"), load_checkpoint(double / "last.pt")
    for (name, x), (_, y) in zip(a.decoder.state_dict().items(), b.decoder.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4, msg=name)
    rows_a = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (double / "metrics.jsonl").read_text().splitlines()]
    assert len(rows_b) == 2  # rank 0 alone wrote the log
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert abs(ra["train_cross_entropy"] - rb["train_cross_entropy"]) < 1e-4
        assert abs(ra["val_cross_entropy"] - rb["val_cross_entropy"]) < 1e-4
    # Resume under DDP continues from rank 0's checkpoint.
    cmd[cmd.index("--epochs") + 1] = "3"
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(double / "last.pt").training["epoch"] == 3


def test_ddp_runs_hard_attention_and_an_scst_stage(coco_mini, tmp_path):
    """The REINFORCE paths under DDP run end to end: hard attention (its baseline all-reduced over ranks) and
    an SCST stage (its gradient pass through the DDP wrapper). Two gloo processes, one epoch each."""
    data = tmp_path / "data"
    write_coco_subset(coco_mini, "train", 6, data)
    write_coco_subset(coco_mini, "val", 3, data)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "-m", "captioner", "train"]
    hard = tmp_path / "hard"
    argv = _argv(data, hard, tmp_path / "cache", epochs=1, attention="hard")
    done = subprocess.run([*launch, *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    decoder = load_checkpoint(hard / "last.pt").decoder
    assert decoder.reinforce_updates > 0 and torch.isfinite(decoder.reinforce_baseline)
    scst_run = tmp_path / "scst"
    argv = _argv(data, scst_run, tmp_path / "cache", epochs=1, batch_size=4, scst=True, init_from=hard / "last.pt")
    done = subprocess.run([*launch, *argv], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (scst_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["train_reward_CIDEr"] >= 0
