"""The generation engine: chunked prefill, then the whole sampling loop on the device.

The model is split once (``nnx.split``) and every engine function is a pure function of its state,
compiled ahead of time per bucket (``m1_jax.inference.compiled``):

* ``init``: zero caches for the bucketed batch and slots (``model.init_cache``);
* ``prefill``: one chunk of the left-padded prompt through the model's own forward with the cache
  (``model.hidden_states(..., cache=)``), the LM head on the last position only;
* ``start``: the first token from the prefill logits;
* ``decode``: a ``lax.while_loop`` that runs the model on the last token (one slot per step), samples,
  records the token and its log-probability and checks each row's stop conditions, until every row is
  done or the requested number of tokens is reached. The loop state (caches included) is donated, so
  the caches are updated in place; tokens come back in one transfer at the end, or per segment when
  streaming.
"""

from __future__ import annotations

import functools
import time
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1_jax.inference import compiled
from m1_jax.inference.checks import check_request
from m1_jax.inference.sampling import SamplingMode, sample_token
from m1_jax.inference.sizes import default_prefill_chunk, new_tokens_bucket, prompt_bucket, slots_bucket
from m1_jax.model.cache import Cache, init_cache
from m1_jax.model.compute_weights import cast_to_compute_dtype, needs_cast


class Settings(NamedTuple):
    """The traced sampling settings (changing them never recompiles)."""

    temperature: jax.Array  # [] float32
    top_p: jax.Array  # [] float32
    certain_p: jax.Array  # [] float32
    stops: jax.Array  # [n] int32, padded with -1


class DecodeState(NamedTuple):
    cache: Cache
    key: jax.Array
    tokens: jax.Array  # [B, NB] int32
    logprobs: jax.Array  # [B, NB] float32
    step: jax.Array  # [] int32: tokens sampled so far
    done: jax.Array  # [B] bool
    lengths: jax.Array  # [B] int32: tokens generated per row, its stop token included
    run: jax.Array  # [B] int32: trailing tokens with probability >= certain_p
    last: jax.Array  # [B] int32: the last token of each row (the next decode input)


class StreamChunk(NamedTuple):
    """New tokens since the previous chunk: ``tokens, logprobs [B, n]`` (rows already done repeat their
    stop token with log-probability 0), and per row ``done [B]`` and ``lengths [B]`` so far."""

    tokens: np.ndarray
    logprobs: np.ndarray
    done: np.ndarray
    lengths: np.ndarray


# ------------------------------------------------------------------------------------- pure functions
def _prefill_fn(graphdef):
    def prefill(params, ids, cache):
        model = nnx.merge(graphdef, params)
        h, _, cache = model.hidden_states(ids, cache=cache)
        return model.logits(h[:, -1:])[:, 0], cache
    return prefill


def _record(s: DecodeState, tok, lp, settings: Settings, certain_n: int) -> DecodeState:
    i = s.step
    tok = jnp.where(s.done, s.last, tok)
    lp = jnp.where(s.done, 0.0, lp)
    tokens = jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, i))
    logprobs = jax.lax.dynamic_update_slice(s.logprobs, lp[:, None], (0, i))
    hit = jnp.any(tok[:, None] == settings.stops[None, :], axis=-1)
    run = s.run
    if certain_n:
        run = jnp.where(jnp.exp(lp) >= settings.certain_p, run + 1, 0)
        hit = hit | (run >= certain_n)
    lengths = jnp.where(s.done, s.lengths, i + 1)
    return s._replace(tokens=tokens, logprobs=logprobs, step=i + 1, done=s.done | hit, lengths=lengths, run=run,
                      last=tok)


def _start_fn(mode: SamplingMode, certain_n: int, NB: int):
    def start(logits, key, settings, cache):
        B = logits.shape[0]
        key, sub = jax.random.split(key)
        tok, lp = sample_token(logits, sub, mode, settings.temperature, settings.top_p)
        s = DecodeState(cache, key, jnp.zeros((B, NB), jnp.int32), jnp.zeros((B, NB), jnp.float32),
                        jnp.zeros((), jnp.int32), jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32),
                        jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32))
        return _record(s, tok, lp, settings, certain_n)
    return start


