"""The WordPiece tokenizer learnt offline, its round trip through checkpoint files, and pretrained loading."""

import json
import random

import pytest

from mtmm.data.tokenizer import load_pretrained_tokenizer, tokenizer_from_files, tokenizer_to_files, train_wordpiece
from mtmm.errors import UserError

TEXTS = [
    "a red circle. i love this!",
    "the blue square is awful",
    "here is a green star, what a delight.",
    "the square is red. nothing special.",
    "my yellow diamond: so disappointing",
    "the the the circle circle",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tokens(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])


def vocab_of(tokenizer) -> dict[str, int]:
    return json.loads(tokenizer_to_files(tokenizer)["tokenizer.json"])["model"]["vocab"]


def base_size(texts: list[str]) -> int:
    """Special tokens + every character seen, as a word start and as a ## continuation."""
    characters = {char for text in texts for char in text.lower() if not char.isspace()}
    return len(SPECIALS) + 2 * len(characters)


@pytest.mark.parametrize("shuffle", [False, True], ids=["same-order", "shuffled"])
def test_train_wordpiece_is_deterministic(shuffle):
    texts = list(TEXTS)
    if shuffle:  # word counts do not depend on order, and ties are broken alphabetically
        random.Random(1).shuffle(texts)
    first = tokenizer_to_files(train_wordpiece(TEXTS, vocab_size=60))
    second = tokenizer_to_files(train_wordpiece(texts, vocab_size=60))
    assert first["tokenizer.json"] == second["tokenizer.json"]
    assert first == second


def test_special_tokens_and_template():
    tokenizer = train_wordpiece(TEXTS)
    assert list(vocab_of(tokenizer))[:5] == SPECIALS
    assert tokenizer.pad_token_id == 0 and tokenizer.unk_token_id == 1
    assert tokens(tokenizer, "red circle") == ["[CLS]", "red", "circle", "[SEP]"]


@pytest.mark.parametrize("text", ["elcric derauqs", "SQUARE Circle", "wat! ,.:", "rrrrreeeeddd"])
def test_no_unk_for_words_of_seen_characters(text):
    tokenizer = train_wordpiece(TEXTS, vocab_size=10)  # no whole words: only characters
    assert "[UNK]" not in tokens(tokenizer, text)
    assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]


def test_no_unk_for_a_long_word_of_seen_characters():
    # The docstring promises "no word is ever [UNK]"; WordPiece's default max_input_chars_per_word is 100.
    tokenizer = train_wordpiece(TEXTS)
    assert "[UNK]" not in tokens(tokenizer, "circle" * 20)


def test_unseen_character_is_unk():
    tokenizer = train_wordpiece(TEXTS)
    assert tokens(tokenizer, "red zebra")[2] == "[UNK]"


def test_lowercase_option():
    lower = train_wordpiece(TEXTS, lowercase=True)
    assert lower("RED Circle")["input_ids"] == lower("red circle")["input_ids"]
    cased = train_wordpiece(TEXTS + ["Red"], lowercase=False)
    assert cased("Red")["input_ids"] != cased("red")["input_ids"]


@pytest.mark.parametrize("extra", [0, 3, 8])
def test_vocab_size_caps_the_whole_words(extra):
    base = base_size(TEXTS)
    tokenizer = train_wordpiece(TEXTS, vocab_size=base + extra)
    vocab = vocab_of(tokenizer)
    assert len(tokenizer) == len(vocab) == base + extra
    whole_words = [token for token in vocab if len(token) > 1 and not token.startswith(("##", "["))]
    assert len(whole_words) == extra
    if extra:  # the most frequent words come first: "the" (4x), "circle" (3x)
        assert whole_words[:2] == ["the", "circle"]


def test_large_vocab_size_keeps_every_word():
    tokenizer = train_wordpiece(TEXTS, vocab_size=10_000)
    for text in TEXTS:
        assert all(not token.startswith("##") for token in tokens(tokenizer, text))


def test_files_round_trip():
    tokenizer = train_wordpiece(TEXTS, vocab_size=50)
    files = tokenizer_to_files(tokenizer)
    assert "tokenizer.json" in files and all(isinstance(text, str) for text in files.values())
    restored = tokenizer_from_files(files)
    new = ["a purple wedge, lovely", "SQUARE!!", "", "unseen zebra quux"]
    assert restored(new)["input_ids"] == tokenizer(new)["input_ids"]
    assert len(restored) == len(tokenizer)
    assert (restored.pad_token_id, restored.unk_token_id) == (tokenizer.pad_token_id, tokenizer.unk_token_id)
    assert restored.mask_token_id == tokenizer.mask_token_id
    # A second save/restore cycle is stable (tokenizer_config.json gains transformers' loading flags).
    assert tokenizer_to_files(restored)["tokenizer.json"] == files["tokenizer.json"]
    padded = restored(new, padding=True)
    assert {len(ids) for ids in padded["input_ids"]} == {max(len(ids) for ids in tokenizer(new)["input_ids"])}


def test_truncation_keeps_sep():
    tokenizer = train_wordpiece(TEXTS)
    ids = tokenizer("the blue square is awful and red", truncation=True, max_length=4)["input_ids"]
    assert len(ids) == 4 and ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id


def test_empty_texts_is_user_error():
    with pytest.raises(UserError, match="no texts"):
        train_wordpiece([])


@pytest.mark.parametrize("name", ["no-such-org/no-such-model-xyz", "{tmp}/missing_model_dir"])
def test_load_pretrained_tokenizer_missing(name, tmp_path):
    name = name.format(tmp=tmp_path)
    with pytest.raises(UserError) as error:
        load_pretrained_tokenizer(name)
    assert repr(name) in str(error.value)


def test_load_pretrained_tokenizer_from_directory(tmp_path):
    tokenizer = train_wordpiece(TEXTS)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_pretrained_tokenizer(str(tmp_path), texts=["ignored words entirely"])
    assert loaded(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]
