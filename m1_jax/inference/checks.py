"""Request validation: every bad argument fails here, before any compilation or device work, with an
error naming the argument, its value and what is allowed."""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_request(config, input_ids, *, max_new_tokens, lengths, temperature, top_k, top_p, stop_tokens,
                  prefill_chunk, certain_stop):
    """Returns ``(ids [B, T] int32 numpy, lengths [B] int32 numpy, stops tuple, certain_stop)``."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be an int array [batch, prompt_len]; got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must have an integer dtype; got {ids.dtype}")
    B, T = ids.shape
    if B < 1 or T < 1:
        raise ValueError(f"input_ids must hold at least one row and one prompt token (empty prompt); got shape {ids.shape}")
    V = config.vocab_size
    if ids.min() < 0 or ids.max() >= V:
        bad = ids[(ids < 0) | (ids >= V)]
        raise ValueError(f"input_ids out of range: found {bad.flat[0]} (and {bad.size - 1} more); "
                         f"expected 0 <= id < vocab_size = {V}")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1; got {max_new_tokens!r}")
    lens = np.full((B,), T, np.int64) if lengths is None else np.asarray(lengths)
    if lens.shape != (B,) or not np.issubdtype(lens.dtype, np.integer) or np.any(lens < 1) or np.any(lens > T):
        raise ValueError(f"lengths must be [B] = [{B}] integers with 1 <= length <= prompt_len = {T} "
                         f"(0 would be an empty prompt); got {lengths!r}")
    longest = int(lens.max())
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"prompt length {longest} + max_new_tokens {max_new_tokens} = {longest + max_new_tokens} "
                         f"exceeds the model's positions (max_position_embeddings = "
                         f"{config.max_position_embeddings})")
    if not isinstance(temperature, numbers.Real) or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy); got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or not 1 <= top_k <= V):
        raise ValueError(f"top_k must be None or an int in [1, vocab_size = {V}]; got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1]; got {top_p!r}")
    stops = tuple(stop_tokens) if isinstance(stop_tokens, Sequence) or hasattr(stop_tokens, "__iter__") else None
    if stops is None or any(not _is_int(s) or not 0 <= s < V for s in stops):
        raise ValueError(f"stop_tokens must be token ids in [0, vocab_size = {V}); got {stop_tokens!r}")
    if prefill_chunk is not None and (not _is_int(prefill_chunk) or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be None or an int >= 1; got {prefill_chunk!r}")
    if certain_stop is not None:
        ok = (isinstance(certain_stop, (tuple, list)) and len(certain_stop) == 2 and _is_int(certain_stop[0])
              and certain_stop[0] >= 1 and isinstance(certain_stop[1], numbers.Real) and 0 < certain_stop[1] <= 1)
        if not ok:
            raise ValueError(f"certain_stop must be None or (n, p) with an int n >= 1 and 0 < p <= 1; "
                             f"got {certain_stop!r}")
        certain_stop = (int(certain_stop[0]), float(certain_stop[1]))
    return ids.astype(np.int32), lens.astype(np.int32), tuple(int(s) for s in stops), certain_stop


__all__ = ["check_request"]
