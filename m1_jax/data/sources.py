"""Random-access document sources for Grain: text files, JSON lines and ArrayRecord.

Every source is a ``grain.RandomAccessDataSource``-like object (``__len__``, ``__getitem__`` -> str).
Order is the sorted order of the matched files, then the order inside each file, so a glob gives the
same documents on every host and every run.

Content is checked when a source is built, before any model work: every file must open and hold
at least one document, and a sample of the records of EVERY file (the first, the last and some in
between) must be documents of the expected form (UTF-8 text; a JSON object with a string field
``text_key``). A problem raises ``DataError`` naming the file, the record and what was expected.
A bad record that the sample missed raises the same error when the pipeline reaches it.
"""

from __future__ import annotations

import glob
import importlib.resources
import json
import os
from typing import Sequence

from m1_jax.config import ConfigError

BUNDLED = "tinyshakespeare"
FORMATS = ("auto", "text", "jsonl", "arrayrecord")
SAMPLE_PER_FILE = 16  # records checked in every file when a source is built


class DataError(ConfigError):
    """A data file that cannot be used: it names the file, the record and what was expected."""


def bundled_corpus_path() -> str:
    return str(importlib.resources.files("m1_jax.data").joinpath("tinyshakespeare.txt"))


def expand_paths(spec: str | Sequence[str]) -> list[str]:
    """Comma-separated paths / globs (or a list of them) -> sorted existing files; raises if none."""
    if spec == BUNDLED:
        return [bundled_corpus_path()]
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    files: list[str] = []
    for p in parts:
        p = os.path.expanduser(p)
        if os.path.isdir(p):
            matched = sorted(f for f in glob.glob(os.path.join(p, "*")) if os.path.isfile(f))
        else:
            matched = sorted(f for f in glob.glob(p) if not os.path.isdir(f))
        if not matched:
            raise FileNotFoundError(f"data: no files match {p!r}")
        files.extend(matched)
    return files


def detect_format(path: str) -> str:
    if path.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if path.endswith((".arrayrecord", ".array_record")) or ".array_record-" in path or ".arrayrecord-" in path:
        return "arrayrecord"
    return "text"


