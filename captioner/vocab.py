"""Vocabulary: a tokenizer that needs no downloaded data, special tokens, encode/decode, JSON form."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-case and keep runs of letters and digits: punctuation is dropped, no nltk data needed."""
    return _WORD.findall(text.lower())


class Vocabulary:
    """Maps words to ids. Ids 0..3 are PAD, START, END, UNK in that order."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary must start with the special tokens {SPECIAL_TOKENS}")
        if len(set(words)) != len(words):
            raise ValueError("a vocabulary must not repeat a word")
        self.itos: list[str] = words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(words)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> Vocabulary:
        """Keep the words seen at least `min_count` times, most frequent first (ties alphabetical)."""
        counts = Counter(word for caption in captions for word in tokenize(caption))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIAL_TOKENS) + kept)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    @property
    def blocked_ids(self) -> tuple[int, ...]:
        """Ids a decoder must never emit: PAD, START and UNK."""
        return (self.pad_id, self.start_id, self.unk_id)

    def encode(self, caption: str, max_words: int | None = None) -> list[int]:
        """Caption -> [START, w1, ..., wn, END]; unknown words become UNK, long captions are cut."""
        words = tokenize(caption)
        if max_words is not None:
            words = words[:max_words]
        return [self.start_id, *(self.stoi.get(w, self.unk_id) for w in words), self.end_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> words, stopping at END and skipping PAD/START."""
        return " ".join(self.decode_words(ids))

    def decode_words(self, ids: Iterable[int]) -> list[str]:
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            words.append(self.itos[i])
        return words

    def to_json(self) -> dict:
        return {"itos": list(self.itos)}

    @classmethod
    def from_json(cls, data: dict) -> Vocabulary:
        return cls(data["itos"])
