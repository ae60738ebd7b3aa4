"""CIDEr-D with document frequencies fixed once: the reward of self-critical training.

pycocoevalcap's `Cider` recomputes document frequencies from whatever references it is given, so scoring one
training batch would weigh n-grams by that batch alone. SCST instead weighs them by the whole training set
(Rennie et al. 2017), computed once. The arithmetic is pycocoevalcap's CIDEr-D exactly (tf-idf n-gram vectors
for n = 1..4, clipped similarity, Gaussian length penalty with sigma 6, mean over n and references, x 10), so
with the same references the scores are the same (tests/test_scst.py checks it).

Captions are lists of words, already tokenised (`captioner.vocab.tokenize`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

NGram = tuple[str, ...]


def ngram_counts(words: Sequence[str], n: int = 4) -> Counter[NGram]:
    """Counts of every k-gram, k = 1..n."""
    counts: Counter[NGram] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


@dataclass
class _Vector:
    weights: list[dict[NGram, float]]  # per n-gram order: tf-idf weight of each n-gram
    norms: list[float]  # per order: L2 norm of the weights
    length: int  # pycocoevalcap's "length": the number of bigrams (it counts order index 1)


class CiderD:
    """CIDEr-D scorer whose document frequencies come from `corpus`: per image, its reference captions."""

    def __init__(self, corpus: Sequence[Sequence[Sequence[str]]], n: int = 4, sigma: float = 6.0):
        if not corpus:
            raise ValueError("CIDEr-D needs at least one image's references for document frequencies")
        self.n, self.sigma = n, sigma
        # An n-gram's document frequency counts images (reference sets), not captions.
        self.document_frequency: Counter[NGram] = Counter()
        for references in corpus:
            self.document_frequency.update({g for ref in references for g in ngram_counts(ref, n)})
        self.log_num_documents = math.log(float(len(corpus)))

    def _vector(self, words: Sequence[str]) -> _Vector:
        weights: list[dict[NGram, float]] = [{} for _ in range(self.n)]
        squares = [0.0] * self.n
        length = 0
        for gram, term_freq in ngram_counts(words, self.n).items():
            order = len(gram) - 1
            idf = self.log_num_documents - math.log(max(1.0, self.document_frequency[gram]))
            weights[order][gram] = term_freq * idf
            squares[order] += weights[order][gram] ** 2
            if order == 1:
                length += term_freq
        return _Vector(weights, [math.sqrt(s) for s in squares], length)

    def prepare(self, references: Sequence[Sequence[str]]) -> list[_Vector]:
        """One image's reference vectors: compute them once and score many candidates against them."""
        if not references:
            raise ValueError("an image needs at least one reference caption")
        return [self._vector(ref) for ref in references]

    def score(self, candidate: Sequence[str], references: Sequence[Sequence[str]] | list[_Vector]) -> float:
        """CIDEr-D of one candidate against one image's references (word lists, or `prepare`d)."""
        refs = references if references and isinstance(references[0], _Vector) else self.prepare(references)
        hyp = self._vector(candidate)
        total = 0.0
        for ref in refs:
            penalty = math.exp(-((hyp.length - ref.length) ** 2) / (2 * self.sigma**2))
            for order in range(self.n):
                similarity = sum(
                    min(weight, ref.weights[order].get(gram, 0.0)) * ref.weights[order].get(gram, 0.0)
                    for gram, weight in hyp.weights[order].items()
                )
                if hyp.norms[order] != 0 and ref.norms[order] != 0:
                    similarity /= hyp.norms[order] * ref.norms[order]
                total += similarity * penalty
        return total / self.n / len(refs) * 10.0
