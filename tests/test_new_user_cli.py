"""What a new user meets on the command line and in the Python API (issue 33): one clear line for every bad input,
nothing overwritten or lost silently, the exit status scripts rely on, and the confidence of each caption."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import time
from fractions import Fraction
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner.api import load_captioner
from captioner.cli import build_parser, main
from captioner.images import ImageError, open_image
from captioner.options import DecodingOptions, recommended_options
from tests.helpers import metrics_rows, train_argv, write_coco_subset

PHOTO = "000000024585.jpg"  # coco-mini/val
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING) ")  # captioner's logging format


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """`captioner ARGV` in this process: (exit status, stdout, stderr), argparse's own exits included."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str) -> str:
    """The single line a bad input must produce: no traceback, nothing else."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory, coco_mini) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_coco_subset(coco_mini, "train", 6, folder)
    write_coco_subset(coco_mini, "val", 2, folder)
    return folder


# --------------------------------------------------------------------------------------------------------------
# 1, 2: nothing lost.


def test_train_refuses_an_output_dir_holding_a_run_unless_resume_or_overwrite(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", *train_argv(data, out, tmp_path / "cache", epochs=1)], capsys)[0] == 0
    before = {name: (out / name).read_bytes() for name in ("best.pt", "last.pt", "metrics.jsonl")}

    code, _, err = run(["train", *train_argv(data, out, tmp_path / "cache", epochs=1)], capsys)
    line = one_line_error(err)
    assert code == 2 and f"{out} already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert {name: (out / name).read_bytes() for name in before} == before  # nothing touched

    assert run(["train", *train_argv(data, out, tmp_path / "cache", epochs=1, overwrite=True)], capsys)[0] == 0
    assert [row["epoch"] for row in metrics_rows(out)] == [1]  # replaced, not appended to


def test_ctrl_c_during_training_prints_one_line_exits_130_and_resume_continues(data, tmp_path):
    out = tmp_path / "run"
    argv = train_argv(data, out, tmp_path / "cache", epochs=1000, patience=1000)
    # SIGINT at its default in the child, as in a terminal's foreground job: a shell starts background jobs (a CI
    # script's `&`) with it ignored, and Python then keeps ignoring Ctrl-C.
    process = subprocess.Popen([sys.executable, "-m", "captioner", "train", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if not LOG_LINE.match(line)]
    assert "Traceback" not in err and len(lines) == 1, err
    assert re.fullmatch(rf"captioner train: interrupted at epoch \d+, step \d+ of \d+; {re.escape(str(out))}/last.pt "
                        r"is intact: --resume continues", lines[0]), lines[0]

    done = len(metrics_rows(out))
    resumed = subprocess.run([sys.executable, "-m", "captioner", "train",
                              *train_argv(data, out, tmp_path / "cache", epochs=done + 1, resume=True)],
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert [row["epoch"] for row in metrics_rows(out)] == list(range(1, done + 2))


# --------------------------------------------------------------------------------------------------------------
# 3, 4: one clear line for every bad argument, exit status 2.


@pytest.mark.parametrize("device", ["banana", "cuda:7"])
def test_a_device_this_machine_lacks_is_one_line(device, capsys):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    for command in (["caption", "x.jpg"], ["evaluate"], ["visualize", "x.jpg"], ["serve"],
                    ["train", "--output-dir", "x"]):
        code, _, err = run([*command, "--device", device], capsys)
        line = one_line_error(err)
        assert code == 2 and "--device" in line and "cpu" in line, line


def test_serve_port_out_of_range_is_one_line(capsys):
    code, _, err = run(["serve", "--port", "80000"], capsys)
    line = one_line_error(err)
    assert code == 2 and "--port" in line and "65535" in line


def test_evaluate_on_a_missing_or_wrong_image_folder_names_the_argument(coco_mini, tmp_path, capsys):
    captions = coco_mini / "annotations" / "captions_val.json"
    for images, expected in ((tmp_path / "nowhere", "does not exist"),
                             (coco_mini / "train", "holds none of the photos --captions lists")):
        code, _, err = run(["evaluate", "--images", str(images), "--captions", str(captions), "--no-java"], capsys)
        line = one_line_error(err)
        assert code == 2 and f"--images {images}" in line and expected in line, line


def test_missing_data_flags_are_named(capsys):
    code, _, err = run(["evaluate", "--images", "val/"], capsys)
    assert code == 2 and "missing --captions" in one_line_error(err)
    code, _, err = run(["train", "--output-dir", "run", "--train-images", "train/"], capsys)
    assert code == 2 and "missing --train-captions --val-images --val-captions" in one_line_error(err)


def test_evaluate_on_a_karpathy_split_without_its_photos_is_one_line(coco_mini, tmp_path, capsys):
    code, _, err = run(["evaluate", "--karpathy-split", str(coco_mini / "dataset_coco.json"), "--split", "val",
                        "--image-root", str(tmp_path), "--limit", "2", "--no-java", "--json", "--engine", "torch"],
                       capsys)
    line = one_line_error(err)
    assert code == 2 and f"--image-root {tmp_path}: not one of the listed photos could be read" in line, err


def test_train_with_a_photo_as_captions_or_a_missing_image_folder_is_one_line(data, coco_mini, tmp_path, capsys):
    photo = coco_mini / "val" / PHOTO
    argv = ["train", *train_argv(data, tmp_path / "run", tmp_path / "cache", epochs=1)]
    cases = (("--train-captions", str(photo), "not a JSON file"),
             ("--train-images", str(tmp_path / "no-such-folder"), "does not exist"),
             ("--val-captions", str(data), "is a folder"))
    for flag, value, expected in cases:
        changed = [value if argv[i - 1] == flag else a for i, a in enumerate(argv)]
        code, _, err = run(changed, capsys)
        line = one_line_error(err)
        assert code == 2 and f"{flag} {value}" in line and expected in line, line
    assert not (tmp_path / "cache").exists()  # refused before any image was encoded


def test_a_file_that_is_not_a_checkpoint_never_suggests_unsafe_loading(coco_mini, tmp_path, capsys):
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": Fraction(1, 3)}, pickled)  # an arbitrary pickled object: weights_only=True refuses it
    for checkpoint in (coco_mini / "val" / PHOTO, pickled):
        code, _, err = run(["caption", str(coco_mini / "val" / PHOTO), "--checkpoint", str(checkpoint)], capsys)
        line = one_line_error(err)
        assert code == 2 and f"{checkpoint}: not a captioner checkpoint" in line, line
        assert "weights_only" not in line and "False" not in line


def test_decoding_flags_that_cannot_work_exit_2(capsys):
    for flags, expected in ((["--temperature", "nan"], "temperature must be a finite number"),
                            (["--method", "greedy", "--num-captions", "3"], "greedy decoding gives one caption")):
        code, _, err = run(["caption", "x.jpg", *flags], capsys)
        assert code == 2 and expected in one_line_error(err)


# --------------------------------------------------------------------------------------------------------------
# 5, 6, 7: what scripts and the API rely on.


def test_a_folder_with_an_unreadable_file_exits_1_and_says_how_many_failed(lite0_checkpoint, coco_mini, tmp_path,
                                                                          capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes((coco_mini / "val" / PHOTO).read_bytes())
    (folder / "b.jpg").write_bytes((coco_mini / "val" / PHOTO).read_bytes()[:500])  # truncated
    code, out, err = run(["caption", str(folder), "--checkpoint", str(lite0_checkpoint), "--max-length", "4"],
                         capsys)
    assert code == 1
    assert out.startswith(f"{folder / 'a.jpg'}: ")  # the readable one is still captioned
    assert err.strip().splitlines()[-1] == "captioner caption: 1 of 2 images could not be read (see above)"


def test_the_api_takes_one_path_as_one_image(lite0_checkpoint, coco_mini):
    captioner = load_captioner(lite0_checkpoint, engine="torch")
    path = coco_mini / "val" / PHOTO
    one = captioner.caption(str(path), max_length=5)
    assert one.caption == captioner.caption([path], max_length=5)[0].caption
    assert captioner.caption(path, max_length=5).caption == one.caption
    assert captioner.caption(Image.open(path).convert("RGB"), max_length=5).caption == one.caption


def test_a_jpeg_with_damaged_bytes_in_the_middle_is_refused(coco_mini):
    data = bytearray((coco_mini / "val" / PHOTO).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = bytes(2000)  # Pillow alone decodes this into grey blocks, silently
    with pytest.raises(ImageError, match="corrupt") as err:
        open_image(bytes(data))
    assert err.value.kind == "corrupt"
    # A camera's harmless junk after the image data (libjpeg: "extraneous bytes before marker") is still fine.
    intact = (coco_mini / "val" / PHOTO).read_bytes()
    assert open_image(intact[:-2] + b"\x00\x00\x00" + intact[-2:]).size == Image.open(io.BytesIO(intact)).size


# --------------------------------------------------------------------------------------------------------------
# 8, 11, 14: options that tell the truth.


def test_one_caption_methods_refuse_several_captions_but_ignore_a_default_of_several():
    with pytest.raises(ValueError, match="greedy decoding gives one caption"):
        DecodingOptions(method="greedy", num_captions=3)
    with pytest.raises(ValueError, match="temperature 0"):
        DecodingOptions(method="sample", temperature=0, num_captions=2)
    server_default = recommended_options(num_captions=3)  # e.g. CAPTIONER_NUM_CAPTIONS=3
    assert server_default.updated(method="greedy").num_captions == 1  # not asked for: corrected
    with pytest.raises(ValueError):
        server_default.updated(method="greedy", num_captions=3)  # asked for: refused


def test_non_finite_numbers_are_refused_as_such():
    for name in ("temperature", "length_penalty", "top_p", "uncertain_below"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            DecodingOptions(**{name: float("nan")})


def test_mean_log_prob_and_the_uncertain_floor_in_the_api_and_cli_json(lite0_checkpoint, coco_mini, capsys):
    path = coco_mini / "val" / PHOTO
    captioner = load_captioner(lite0_checkpoint, engine="torch")
    result = captioner.caption(path, max_length=6)
    best = result.candidates[0]
    assert result.mean_log_prob == pytest.approx(best.log_prob / len(best.words)) and result.mean_log_prob < 0
    assert not result.uncertain  # no floor set: never uncertain
    floor = result.mean_log_prob
    assert captioner.caption(path, max_length=6, uncertain_below=floor + 0.01).uncertain
    assert not captioner.caption(path, max_length=6, uncertain_below=floor - 0.01).uncertain

    argv = ["caption", str(path), "--checkpoint", str(lite0_checkpoint), "--engine", "torch", "--max-length", "6"]
    for below, uncertain in ((floor + 0.01, True), (floor - 0.01, False)):
        code, out, _ = run([*argv, "--json", "--uncertain-below", str(below)], capsys)
        line = json.loads(out)
        assert code == 0 and line["uncertain"] is uncertain
        assert line["mean_log_prob"] == pytest.approx(floor, abs=1e-3)
        assert line["candidates"][0]["mean_log_prob"] == pytest.approx(floor, abs=1e-3)
    code, out, _ = run([*argv, "--uncertain-below", str(floor + 0.01)], capsys)
    assert out.startswith(f"{path}: (uncertain: {floor:.2f} per word) ")


# --------------------------------------------------------------------------------------------------------------
# 10, 12: the shipped model by default; polish.


def test_serve_names_the_checkpoint_setting_that_was_given(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "x.pt"
    code, _, err = run(["serve", "--checkpoint", str(missing)], capsys)
    line = one_line_error(err)
    assert code == 2 and line == f"captioner serve: error: --checkpoint {missing}: no such checkpoint file"
    monkeypatch.setenv("CAPTIONER_CHECKPOINT", str(missing))
    code, _, err = run(["serve"], capsys)
    assert code == 2 and f"CAPTIONER_CHECKPOINT {missing}: no such checkpoint file" in one_line_error(err)


def test_caption_names_the_checkpoint_setting_that_was_given(coco_mini, tmp_path, monkeypatch, capsys):
    photo = str(coco_mini / "val" / PHOTO)
    missing = tmp_path / "x.pt"
    code, _, err = run(["caption", photo, "--checkpoint", str(missing)], capsys)
    assert code == 2 and one_line_error(err) == f"captioner caption: error: {missing}: no such checkpoint file"
    monkeypatch.setenv("CAPTIONER_CHECKPOINT", str(missing))
    code, _, err = run(["caption", photo], capsys)
    line = one_line_error(err)
    assert code == 2 and f"CAPTIONER_CHECKPOINT {missing}: no such checkpoint file" in line
    assert "pass --checkpoint" not in line


def test_every_command_defaults_to_the_shipped_model():
    parser = build_parser()
    for argv in (["caption", "x.jpg"], ["visualize", "x.jpg"], ["evaluate"], ["serve"]):
        assert parser.parse_args(argv).checkpoint is None, argv  # None: default_checkpoint_path()


def test_version_comes_from_the_package_metadata(capsys):
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"captioner {version('captioner')}"


@pytest.mark.parametrize("command", ["train", "caption", "evaluate", "pretrain-lm", "export", "average",
                                     "visualize", "serve"])
def test_help_says_what_the_command_does_shows_defaults_and_examples(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0
    description = out.split("\n\n")[1]
    for developer_words in ("train_one_epoch", "torchvision", "reference scripts", "    captioner"):
        assert developer_words not in description
    assert description[0].isupper()  # a sentence for the user, wrapped to the terminal
    assert all(len(line) <= 100 for line in description.splitlines())
    examples = out.split("examples:\n")[1].splitlines()
    assert any(line.startswith(f"  captioner {command}") for line in examples)
    if command in ("train", "caption", "evaluate", "serve", "visualize"):
        assert "(default: " in out or "(default " in out
        assert "(default: None)" not in out and "(default: False)" not in out
