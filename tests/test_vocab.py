from captioner.vocab import END, PAD, SPECIAL_TOKENS, START, UNK, Vocabulary, tokenize


def test_tokenize_lowercases_and_strips_punctuation():
    assert tokenize("A Dog, sleeping on the SHOES.\n") == ["a", "dog", "sleeping", "on", "the", "shoes"]


def test_special_tokens_come_first():
    vocab = Vocabulary.build(["a dog", "a cat"], min_count=1)
    assert vocab.itos[:4] == [PAD, START, END, UNK]
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)


def test_min_count_drops_rare_words_to_unk():
    vocab = Vocabulary.build(["a dog", "a dog", "a cat"], min_count=2)
    assert "dog" in vocab and "cat" not in vocab
    assert vocab.encode("a cat") == [vocab.start_id, vocab.stoi["a"], vocab.unk_id, vocab.end_id]


def test_encode_wraps_in_start_end_and_round_trips():
    vocab = Vocabulary.build(["a man riding a horse", "a horse"], min_count=1)
    ids = vocab.encode("A man riding a horse.")
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert vocab.decode(ids) == "a man riding a horse"


def test_decode_stops_at_end_and_skips_padding():
    vocab = Vocabulary.build(["a horse"], min_count=1)
    ids = [vocab.start_id, vocab.stoi["a"], vocab.end_id, vocab.stoi["horse"], vocab.pad_id]
    assert vocab.decode(ids) == "a"


def test_max_words_cuts_but_keeps_end():
    vocab = Vocabulary.build(["one two three four"], min_count=1)
    ids = vocab.encode("one two three four", max_words=2)
    assert len(ids) == 4 and ids[-1] == vocab.end_id


def test_json_round_trip_and_validation():
    vocab = Vocabulary.build(["a b c", "a b"], min_count=1)
    again = Vocabulary.from_json(vocab.to_json())
    assert again == vocab and again.stoi == vocab.stoi
    import pytest

    with pytest.raises(ValueError, match="special tokens"):
        Vocabulary(["a", *SPECIAL_TOKENS])


def test_blocked_ids_are_pad_start_unk():
    vocab = Vocabulary.build(["x"], min_count=1)
    assert set(vocab.blocked_ids) == {vocab.pad_id, vocab.start_id, vocab.unk_id}
