"""Grain input pipeline: documents -> tokens -> packed fixed-length rows with segment ids -> batches.

::

    source (text / jsonl / arrayrecord documents)
      [process_index::process_count]         per-host shard (every host reads different documents)
      .shuffle(seed).repeat(epochs)          deterministic; a new permutation every epoch
      .map(tokenize (+ EOS))
      -> ConcatThenSplitIterDataset          pack into rows of seq_len + 1 tokens; a document longer
                                             than a row continues in the next row (nothing is dropped)
      .map(shift)                            inputs, targets, segment_ids, loss_mask
      .batch(per_host_batch)

Each row holds ``seq_len + 1`` packed tokens; ``inputs = row[:-1]``, ``targets = row[1:]`` and the
loss mask is 1 where the target belongs to the same document as the input (no prediction across a
document boundary, none on padding). Segment ids are 1, 2, ... per document in the row; 0 is padding
(only at the very end of a finite dataset).

The iterator's position is ``iterator.get_state()`` (a small JSON-able dict), saved in checkpoints;
``set_state`` resumes exactly, data order included.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator

import grain
import grain.experimental as grain_exp
import numpy as np

from m1_jax.config import require
from m1_jax.data.sources import BUNDLED, DataError, make_source
from m1_jax.data.tokenizer import make_tokenizer


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes batches.

    ``source``: ``"tinyshakespeare"`` (the bundled corpus) or comma-separated paths / globs / folders.
    ``format``: ``auto`` (by extension: .jsonl/.json -> jsonl, .arrayrecord/.array_record -> arrayrecord,
    else text), ``text``, ``jsonl`` or ``arrayrecord``.
    ``batch_size`` is global (all hosts together); ``seq_len`` the model's sequence length.
    ``num_epochs``: ``None`` repeats forever.
    """

    source: str = BUNDLED
    format: str = "auto"
    text_key: str = "text"
    doc_separator: str = "\n\n"
    record_format: str = "text"
    tokenizer: str = "byte"
    eos_token: str | None = None
    add_eos: bool = True
    seq_len: int = 128
    batch_size: int = 16
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None
    num_threads: int = 2
    prefetch_buffer_size: int = 4

    def validate(self, process_count: int = 1) -> None:
        def need(cond, field, expected):
            require(cond, self, field, expected)

        need(isinstance(self.source, str) and self.source, "source", "a path, glob or 'tinyshakespeare'")
        need(isinstance(self.tokenizer, str) and self.tokenizer, "tokenizer", "'byte' or a tokenizer.json path")
        need(isinstance(self.seq_len, int) and self.seq_len > 0, "seq_len", "a positive integer")
        need(isinstance(self.batch_size, int) and self.batch_size > 0, "batch_size", "a positive integer")
        need(self.batch_size % process_count == 0, "batch_size",
             f"a multiple of the number of hosts ({process_count})")
        need(self.format in ("auto", "text", "jsonl", "arrayrecord"), "format",
             "one of 'auto', 'text', 'jsonl', 'arrayrecord'")
        need(self.num_epochs is None or (isinstance(self.num_epochs, int) and self.num_epochs > 0),
             "num_epochs", "None (forever) or a positive integer")
        need(isinstance(self.num_threads, int) and self.num_threads >= 0, "num_threads", "an integer >= 0")


def shift_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed row of T+1 tokens -> model inputs / targets / segment ids / loss mask of length T."""
    tok = row["tokens"].astype(np.int32)
    seg = row["tokens_segment_ids"].astype(np.int32)
    mask = (seg[1:] == seg[:-1]) & (seg[:-1] > 0)
    return {"inputs": tok[:-1], "targets": tok[1:], "segment_ids": seg[:-1],
            "loss_mask": mask.astype(np.float32)}


class _Tokenize:
    """Picklable map function (Grain worker processes)."""

    def __init__(self, tokenizer, eos_id: int | None):
        self.tokenizer = tokenizer
        self.eos_id = eos_id

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        ids = self.tokenizer.encode(text)
        if self.eos_id is not None:
            ids = np.concatenate([ids, np.asarray([self.eos_id], np.int32)])
        return {"tokens": ids.astype(np.int32)}


def build_dataset(cfg: DataConfig, *, process_index: int = 0, process_count: int = 1, tokenizer=None):
    """The Grain ``IterDataset`` of per-host batches ``{inputs, targets, segment_ids, loss_mask}``."""
    cfg.validate(process_count)
    tok = tokenizer if tokenizer is not None else make_tokenizer(cfg.tokenizer, cfg.eos_token)
    src = make_source(cfg.source, cfg.format, text_key=cfg.text_key, separator=cfg.doc_separator,
                      record_format=cfg.record_format)
    if len(src) < process_count:
        raise DataError(f"data: {len(src)} documents in {cfg.source!r} cannot be split over {process_count} "
                        f"hosts; expected at least one document per host")
    ds = grain.MapDataset.source(src)
    if process_count > 1:
        ds = ds[process_index::process_count]
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    ds = ds.map(_Tokenize(tok, tok.eos_id if cfg.add_eos else None))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                              prefetch_buffer_size=cfg.prefetch_buffer_size))
    it = grain_exp.ConcatThenSplitIterDataset(it, length_struct={"tokens": cfg.seq_len + 1})
    it = it.map(shift_row)
    return it.batch(cfg.batch_size // process_count, drop_remainder=True)


class DataIterator:
    """A Python iterator over per-host batches whose position can be saved and restored exactly."""

    def __init__(self, cfg: DataConfig, *, process_index: int = 0, process_count: int = 1, tokenizer=None):
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else make_tokenizer(cfg.tokenizer, cfg.eos_token)
        self._ds = build_dataset(cfg, process_index=process_index, process_count=process_count,
                                 tokenizer=self.tokenizer)
        self._it = iter(self._ds)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """JSON-able position (tuples become lists; ``set_state`` accepts both)."""
        return json.loads(json.dumps(self._it.get_state()))

    def set_state(self, state: dict[str, Any]) -> None:
        self._it.set_state(_tuples(state))


def _tuples(x):
    # JSON turns the packer's (start, stop) tuples into lists; give them back their type.
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x