def sample_indices(n: int, k: int = SAMPLE_PER_FILE) -> list[int]:
    """Up to ``k`` indices spread over ``range(n)``, always the first and the last."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _unreadable(path: str, e: Exception) -> DataError:
    return DataError(f"data: cannot read {path} ({type(e).__name__}: {e})")


class TextSource:
    """Plain-text files; each file is split into documents at ``separator`` (``""``: one document a
    file). Empty documents (only whitespace) are dropped; the separator is not part of a document.
    Every file must be UTF-8 and hold at least one document."""

    def __init__(self, files: Sequence[str], separator: str = "\n\n"):
        self.docs: list[str] = []
        for f in files:
            try:
                with open(f, "rb") as fh:
                    raw = fh.read()
            except OSError as e:
                raise _unreadable(f, e) from None
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"data: {f} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                                "expected UTF-8 text, or set DataConfig.format for a JSON lines / ArrayRecord "
                                "file") from None
            parts = text.split(separator) if separator else [text]
            docs = [p for p in parts if p.strip()]
            if not docs:
                raise DataError(f"data: {f} holds no document ({'empty' if not raw else 'only whitespace'}); "
                                "expected UTF-8 text")
            self.docs.extend(docs)

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> str:
        return self.docs[i]


def _document(obj, text_key: str, where: str) -> str:
    """The document in a parsed JSON record, or a DataError that says what the record holds instead."""
    if not isinstance(obj, dict):
        raise DataError(f"data: {where} is a JSON {type(obj).__name__}; expected an object with a string "
                        f"field {text_key!r}")
    if text_key not in obj:
        raise DataError(f"data: {where} has no field {text_key!r} (fields: {sorted(obj)[:8]}); expected a "
                        f"string field {text_key!r} (DataConfig.text_key)")
    text = obj[text_key]
    if not isinstance(text, str):
        raise DataError(f"data: field {text_key!r} of {where} is a {type(text).__name__}; expected a string")
    return text


class JsonlSource:
    """JSON lines: one object a line, the document in field ``text_key``. Lines are indexed by byte
    offset (the files are not held in memory); every file must hold a record, and a sample of the
    records of every file is parsed and checked when the source is built."""

    def __init__(self, files: Sequence[str], text_key: str = "text"):
        self.files = list(files)
        self.text_key = text_key
        self.index: list[tuple[int, int, int]] = []  # (file number, line number, byte offset)
        for n, f in enumerate(self.files):
            start = len(self.index)
            try:
                with open(f, "rb") as fh:
                    off = 0
                    for lineno, line in enumerate(fh, 1):
                        if line.strip():
                            self.index.append((n, lineno, off))
                        off += len(line)
            except OSError as e:
                raise _unreadable(f, e) from None
            if len(self.index) == start:
                raise DataError(f"data: {f} holds no record ({'empty' if off == 0 else 'only blank lines'}); "
                                f"expected JSON lines, one object with a string field {text_key!r} a line")
            for i in sample_indices(len(self.index) - start):
                self[start + i]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> str:
        n, lineno, off = self.index[i]
        where = f"line {lineno} of {self.files[n]}"
        with open(self.files[n], "rb") as fh:
            fh.seek(off)
            line = fh.readline()
        try:
            obj = json.loads(line)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise DataError(f"data: {where} is not valid JSON ({e}); expected one JSON object a line") from None
        return _document(obj, self.text_key, where)

    def __getstate__(self):  # picklable for Grain worker processes
        return self.__dict__


class ArrayRecordSource:
    """ArrayRecord files whose records are UTF-8 text (``record_format="text"``) or JSON objects with
    the document in ``text_key`` (``record_format="json"``). Every file is opened on its own (so an
    error names it), must hold a record, and a sample of its records is checked."""

    def __init__(self, files: Sequence[str], record_format: str = "text", text_key: str = "text"):
        from grain.sources import ArrayRecordDataSource

        if record_format not in ("text", "json"):
            raise DataError(f"DataConfig.record_format = {record_format!r} is invalid: expected 'text' or 'json'")
        self.files = list(files)
        self.record_format = record_format
        self.text_key = text_key
        self._sources = []
        self._starts = []  # index of each file's first record
        total = 0
        for f in self.files:
            try:
                src = ArrayRecordDataSource([f])
                n = len(src)
            except Exception as e:  # array_record raises RuntimeError / ValueError with its own wording
                raise DataError(f"data: {f} does not open as an ArrayRecord file ({type(e).__name__}: {e}); "
                                "expected an ArrayRecord file, or set DataConfig.format") from None
            if n == 0:
                raise DataError(f"data: {f} holds no record; expected an ArrayRecord file of documents")
            self._sources.append(src)
            self._starts.append(total)
            total += n
        self._len = total
        for start, src in zip(self._starts, self._sources):
            for i in sample_indices(len(src)):
                self[start + i]

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < self._len:
            raise IndexError(f"record {i} of {self._len}")
        n = max(k for k, s in enumerate(self._starts) if s <= i)
        local = i - self._starts[n]
        where = f"record {local} of {self.files[n]}"
        rec = self._sources[n][local]
        try:
            text = rec.decode("utf-8") if isinstance(rec, (bytes, bytearray)) else rec
        except UnicodeDecodeError as e:
            raise DataError(f"data: {where} is not UTF-8 ({e}); expected UTF-8 text"
                            + (" holding a JSON object" if self.record_format == "json" else "")) from None
        if self.record_format == "json":
            try:
                obj = json.loads(text)
            except ValueError as e:
                raise DataError(f"data: {where} is not valid JSON ({e}); expected a JSON object "
                                f"(DataConfig.record_format = 'json')") from None
            text = _document(obj, self.text_key, where)
        return text


def make_source(spec: str, fmt: str = "auto", *, text_key: str = "text", separator: str = "\n\n",
                record_format: str = "text"):
    """Build one source for all files matched by ``spec`` (they must share one format); checks a sample
    of every file (see the module docstring)."""
    if fmt not in FORMATS:
        raise DataError(f"DataConfig.format = {fmt!r} is invalid: expected one of {FORMATS}")
    files = expand_paths(spec)
    fmts = {detect_format(f) for f in files} if fmt == "auto" else {fmt}
    if len(fmts) != 1:
        raise DataError(f"data: the files of {spec!r} mix formats {sorted(fmts)}; set DataConfig.format "
                        "or give files of one format")
    fmt = fmts.pop()
    if fmt == "text":
        return TextSource(files, separator)
    if fmt == "jsonl":
        return JsonlSource(files, text_key)
    return ArrayRecordSource(files, record_format, text_key)
