"""Caption metrics. Two tiers:

- `fast_scores`: BLEU-4 (nltk's corpus_bleu) and CIDEr-D (`captioner.cider.CiderD`, the scorer SCST's reward
  uses too; document frequencies from the scored set's references, as pycocoevalcap computes them, and equal to
  pycocoevalcap's scores: tests/test_scst.py) on our own tokenizer. No Java, about a second for a few thousand
  captions: used for validation during training.
- `coco_scores`: the official pycocoevalcap pipeline (PTB tokenizer, BLEU-1..4, METEOR, ROUGE-L, CIDEr-D),
  which runs Java for the tokenizer and METEOR. Use it for numbers you report.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Mapping, Sequence

from .vocab import tokenize


def _check(predictions: Mapping[int, str], references: Mapping[int, Sequence[str]]) -> None:
    missing = set(predictions) - set(references)
    if missing:
        raise ValueError(f"{len(missing)} predictions have no references (e.g. image {next(iter(missing))})")
    if not predictions:
        raise ValueError("no predictions to score")


def fast_scores(predictions: Mapping[int, str], references: Mapping[int, Sequence[str]]) -> dict[str, float]:
    """BLEU-4 and CIDEr-D without Java. Keys match `coco_scores`."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    from .cider import CiderD

    _check(predictions, references)
    ids = sorted(predictions)
    hyps = [tokenize(predictions[i]) for i in ids]
    refs = [[tokenize(r) for r in references[i]] for i in ids]
    bleu4 = corpus_bleu(refs, hyps, smoothing_function=SmoothingFunction().method1)
    cider = CiderD(refs)
    cider_d = sum(cider.score(hyp, image_refs) for hyp, image_refs in zip(hyps, refs, strict=True)) / len(ids)
    return {"BLEU-4": float(bleu4), "CIDEr": float(cider_d)}


def java_available() -> bool:
    return shutil.which("java") is not None


def coco_scores(
    predictions: Mapping[int, str], references: Mapping[int, Sequence[str]], meteor: bool = True
) -> dict[str, float]:
    """Official COCO caption metrics with pycocoevalcap. Needs Java (the PTB tokenizer and METEOR)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _check(predictions, references)
    if not java_available():
        raise RuntimeError(
            "the official COCO metrics need Java (PTB tokenizer, METEOR): install a JRE, "
            "e.g. `apt-get install default-jre-headless`"
        )
    ids = sorted(predictions)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
        res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in ids})
        scores: dict[str, float] = {}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for n, value in enumerate(bleu, start=1):
            scores[f"BLEU-{n}"] = float(value)
        if meteor:
            from pycocoevalcap.meteor.meteor import Meteor

            scorer = Meteor()
            scores["METEOR"] = float(scorer.compute_score(gts, res)[0])
            with contextlib.suppress(Exception):
                scorer.close()
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores
