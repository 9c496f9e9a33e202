"""Random-access document sources for Grain: text files, JSON lines and ArrayRecord.

Every source is a ``grain.RandomAccessDataSource``-like object (``__len__``, ``__getitem__`` -> str).
Order is the sorted order of the matched files, then the order inside each file, so a glob gives the
same documents on every host and every run.
"""

from __future__ import annotations

import glob
import importlib.resources
import json
import os
from typing import Sequence

BUNDLED = "tinyshakespeare"
FORMATS = ("auto", "text", "jsonl", "arrayrecord")


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
            matched = sorted(glob.glob(p))
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


class TextSource:
    """Plain-text files; each file is split into documents at ``separator`` (``""``: one document a
    file). Empty documents (only whitespace) are dropped; the separator is not part of a document."""

    def __init__(self, files: Sequence[str], separator: str = "\n\n"):
        self.docs: list[str] = []
        for f in files:
            with open(f, encoding="utf-8") as fh:
                text = fh.read()
            parts = text.split(separator) if separator else [text]
            self.docs.extend(p for p in parts if p.strip())
        if not self.docs:
            raise ValueError(f"data: the text files {list(files)[:3]} hold no documents")

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> str:
        return self.docs[i]


class JsonlSource:
    """JSON lines: one object a line, the document in field ``text_key``. Lines are indexed by byte
    offset (the files are not held in memory); a line without the field raises when it is read."""

    def __init__(self, files: Sequence[str], text_key: str = "text"):
        self.files = list(files)
        self.text_key = text_key
        self.index: list[tuple[int, int]] = []  # (file number, byte offset)
        for n, f in enumerate(self.files):
            with open(f, "rb") as fh:
                off = 0
                for line in fh:
                    if line.strip():
                        self.index.append((n, off))
                    off += len(line)
        if not self.index:
            raise ValueError(f"data: the JSON lines files {self.files[:3]} hold no records")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> str:
        n, off = self.index[i]
        with open(self.files[n], "rb") as fh:
            fh.seek(off)
            line = fh.readline()
        obj = json.loads(line)
        if not isinstance(obj, dict) or self.text_key not in obj:
            raise KeyError(f"data: record {i} of {self.files[n]} (byte {off}) has no field {self.text_key!r}")
        text = obj[self.text_key]
        if not isinstance(text, str):
            raise TypeError(f"data: field {self.text_key!r} of record {i} in {self.files[n]} is "
                            f"{type(text).__name__}, expected str")
        return text

    def __getstate__(self):  # picklable for Grain worker processes
        return self.__dict__


class ArrayRecordSource:
    """ArrayRecord files whose records are UTF-8 text (``record_format="text"``) or JSON objects with
    the document in ``text_key`` (``record_format="json"``)."""

    def __init__(self, files: Sequence[str], record_format: str = "text", text_key: str = "text"):
        from grain.sources import ArrayRecordDataSource

        if record_format not in ("text", "json"):
            raise ValueError(f"DataConfig.record_format = {record_format!r}: expected 'text' or 'json'")
        self._src = ArrayRecordDataSource(list(files))
        self.record_format = record_format
        self.text_key = text_key

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> str:
        rec = self._src[i]
        text = rec.decode("utf-8") if isinstance(rec, (bytes, bytearray)) else rec
        if self.record_format == "json":
            obj = json.loads(text)
            if self.text_key not in obj:
                raise KeyError(f"data: ArrayRecord record {i} has no field {self.text_key!r}")
            text = obj[self.text_key]
        return text


def make_source(spec: str, fmt: str = "auto", *, text_key: str = "text", separator: str = "\n\n",
                record_format: str = "text"):
    """Build one source for all files matched by ``spec`` (they must share one format)."""
    if fmt not in FORMATS:
        raise ValueError(f"DataConfig.format = {fmt!r}: expected one of {FORMATS}")
    files = expand_paths(spec)
    fmts = {detect_format(f) for f in files} if fmt == "auto" else {fmt}
    if len(fmts) != 1:
        raise ValueError(f"data: the files of {spec!r} mix formats {sorted(fmts)}; set DataConfig.format "
                         "or give files of one format")
    fmt = fmts.pop()
    if fmt == "text":
        return TextSource(files, separator)
    if fmt == "jsonl":
        return JsonlSource(files, text_key)
    return ArrayRecordSource(files, record_format, text_key)
