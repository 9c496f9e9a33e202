"""Tokenizers for the data pipeline: a byte-level default (no files) and any HF ``tokenizer.json``.

Both expose ``vocab_size``, ``eos_id`` (``None`` when the tokenizer has none), ``encode(str) ->
np.int32 array``, ``decode(ids) -> str`` and ``encode_checked(str) -> (ids, lost)``: the same ids plus
the characters ``encode`` could not represent (each once, in order of first appearance; ``""`` when
nothing is lost), so that callers can say so instead of silently dropping them.
"""

from __future__ import annotations

import collections
import os
from typing import Sequence

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (the ``tiny`` preset's vocabulary). No special tokens."""

    name = "byte"
    vocab_size = 256
    eos_id = None
    bos_id = None

    def encode(self, text: str) -> np.ndarray:
        """Raises ``UnicodeEncodeError`` on a lone surrogate (``"\\ud800"``: only a JSON escape makes one)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_checked(self, text: str) -> tuple[np.ndarray, str]:
        """Every character UTF-8 can encode is kept; lone surrogates are the only loss (left out)."""
        try:
            raw, lost = text.encode("utf-8"), ""
        except UnicodeEncodeError:
            lost = _distinct(c for c in text if 0xD800 <= ord(c) <= 0xDFFF)
            raw = "".join(c for c in text if not 0xD800 <= ord(c) <= 0xDFFF).encode("utf-8")
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int32), lost

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer loaded from ``tokenizer.json`` (e.g. MiniMax-M1's).

    ``eos_token``: the end-of-document token appended after each document when the pipeline asks for
    one; when not given, the first of the common names found in the vocabulary is used
    (``</s>``, ``<|endoftext|>``, ``<end_of_document>``, ``<eos>``), else the tokenizer has no EOS.
    """

    _EOS_NAMES = ("</s>", "<|endoftext|>", "<end_of_document>", "<eos>", "[EOS]")

    def __init__(self, path: str, eos_token: str | None = None):
        from tokenizers import Tokenizer

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer: no tokenizer.json at {path!r}")
        self.name = path
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.bos_id = None
        if eos_token is not None:
            eid = self._tok.token_to_id(eos_token)
            if eid is None:
                raise ValueError(f"tokenizer: eos_token {eos_token!r} is not in the vocabulary of {path}")
            self.eos_id = int(eid)
        else:
            ids = [self._tok.token_to_id(n) for n in self._EOS_NAMES]
            ids = [i for i in ids if i is not None]
            self.eos_id = int(ids[0]) if ids else None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_checked(self, text: str) -> tuple[np.ndarray, str]:
        """Lost: characters (whitespace aside) that occur fewer times in ``decode(encode(text))`` than in
        ``text``: an unknown token such as ``[UNK]`` stands for them, a BPE without byte fallback or unk
        token dropped them, a normalizer changed them. (The tokenizer's offsets cannot tell: they shift
        when a model drops characters.) Byte-level BPEs such as MiniMax's lose nothing."""
        ids = self.encode(text)
        back = self.decode(ids)
        if back == text:
            return ids, ""
        missing = collections.Counter(c for c in text if not c.isspace()) - collections.Counter(back)
        return ids, _distinct(c for c in text if c in missing)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _distinct(chars) -> str:
    return "".join(dict.fromkeys(chars))


def make_tokenizer(spec: str, eos_token: str | None = None):
    """``"byte"`` -> :class:`ByteTokenizer`; a path to ``tokenizer.json`` (or its folder) -> :class:`HFTokenizer`."""
    if spec == "byte":
        if eos_token is not None:
            raise ValueError("tokenizer: the byte tokenizer has no special tokens; eos_token must be None")
        return ByteTokenizer()
    return HFTokenizer(spec, eos_token=eos_token)
