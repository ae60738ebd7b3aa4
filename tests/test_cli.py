"""`captioner caption` and `captioner evaluate` as a user runs them."""

import json

import pytest

from captioner.cli import main
from tests.helpers import JAVA, require_command, write_coco_subset


def test_caption_json_with_a_bad_file_among_good_ones(lite0_checkpoint, coco_mini, tmp_path, capsys):
    good = [coco_mini / "val" / "000000024585.jpg", coco_mini / "val" / "000000020247.jpg"]
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    code = main(["caption", str(good[0]), str(bad), str(good[1]), "--checkpoint", str(lite0_checkpoint),
                 "--json", "--method", "beam", "--beam-size", "3", "--num-captions", "2", "--max-length", "8"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1  # every image tried, and the failure still reaches the exit status
    assert [line["image"] for line in lines] == [str(good[0]), str(bad), str(good[1])]  # the user's order
    assert "not a recognised image format" in lines[1]["error"]
    for line in (lines[0], lines[2]):
        assert line["caption"] and line["caption"] == line["candidates"][0]["caption"]
        assert len(line["candidates"]) == 2
        assert line["candidates"][0]["log_prob"] <= 0
        assert len(line["caption"].split()) <= 8


def test_caption_sampling_is_reproducible_with_seed(lite0_checkpoint, coco_mini, capsys):
    argv = ["caption", str(coco_mini / "val" / "000000024585.jpg"), "--checkpoint", str(lite0_checkpoint),
            "--method", "sample", "--num-captions", "3", "--seed", "4", "--json"]
    main(argv)
    first = capsys.readouterr().out
    main(argv)
    assert capsys.readouterr().out == first


def test_caption_all_bad_exits_non_zero(lite0_checkpoint, tmp_path, capsys):
    assert main(["caption", str(tmp_path / "missing.jpg"), "--checkpoint", str(lite0_checkpoint)]) == 1
    assert "no such file" in capsys.readouterr().err


def test_missing_checkpoint_is_a_clear_error(tmp_path, coco_mini, capsys):
    code = main(["caption", str(coco_mini / "val" / "000000024585.jpg"), "--checkpoint", str(tmp_path / "x.pt")])
    assert code == 2 and "no such checkpoint" in capsys.readouterr().err


@pytest.mark.java
def test_evaluate_prints_all_coco_metrics_and_writes_results(lite0_checkpoint, coco_mini, tmp_path, capsys):
    require_command(*JAVA)
    images, captions = write_coco_subset(coco_mini, "val", 4, tmp_path / "data", corrupt=1)
    results = tmp_path / "results.json"
    main(["evaluate", "--checkpoint", str(lite0_checkpoint), "--images", str(images), "--captions", str(captions),
          "--method", "beam", "--beam-size", "2", "--results", str(results), "--json"])
    metrics = json.loads(capsys.readouterr().out)
    for key in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "perplexity"):
        assert key in metrics and metrics[key] >= 0
    assert metrics["images"] == 3 and metrics["unreadable_images"] == 1
    assert metrics["decoding"]["method"] == "beam"
    predictions = json.loads(results.read_text())
    assert len(predictions) == 3 and set(predictions[0]) == {"image_id", "caption"}


def test_evaluate_limit_and_no_java(lite0_checkpoint, coco_mini, capsys):
    main(["evaluate", "--checkpoint", str(lite0_checkpoint), "--karpathy-split", str(coco_mini / "dataset_coco.json"),
          "--split", "val", "--limit", "2", "--no-java", "--json"])
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 2 and {"BLEU-4", "CIDEr", "perplexity"} <= set(metrics)


def test_impossible_decoding_flags_exit_with_the_reason(coco_mini, capsys):
    assert main(["caption", str(coco_mini / "val" / "000000024585.jpg"), "--top-p", "0"]) == 2
    assert capsys.readouterr().err == "captioner caption: error: top_p must be in (0, 1]\n"


def test_beam_widens_to_num_captions_only_when_not_given():
    from captioner.cli import build_parser
    from captioner.options import decoding_options
    from captioner.usage import UsageError

    parser = build_parser()
    widened = decoding_options(parser.parse_args(["caption", "x.jpg", "--num-captions", "4"]))
    assert (widened.beam_size, widened.num_captions) == (4, 4)
    kept = decoding_options(parser.parse_args(["caption", "x.jpg", "--beam-size", "6", "--num-captions", "4"]))
    assert kept.beam_size == 6
    with pytest.raises(UsageError, match="at most beam_size"):
        decoding_options(parser.parse_args(["caption", "x.jpg", "--beam-size", "2", "--num-captions", "4"]))
