"""The text sample printed at the end of a run: cached decoding through ``m1_jax.generate``."""

from __future__ import annotations

import numpy as np
from flax import nnx

from m1_jax.inference import generate


def sample_tokens(graphdef, params, prompt_ids, num_tokens: int, *, temperature: float = 0.8, seed: int = 0):
    """``prompt_ids`` (1-D ints) + ``num_tokens`` sampled ids (temperature 0 = greedy)."""
    prompt = np.asarray(prompt_ids, np.int32)
    if prompt.ndim != 1 or prompt.shape[0] == 0:
        raise ValueError("sample: the prompt must hold at least one token")
    model = nnx.merge(graphdef, params)
    tokens, _ = generate(model, prompt[None], max_new_tokens=num_tokens, temperature=temperature, seed=seed)
    return [int(t) for t in prompt] + [int(t) for t in np.asarray(tokens[0])]