def _decode_fn(graphdef, mode: SamplingMode, certain_n: int):
    def decode(params, state, n_target, settings):
        def cond(s):
            return (s.step < n_target) & ~jnp.all(s.done)

        def body(s):
            model = nnx.merge(graphdef, params)
            logits, cache = model(s.last[:, None], cache=s.cache)
            key, sub = jax.random.split(s.key)
            tok, lp = sample_token(logits[:, 0], sub, mode, settings.temperature, settings.top_p)
            return _record(s._replace(cache=cache, key=key), tok, lp, settings, certain_n)

        return jax.lax.while_loop(cond, body, state)
    return decode


# ------------------------------------------------------------------------------------- one request
class Session:
    """One batch of prompts through the engine: :meth:`prefill`, then :meth:`decode` in one or more
    segments, then :meth:`result`. :func:`generate` and :func:`generate_stream` are the usual entries;
    ``timings`` holds ``compile_s``, ``prefill_s``, ``decode_s`` (device time, compilation excluded),
    ``prompt_tokens`` (real ones) and ``generated_tokens``.

    ``slots`` overrides the bucketed cache size (at least the bucketed prompt plus ``max_new_tokens``).
    ``cast_weights``: weights stored wider than ``config.dtype`` (float32 master weights) are cast to it
    once, here, instead of in every step (``m1_jax.model.compute_weights``; same results, half the weight
    bytes per decode step, and a 16-bit copy of the weights held while the session lives).
    """

    def __init__(self, model, input_ids, *, max_new_tokens: int, lengths=None, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 stop_tokens: Sequence[int] = (), prefill_chunk: int | None = None,
                 certain_stop: tuple[int, float] | None = None, slots: int | None = None,
                 cast_weights: bool = True):
        c = model.config
        ids, lens, stops, certain = check_request(
            c, input_ids, max_new_tokens=max_new_tokens, lengths=lengths, temperature=temperature, top_k=top_k,
            top_p=top_p, stop_tokens=stop_tokens, prefill_chunk=prefill_chunk, certain_stop=certain_stop)
        B, T = ids.shape
        self.config, self.batch, self.max_new_tokens = c, B, int(max_new_tokens)
        self.chunk = int(prefill_chunk) if prefill_chunk is not None else default_prefill_chunk(B)
        self.prompt_len = prompt_bucket(T, self.chunk)
        self.new_bucket = new_tokens_bucket(self.max_new_tokens)
        need = self.prompt_len + self.max_new_tokens
        if slots is not None and (not isinstance(slots, int) or slots < need):
            raise ValueError(f"slots must be an int >= the bucketed prompt ({self.prompt_len}) + max_new_tokens "
                             f"({self.max_new_tokens}) = {need}; got {slots!r}")
        self.slots = slots if slots is not None else slots_bucket(self.prompt_len + self.new_bucket)
        padded = np.zeros((B, self.prompt_len), np.int32)
        padded[:, self.prompt_len - T:] = ids  # more left padding: exact (masked everywhere)
        self.ids = padded
        self.kv_start = (self.prompt_len - lens).astype(np.int32)
        self.real_prompt_tokens = int(lens.sum())
        self.mode = SamplingMode(greedy=float(temperature) == 0.0, top_k=None if temperature == 0 else top_k,
                                 use_top_p=top_p is not None and temperature != 0)
        self.certain_n = certain[0] if certain else 0
        n_stops = max(8, 1 << max(0, len(stops) - 1).bit_length())
        stop_arr = np.full((n_stops,), -1, np.int32)
        stop_arr[:len(stops)] = stops
        self.settings = Settings(jnp.float32(temperature if temperature else 1.0),
                                 jnp.float32(top_p if top_p is not None else 1.0),
                                 jnp.float32(certain[1] if certain else 1.0), jnp.asarray(stop_arr))
        self.key = jax.random.key(int(seed))
        self.graphdef, self.params = nnx.split(model)
        self.state: DecodeState | None = None
        self.executables: dict = {}
        self.timings = dict(compile_s=0.0, prefill_s=0.0, decode_s=0.0, prompt_tokens=self.real_prompt_tokens,
                            generated_tokens=0)
        if cast_weights and needs_cast(self.params, c):  # float32 master weights: cast once, not every step
            cast = self._exe("cast_weights", c, functools.partial(cast_to_compute_dtype, config=c), (self.params,))
            self.params = cast(self.params)

    # -- compiled pieces (AOT, cached per bucket)
    def _exe(self, name, static, fn, args, donate=()):
        key = (static, jax.sharding.get_abstract_mesh())
        exe, dt = compiled.get(name, key, fn, args, donate_argnums=donate)
        self.timings["compile_s"] += dt
        self.executables[name] = exe  # for memory_analysis() in benchmarks
        return exe

    def init_cache(self) -> Cache:
        c, B, S = self.config, self.batch, self.slots
        kv = jnp.asarray(self.kv_start)
        exe = self._exe("init", (c, B, S), lambda kv: init_cache(c, B, S, kv_start=kv), (kv,))
        return exe(kv)

    def prefill(self) -> None:
        """All prompt chunks (each compiled once per shape), then the first sampled token."""
        cache = self.init_cache()
        C = min(self.chunk, self.prompt_len)
        chunks = [self.ids[:, i:i + C] for i in range(0, self.prompt_len, C)]
        prefill = self._exe("prefill", self.graphdef, _prefill_fn(self.graphdef), (self.params, chunks[0], cache),
                            donate=(2,))
        t0 = time.perf_counter()
        for ch in chunks:
            logits, cache = prefill(self.params, ch, cache)
        jax.block_until_ready(logits)
        spent = time.perf_counter() - t0
        # compiled for the logits as they come (their sharding on a mesh), so after the chunks ran
        start = self._exe("start", (self.mode, self.certain_n, self.new_bucket),
                          _start_fn(self.mode, self.certain_n, self.new_bucket),
                          (logits, self.key, self.settings, cache), donate=(3,))
        t0 = time.perf_counter()
        self.state = start(logits, self.key, self.settings, cache)
        jax.block_until_ready(self.state.tokens)
        self.timings["prefill_s"] += spent + time.perf_counter() - t0

    def start_from_cache(self, cache: Cache, logits) -> None:
        """Begin decoding from a given cache and last-position logits (benchmarks fill a cache of the
        right length instead of prefilling it)."""
        start = self._exe("start", (self.mode, self.certain_n, self.new_bucket),
                          _start_fn(self.mode, self.certain_n, self.new_bucket),
                          (logits, self.key, self.settings, cache), donate=(3,))
        self.state = start(logits, self.key, self.settings, cache)

    def decode(self, until: int | None = None) -> None:
        """Run the on-device loop until ``until`` tokens (default ``max_new_tokens``) or every row is done."""
        if self.state is None:
            raise RuntimeError("Session.decode: call prefill() first")
        n = self.max_new_tokens if until is None else min(int(until), self.max_new_tokens)
        target = jnp.int32(n)
        decode = self._exe("decode", (self.graphdef, self.mode, self.certain_n),
                           _decode_fn(self.graphdef, self.mode, self.certain_n),
                           (self.params, self.state, target, self.settings), donate=(1,))
        t0 = time.perf_counter()
        self.state = decode(self.params, self.state, target, self.settings)
        jax.block_until_ready(self.state.step)
        self.timings["decode_s"] += time.perf_counter() - t0

    def result(self):
        """``(tokens [B, max_new_tokens] int32, logprobs float32, lengths [B] int32)`` as numpy; entries after a
        row's end repeat its last token with log-probability 0."""
        s = jax.device_get((self.state.tokens, self.state.logprobs, self.state.lengths))
        tokens, logprobs, lengths = (np.array(a) for a in s)
        tokens, logprobs = tokens[:, :self.max_new_tokens], logprobs[:, :self.max_new_tokens]
        col = np.arange(self.max_new_tokens)[None, :]
        after = col >= lengths[:, None]
        last = tokens[np.arange(self.batch), np.maximum(lengths - 1, 0)]
        tokens = np.where(after, last[:, None], tokens)
        logprobs = np.where(after, 0.0, logprobs).astype(np.float32)
        self.timings["generated_tokens"] = int(lengths.sum())
        return tokens.astype(np.int32), logprobs, lengths.astype(np.int32)


