"""Ahead-of-time compiled engine functions, cached by their static settings and argument signatures.

Compiling explicitly (``jax.jit(...).lower(...).compile()``) lets the engine report compilation apart
from prefill and decode time, and count compilations (``compile_stats()``), which is how the tests check
that prompts of one bucket share every compiled function.
"""

from __future__ import annotations

import collections
import threading
import time

import jax
import numpy as np

_MAX_ENTRIES = 64
_cache: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()
_lock = threading.Lock()
_stats = {"compiles": 0, "compile_seconds": 0.0}


def _leaf_signature(x):
    if isinstance(x, jax.Array):
        return (x.shape, str(x.dtype), x.sharding if x.committed else None)
    a = np.asarray(x)
    return (a.shape, str(a.dtype), None)


def signature(args) -> tuple:
    return (jax.tree.structure(args), tuple(_leaf_signature(x) for x in jax.tree.leaves(args)))


def get(name: str, static_key, fn, args, *, donate_argnums=()):
    """The executable of ``fn(*args)`` (compiled once per ``(name, static_key, signature(args))``), and
    the seconds spent compiling it now (0.0 when it was cached)."""
    key = (name, static_key, signature(args))
    with _lock:
        exe = _cache.get(key)
        if exe is not None:
            _cache.move_to_end(key)
            return exe, 0.0
    t0 = time.perf_counter()
    exe = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
    dt = time.perf_counter() - t0
    with _lock:
        _cache[key] = exe
        while len(_cache) > _MAX_ENTRIES:
            _cache.popitem(last=False)
        _stats["compiles"] += 1
        _stats["compile_seconds"] += dt
    return exe, dt


def compile_stats() -> dict:
    """``{"compiles": n, "compile_seconds": s}`` since the process started (or :func:`clear`)."""
    with _lock:
        return dict(_stats)


def clear() -> None:
    with _lock:
        _cache.clear()
        _stats.update(compiles=0, compile_seconds=0.0)


__all__ = ["clear", "compile_stats", "get", "signature"]
