"""One set of decoding defaults (issue 33): what README.md and docs/service.md state as the defaults is what
`DecodingOptions` / `RECOMMENDED` define (the web page is served with them: tests/test_service.py)."""

from __future__ import annotations

import re
from pathlib import Path

from captioner.options import decoding_fields, recommended_options

REPO = Path(__file__).resolve().parent.parent
NGRAM_WORDS = {1: "word", 2: "word pair", 3: "word triple"}


def test_readme_states_the_recommended_decoding():
    readme = " ".join((REPO / "README.md").read_text().split())
    r = recommended_options()
    stated = re.search(r"Decoding defaults to what won on val \(beam search of width (\d+), length penalty ([\d.]+), "
                       r"no repeated ([a-z ]+):", readme)
    assert stated, "README lost its sentence on the decoding defaults"
    assert r.method == "beam" and int(stated[1]) == r.beam_size and float(stated[2]) == r.length_penalty
    assert stated[3] == NGRAM_WORDS[r.no_repeat_ngram_size]
    # Any other "..., length penalty X, ...: the default)" must say the same.
    for value in re.findall(r"length penalty ([\d.]+)[^()]*: the default\)", readme):
        assert float(value) == r.length_penalty, value


def test_service_docs_list_the_recommended_defaults():
    docs = (REPO / "docs" / "service.md").read_text()
    row = next(line for line in docs.splitlines() if line.startswith("| `CAPTIONER_METHOD`"))
    r = recommended_options()
    assert f"| `{r.method}` |" in row
    for spec in decoding_fields():
        if spec.name in ("method", "seed"):
            continue
        stated = re.search(rf"`{spec.name.upper()}` \(([^)]+)\)", row)
        assert stated, f"{spec.name} missing from the CAPTIONER_METHOD row"
        value = getattr(r, spec.name)
        assert (stated[1] == "unset") if value is None else float(stated[1]) == value, spec.name
