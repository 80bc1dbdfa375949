"""Tests for gnsp_optim.reference.tokenizer on a hand-made merges file (no network, no vocabulary download)."""
from __future__ import annotations

import gzip
import importlib.util

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gnsp_optim.reference import tokenizer as tokenizer_module
from gnsp_optim.reference.tokenizer import (
    BPETokenizer,
    WordTokenizer,
    bpe_merge_reference,
    bytes_to_unicode,
    clean_text,
    load_bpe_tokenizer,
    pretokenize_pattern,
)

HAS_REGEX = importlib.util.find_spec("regex") is not None

# --- WordTokenizer -----------------------------------------------------------------------------------------


def test_word_tokenizer_ids_by_hand():
    tok = WordTokenizer(["cat", "dog"], context_length=6)  # pad 0, unk 1, sot 2, cat 3, dog 4, eot 5
    assert (tok.vocab_size, tok.eot_token_id) == (6, 5)
    assert tok(["Dog, CAT"]).tolist() == [[2, 4, 1, 3, 5, 0]]  # "," is a token, unknown
    assert tok("cat").tolist() == [[2, 3, 5, 0, 0, 0]]
    assert tok([]).shape == (0, 6)


def test_word_tokenizer_from_texts_is_sorted_and_order_independent():
    texts = ["a photo of a dog.", "A photo of a cat"]
    tok = WordTokenizer.from_texts(texts, context_length=8)
    assert tok.vocab == [".", "a", "cat", "dog", "of", "photo"]
    assert WordTokenizer.from_texts(texts[::-1], 8).vocab == tok.vocab
    assert tok("a cat").tolist() == [[2, 4, 5, 9, 0, 0, 0, 0]]


def test_word_tokenizer_truncation_keeps_eot():
    tok = WordTokenizer(["x"], context_length=4)
    assert tok("x x x x x").tolist() == [[2, 3, 3, 4]]


def test_word_tokenizer_rejects_bad_arguments():
    with pytest.raises(ValueError):
        WordTokenizer(["a"], context_length=1)
    with pytest.raises(ValueError):
        WordTokenizer(["a", "A"], context_length=8)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["cat", "dog", "bird", "a", "!"]), max_size=12), st.integers(2, 10))
def test_word_tokenizer_eot_is_the_argmax(words, context_length):
    tok = WordTokenizer(["cat", "dog", "a"], context_length)
    row = tok(" ".join(words))[0]
    n = min(len(words) + 2, context_length)
    assert row.shape == (context_length,) and row[0] == tok.sot_token_id
    assert int(row.argmax()) == n - 1 and row[n - 1] == tok.eot_token_id
    assert (row[n:] == 0).all() and (row[1:n - 1] < tok.eot_token_id).all()


# --- BPE on a fabricated merges file -----------------------------------------------------------------------

MERGES = ["h e", "l l", "he ll", "hell o</w>", "c a", "ca t</w>", "a a"]
# ids: 512 + rank -> he 512, ll 513, hell 514, hello</w> 515, ca 516, cat</w> 517, aa 518; sot 519, eot 520
# single byte b: printable bytes '!'..'~' have id ord(b) - 33; its '</w>' form adds 256


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "merges.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return path


@pytest.fixture(scope="module")
def bpe(bpe_path):
    return BPETokenizer(bpe_path, context_length=6)


def test_byte_map_is_a_bijection_onto_printable_characters():
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256)) and len(set(mapping.values())) == 256
    assert all(not c.isspace() and c.isprintable() for c in mapping.values())
    assert mapping[ord(" ")] == "Ġ" and mapping[0] == chr(256) and mapping[0xAD] == chr(256 + 67)
    assert list(mapping)[:3] == [33, 34, 35]


def test_bpe_vocabulary_layout(bpe):
    assert bpe.vocab_size == 512 + len(MERGES) + 2
    assert (bpe.sot_token_id, bpe.eot_token_id) == (519, 520)
    assert bpe.decoder[0] == "!" and bpe.decoder[256] == "!</w>" and bpe.decoder[515] == "hello</w>"


