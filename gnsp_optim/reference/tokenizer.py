r"""Tokenizers for :class:`~gnsp_optim.reference.model.CLIP`: a word-level one for tiny demo models and CLIP's BPE.

Both return ``(N, context_length)`` LongTensors ``[SOT, tokens..., EOT, 0, 0, ...]`` where EOT has the largest
id in the vocabulary, because CLIP pools text features at ``argmax(token id)``. Over-long texts are truncated
and their last kept position is overwritten with EOT (open_clip's behaviour).

Example:
    >>> tok = WordTokenizer.from_texts(["a photo of a cat", "a photo of a dog"], context_length=8)
    >>> tok("a cat").tolist()
    [[2, 3, 4, 8, 0, 0, 0, 0]]
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import itertools
import re
import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch

_WORD_PATTERN = re.compile(r"\w+|[^\w\s]")
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _to_tensor(rows: list[list[int]], context_length: int, eot: int) -> torch.Tensor:
    out = torch.zeros(len(rows), context_length, dtype=torch.long)
    for i, ids in enumerate(rows):
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = eot
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


class WordTokenizer:
    r"""Lower-case word/punctuation tokenizer. Ids: pad 0, unk 1, sot 2, words 3.., eot = largest.

    Example:
        >>> tok = WordTokenizer(["cat", "dog"], context_length=5)
        >>> tok(["Dog cat bird"]).tolist(), tok.vocab_size
        ([[2, 4, 3, 1, 5]], 6)
    """

    pad_token_id, unk_token_id, sot_token_id = 0, 1, 2

    def __init__(self, vocab: Sequence[str], context_length: int) -> None:
        if context_length < 2:
            raise ValueError("context_length must leave room for SOT and EOT")
        words = [w.lower() for w in vocab]
        if len(set(words)) != len(words):
            raise ValueError("vocab entries must be unique after lower-casing")
        self.vocab = words
        self.context_length = context_length
        self.encoder = {w: i + 3 for i, w in enumerate(words)}
        self.eot_token_id = len(words) + 3
        self.vocab_size = len(words) + 4

    @classmethod
    def from_texts(cls, texts: Sequence[str], context_length: int) -> WordTokenizer:
        """Vocabulary = every word in ``texts``, sorted. Example: ``WordTokenizer.from_texts(["a cat"], 8)``."""
        words = sorted({w for t in texts for w in _WORD_PATTERN.findall(t.lower())})
        return cls(words, context_length)

    def encode(self, text: str) -> list[int]:
        """Ids of the words of ``text`` without SOT/EOT. Example: ``tok.encode("a cat")``."""
        return [self.encoder.get(w, self.unk_token_id) for w in _WORD_PATTERN.findall(text.lower())]

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [[self.sot_token_id, *self.encode(t), self.eot_token_id] for t in texts]
        return _to_tensor(rows, self.context_length, self.eot_token_id)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map (no whitespace/control characters).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to ``chr(256 + n)`` in byte order.
    The dict's order (printable bytes first) is the order of the first 256 vocabulary entries.

    Example:
        >>> bytes_to_unicode()[ord("a")], bytes_to_unicode()[ord(" ")]
        ('a', 'Ġ')
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


@functools.cache
def _fallback_pattern() -> re.Pattern[str]:
    # `re` has no \p{L}/\p{N}. Letters = word chars minus \d (category Nd), '_' and the other numeric
    # categories (Nl, No: '²', '½', 'Ⅻ'), which \p{N} has and \w also matches; list those explicitly.
    # Differences from `regex` can only come from the two packages' Unicode database versions.
    other_numbers = "".join(re.escape(chr(i)) for i in range(sys.maxunicode + 1)
                            if unicodedata.category(chr(i)) in ("Nl", "No"))
    return re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                      rf"|[^\W\d_{other_numbers}]+|[\d{other_numbers}]|(?:_|[^\s\w])+", re.IGNORECASE)


def pretokenize_pattern(use_regex: bool | None = None) -> re.Pattern[str]:
    """CLIP's pre-tokenisation regex (``regex`` package if installed, else an equivalent ``re`` pattern).

    Example:
        >>> pretokenize_pattern().findall("it's 42!")
        ['it', "'s", '4', '2', '!']
    """
    if use_regex is None:
        use_regex = importlib.util.find_spec("regex") is not None
    if use_regex:
        import regex

        return regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                             r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
    return _fallback_pattern()


def clean_text(text: str) -> str:
    """CLIP's text normalisation: ftfy (if installed), HTML-unescape twice, collapse whitespace, lower-case.

    Example:
        >>> clean_text("  A &amp;  B ")
        'a & b'
    """
    if importlib.util.find_spec("ftfy") is not None:
        import ftfy

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def bpe_merge_reference(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Slow twin of :meth:`BPETokenizer.bpe`: merge the single leftmost lowest-rank pair, one at a time.

    Equal to the fast rule (all occurrences of the best pair per round) whenever every merge's rank is larger
    than the ranks of the merges that built its parts, as in any merges file produced by BPE training.

    Example:
        >>> bpe_merge_reference(["a", "b</w>"], {("a", "b</w>"): 0})
        ['ab</w>']
    """
    word = list(word)
    while True:
        candidates = [(ranks[p], i) for i, p in enumerate(itertools.pairwise(word)) if p in ranks]
        if not candidates:
            return word
        _, i = min(candidates)
        word[i:i + 2] = [word[i] + word[i + 1]]