# ------------------------------------------------------------------------------------- public entries
def generate(model, input_ids, *, max_new_tokens: int, lengths=None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_tokens: Sequence[int] = (),
             prefill_chunk: int | None = None, return_lengths: bool = False,
             certain_stop: tuple[int, float] | None = None, cast_weights: bool = True):
    """Generate up to ``max_new_tokens`` after left-padded prompts, on the device.

    Args:
      model: a ``MiniMaxForCausalLM`` (on one device, or sharded on the mesh set by ``jax.set_mesh``).
      input_ids: int ``[B, T]``, left-padded; ``lengths [B]`` the real prompt lengths (all of T if omitted).
      max_new_tokens: tokens to generate per row (>= 1); the longest prompt plus this must fit the model's
        ``max_position_embeddings``.
      temperature: 0 is greedy; otherwise ``top_k`` / ``top_p`` filter the scaled distribution.
      seed: the sampling key; the same seed gives the same samples.
      stop_tokens: a row that emits one of these is done.
      prefill_chunk: prompt tokens per prefill forward (None: about 16K tokens per forward over the batch);
        the result does not depend on it.
      return_lengths: also return ``lengths [B]`` int32, the tokens generated per row (its stop token
        included).
      certain_stop: ``(n, p)``: a row is also done once its last ``n`` sampled tokens each had probability
        ``>= p`` under the model (the M1 recipe's stop for repetitive rollouts); rows stopped early are
        padded like rows that hit a stop token.
      cast_weights: weights stored wider than ``config.dtype`` (float32 master weights with bfloat16
        compute) are cast to it once before generating instead of in every step; the results are the same
        (see :class:`Session`). False saves the 16-bit copy's memory.

    Returns:
      ``(tokens [B, max_new_tokens] int32, logprobs [B, max_new_tokens] float32)``, plus ``lengths`` with
      ``return_lengths=True``. ``logprobs`` are under the model's own distribution (temperature 1, no
      filtering; float32, LM head in float32). After a row is done its entries repeat its last token with
      log-probability 0.
    """
    session = Session(model, input_ids, max_new_tokens=max_new_tokens, lengths=lengths, temperature=temperature,
                      top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop_tokens, prefill_chunk=prefill_chunk,
                      certain_stop=certain_stop, cast_weights=cast_weights)
    session.prefill()
    session.decode()
    tokens, logprobs, lens = session.result()
    out = (jnp.asarray(tokens), jnp.asarray(logprobs))
    return (*out, jnp.asarray(lens)) if return_lengths else out