@pytest.mark.parametrize("text, ids", [
    ("Hello", [515]),
    ("hell", [512, ord("l") - 33, 256 + ord("l") - 33]),  # "l l</w>" is not a merge
    ("cat!", [517, 256]),  # "!" is its own pre-token
    ("a", [320]),  # same id as in CLIP's real vocabulary
    ("aaa", [518, 320]),
    ("aaaa", [518, ord("a") - 33, 320]),  # (aa, a) and (a, a</w>) are not merges
    ("it's", [ord("i") - 33, 256 + ord("t") - 33, ord("'") - 33, 256 + ord("s") - 33]),
    ("42", [256 + ord("4") - 33, 256 + ord("2") - 33]),
    ("é", [127, 256 + 102]),  # UTF-8 C3 A9: byte 0xC3 is entry 106 + 21, 0xA9 is entry 94 + 8
    ("  hello \n\t cat ", [515, 517]),
])
def test_bpe_hand_computed_tokenisations(bpe, text, ids):
    assert bpe.encode(text) == ids
    assert bpe(text)[0].tolist()[:len(ids) + 2] == [519, *ids, 520]


def test_bpe_padding_and_truncation(bpe):
    out = bpe(["hello", "hello cat cat cat cat cat"])
    assert out.tolist() == [[519, 515, 520, 0, 0, 0], [519, 515, 517, 517, 517, 520]]


def test_bpe_decode_inverts_encode(bpe):
    assert bpe.decode(bpe.encode("Hello, cat! é")) == "hello , cat ! é"
    assert bpe.decode([519, 515, 520]) == "<|startoftext|>hello <|endoftext|>"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from("acehlot"), min_size=1, max_size=12))
def test_bpe_equals_one_merge_at_a_time_reference(bpe, letters):
    token = "".join(letters)
    word = [*token[:-1], token[-1] + "</w>"]
    assert bpe.bpe(token).split(" ") == bpe_merge_reference(word, bpe.bpe_ranks)


def _assigned_text():
    # characters Python's Unicode database knows (regex may know a newer Unicode version)
    return st.text(st.characters(exclude_categories=("Cn", "Cs")), max_size=40)


@settings(max_examples=100, deadline=None)
@given(_assigned_text())
def test_bpe_keeps_every_non_space_byte(bpe, text):
    cleaned = clean_text(text)
    assert bpe.decode(bpe.encode(text)).replace(" ", "") == cleaned.replace(" ", "")
    assert all(0 <= i < bpe.vocab_size - 2 for i in bpe.encode(text))


@pytest.mark.skipif(not HAS_REGEX, reason="needs the regex package to compare against")
@settings(max_examples=300, deadline=None)
@given(st.one_of(_assigned_text(), st.text(alphabet="ab1²½Ⅻ_'s !中é\u0301", max_size=30)))
def test_re_fallback_pretokenizes_like_regex(text):
    cleaned = clean_text(text)
    assert pretokenize_pattern(False).findall(cleaned) == pretokenize_pattern(True).findall(cleaned)


def test_re_fallback_examples():
    pattern = pretokenize_pattern(use_regex=False)
    assert pattern.findall("it's x²y 42 a_b ½!? <|endoftext|>") == [
        "it", "'s", "x", "²", "y", "4", "2", "a", "_", "b", "½", "!?", "<|endoftext|>"]


def test_special_token_text_maps_to_its_id(bpe):
    assert bpe.encode("<|endoftext|>") == [bpe.eot_token_id]


# --- finding the real file ---------------------------------------------------------------------------------


def test_load_bpe_tokenizer_from_path(bpe_path):
    assert load_bpe_tokenizer(bpe_path, context_length=9)("hello").tolist() == [[519, 515, 520] + [0] * 6]


def test_load_bpe_tokenizer_without_file_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(tokenizer_module, "_bundled_bpe_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install open_clip_torch"):
        load_bpe_tokenizer()
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6"):
        load_bpe_tokenizer(tmp_path / "missing.txt.gz")


@pytest.mark.skipif(tokenizer_module._bundled_bpe_path() is None, reason="open_clip / clip not installed")
def test_real_clip_vocabulary_known_ids():
    tok = load_bpe_tokenizer()
    assert tok.vocab_size == 49408 and tok.eot_token_id == 49407
    assert tok("a diagram")[0, :4].tolist() == [49406, 320, 22697, 49407]