class BPETokenizer:
    r"""CLIP's byte-level BPE tokenizer, from a gzipped merges file (``bpe_simple_vocab_16e6.txt.gz``).

    The first line of the file is a header; the next ``49152 - 256 - 2`` lines (48894 merges) are used, so the
    vocabulary is 256 byte characters + their ``</w>`` forms + one entry per merge + ``<|startoftext|>``,
    ``<|endoftext|>``: 49408 ids for CLIP's file. Shorter (test) files use all their merges.
    ``ftfy`` is applied when installed (open_clip always does; it only matters for mojibake).

    Example:
        >>> tok = BPETokenizer("bpe_simple_vocab_16e6.txt.gz")  # doctest: +SKIP
        >>> tok("a diagram").tolist()[0][:4]  # doctest: +SKIP
        [49406, 320, 22697, 49407]
    """

    def __init__(self, bpe_path: str | Path, context_length: int = 77, use_regex: bool | None = None) -> None:
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(line.split()) for line in lines if line.strip()]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab += [c + "</w>" for c in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += list(_SPECIAL)
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.sot_token_id, self.eot_token_id = self.encoder[_SPECIAL[0]], self.encoder[_SPECIAL[1]]
        self.vocab_size = len(vocab)
        self.context_length = context_length
        self.pattern = pretokenize_pattern(use_regex)
        self._cache = {s: s for s in _SPECIAL}

    def bpe(self, token: str) -> str:
        """Merge the byte characters of one pre-token; returns space-separated symbols, last with ``</w>``."""
        if token in self._cache:
            return self._cache[token]
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            best = min(itertools.pairwise(word), key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of `best`, left to right
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[token] = " ".join(word)
        return self._cache[token]

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without SOT/EOT. Example: ``tok.encode("a")  # [320]`` for CLIP's file."""
        ids = []
        for piece in self.pattern.findall(clean_text(text)):
            chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(chars).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of :meth:`encode` up to whitespace (``</w>`` becomes a space). Example: ``tok.decode([320])``."""
        out = bytearray()
        for i in ids:
            sym = self.decoder[int(i)]
            if sym in _SPECIAL:
                out += sym.encode("utf-8")
                continue
            core = sym.removesuffix("</w>")
            out += bytes(self.byte_decoder[c] for c in core)
            out += b" " if core != sym else b""
        return out.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [[self.sot_token_id, *self.encode(t), self.eot_token_id] for t in texts]
        return _to_tensor(rows, self.context_length, self.eot_token_id)


def _bundled_bpe_path() -> Path | None:
    # find_spec on a top-level package locates it without importing it (open_clip imports torchvision).
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
            if candidate.is_file():
                return candidate
    return None


def load_bpe_tokenizer(path: str | Path | None = None, context_length: int = 77) -> BPETokenizer:
    """CLIP's BPE tokenizer from ``path``, else from the file shipped with an installed open_clip (or clip).

    Example:
        >>> tokenizer = load_bpe_tokenizer()  # doctest: +SKIP
    """
    found = Path(path) if path is not None else _bundled_bpe_path()
    if found is None or not found.is_file():
        raise FileNotFoundError(
            f"CLIP's BPE merges file not found ({path or 'no path given and open_clip not installed'}). "
            "pip install open_clip_torch (it ships bpe_simple_vocab_16e6.txt.gz), or pass the path of that "
            "file from the openai/CLIP or mlfoundations/open_clip repository.")
    return BPETokenizer(found, context_length)
