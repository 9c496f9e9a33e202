"""Rollouts: prompts -> G samples each through ``m1_jax.generate`` -> responses, rewards, update rows.

The sampler's log-probabilities (``generate`` returns them under the model's own temperature-1
distribution) are the old log-probabilities of the update. Update rows put each prompt at position 0
(no left padding), then its response, then padding: the same positions the sampler used (it counts
positions from a row's first real token), and the causal model ignores the padding at the end.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from m1_jax.config import ConfigError
from m1_jax.rl.tasks import Example


def stop_token_ids(tokenizer, stop_text: str) -> tuple[int, ...]:
    """The stop token(s): ``stop_text`` (which must be one token) and the tokenizer's EOS, if any."""
    ids = [int(i) for i in tokenizer.encode(stop_text)]
    if len(ids) != 1:
        raise ConfigError(f"RLConfig.stop_text = {stop_text!r} is invalid: expected one token, the tokenizer makes "
                          f"{len(ids)} ({ids})")
    eos = getattr(tokenizer, "eos_id", None)
    return tuple(ids) + ((int(eos),) if eos is not None and int(eos) != ids[0] else ())


def encode_prompts(tokenizer, prompts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ``[B, max_len]`` int32 ids (padding id 0) and the real lengths ``[B]``."""
    ids = np.zeros((len(prompts), max_len), np.int32)
    lengths = np.zeros(len(prompts), np.int32)
    for i, p in enumerate(prompts):
        t = np.asarray(tokenizer.encode(p), np.int32)
        if not 1 <= len(t) <= max_len:
            raise ValueError(f"prompt {p!r} has {len(t)} tokens: expected 1 to RLConfig.max_prompt_len = {max_len}")
        ids[i, max_len - len(t):] = t
        lengths[i] = len(t)
    return ids, lengths


def sample(model, ids: np.ndarray, lengths: np.ndarray, *, max_new_tokens: int, temperature: float, seed: int,
           stop_tokens: Sequence[int], certain_stop: tuple[int, float] | None = None):
    """The one call to ``m1_jax.generate`` of the RL loop: ``(tokens [B, R], logprobs [B, R], lengths [B])``
    as NumPy, ``lengths`` the tokens generated per row (stop token included)."""
    from m1_jax import generate

    tokens, logprobs, n = generate(model, ids, lengths=lengths, max_new_tokens=max_new_tokens, temperature=temperature,
                                   seed=seed, stop_tokens=tuple(stop_tokens), return_lengths=True,
                                   certain_stop=certain_stop)
    return np.asarray(tokens), np.asarray(logprobs), np.asarray(n)


@dataclasses.dataclass
class Rollout:
    """``B`` responses: row ``i`` answers ``examples[i]`` (each prompt repeated ``group_size`` times in a row)."""

    examples: list[Example]
    prompt_ids: np.ndarray  # [B, max_prompt_len] left-padded
    prompt_lengths: np.ndarray  # [B]
    tokens: np.ndarray  # [B, R]
    logprobs: np.ndarray  # [B, R] the sampler's, 0 past a row's length
    lengths: np.ndarray  # [B] tokens generated, stop token included
    stopped: np.ndarray  # [B] bool: ended on a stop token
    responses: list[str]  # decoded, stop token dropped
    rewards: np.ndarray | None = None  # [B] float32

    def __len__(self):
        return len(self.examples)


def rollout(model, tokenizer, examples: Sequence[Example], *, group_size: int, max_prompt_len: int,
            max_response_len: int, temperature: float, seed: int, stop_tokens: Sequence[int],
            certain_stop: tuple[int, float] | None = None) -> Rollout:
    """``group_size`` samples for each example (one ``generate`` call for all of them)."""
    rows = [ex for ex in examples for _ in range(group_size)]
    ids, plen = encode_prompts(tokenizer, [ex.prompt for ex in rows], max_prompt_len)
    tokens, logprobs, n = sample(model, ids, plen, max_new_tokens=max_response_len, temperature=temperature, seed=seed,
                                 stop_tokens=stop_tokens, certain_stop=certain_stop)
    stops = np.asarray(list(stop_tokens), np.int32)
    last = tokens[np.arange(len(rows)), np.maximum(n - 1, 0)]
    stopped = (n > 0) & np.isin(last, stops)
    responses = [tokenizer.decode(tokens[i, :n[i] - int(stopped[i])]) for i in range(len(rows))]
    logprobs = np.where(np.arange(tokens.shape[1])[None] < n[:, None], logprobs, 0.0).astype(np.float32)
    return Rollout(rows, ids, plen, tokens, logprobs, n.astype(np.int32), stopped, responses)


def update_rows(r: Rollout, seq_len: int) -> dict[str, np.ndarray]:
    """Rows for the update: ``inputs``/``targets`` ``[B, seq_len - 1]`` int32, ``mask`` (1 on response tokens,
    stop token included) and ``old_logp`` (the sampler's log-probability of each target) float32."""
    B, R = r.tokens.shape
    row = np.zeros((B, seq_len), np.int32)
    mask = np.zeros((B, seq_len - 1), np.float32)
    old = np.zeros((B, seq_len - 1), np.float32)
    for i in range(B):
        p, n = int(r.prompt_lengths[i]), int(r.lengths[i])
        if p + n > seq_len:
            raise ValueError(f"row {i}: prompt {p} + response {n} tokens exceed {seq_len}")
        row[i, :p] = r.prompt_ids[i, -p:]
        row[i, p:p + n] = r.tokens[i, :n]
        mask[i, p - 1:p - 1 + n] = 1.0  # target t predicts row[t + 1]
        old[i, p - 1:p - 1 + n] = r.logprobs[i, :n]
    return {"inputs": row[:, :-1], "targets": row[:, 1:], "mask": mask, "old_logp": old}


def supervised_rows(tokenizer, examples: Sequence[Example], stop_token: int, seq_len: int) -> dict[str, np.ndarray]:
    """The warm-up batch: ``prompt answer <stop>`` per row, loss on the answer and the stop token (the
    pretraining step's ``inputs, targets, segment_ids, loss_mask``)."""
    B = len(examples)
    row = np.zeros((B, seq_len + 1), np.int32)
    seg = np.zeros((B, seq_len), np.int32)
    mask = np.zeros((B, seq_len), np.float32)
    for i, ex in enumerate(examples):
        p = np.asarray(tokenizer.encode(ex.prompt), np.int32)
        a = np.concatenate([np.asarray(tokenizer.encode(ex.answer), np.int32), [stop_token]]).astype(np.int32)
        n = len(p) + len(a)
        if n > seq_len + 1:
            raise ValueError(f"warm-up example {ex.prompt!r} -> {ex.answer!r} has {n} tokens: more than "
                             f"RLConfig.max_prompt_len + max_response_len = {seq_len}")
        row[i, :n] = np.concatenate([p, a])
        seg[i, :n - 1] = 1
        mask[i, len(p) - 1:n - 1] = 1.0
    return {"inputs": row[:, :-1], "targets": row[:, 1:], "segment_ids": seg, "loss_mask": mask}


class WarmupBatches:
    """Batch source of the supervised warm-up (the pretraining loop's ``source``): task examples as rows."""

    def __init__(self, prompts, tokenizer, *, batch_size: int, seq_len: int, stop_token: int):
        self.prompts, self.tokenizer = prompts, tokenizer
        self.batch_size, self.seq_len, self.stop_token = batch_size, seq_len, stop_token

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return supervised_rows(self.tokenizer, self.prompts.take(self.batch_size), self.stop_token, self.seq_len)

    def get_state(self):
        return self.prompts.get_state()

    def set_state(self, state) -> None:
        self.prompts.set_state(state)