def generate_stream(model, input_ids, *, max_new_tokens: int, stream_every: int = 16, timings: dict | None = None,
                    **kwargs) -> Iterator[StreamChunk]:
    """Like :func:`generate` (same keyword arguments), yielding a :class:`StreamChunk` every
    ``stream_every`` tokens (one compiled loop resumed per chunk). ``timings``, if given, is filled with
    the session's timings (compile, prefill and decode seconds, token counts) as generation proceeds."""
    if not isinstance(stream_every, int) or stream_every < 1:
        raise ValueError(f"stream_every must be an int >= 1; got {stream_every!r}")
    session = Session(model, input_ids, max_new_tokens=max_new_tokens, **kwargs)
    if timings is not None:
        timings.update(session.timings)
        session.timings = timings
    session.prefill()
    emitted = 0
    while True:
        session.decode(until=min(emitted + stream_every, max_new_tokens))
        s = jax.device_get((session.state.tokens, session.state.logprobs, session.state.done,
                            session.state.lengths, session.state.step))
        tokens, logprobs, done, lengths, step = (np.asarray(a) for a in s)
        step = int(step)
        session.timings["generated_tokens"] = int(lengths.sum())
        yield StreamChunk(tokens[:, emitted:step], logprobs[:, emitted:step], done, lengths)
        emitted = step
        if step >= max_new_tokens or done.all():
            return
