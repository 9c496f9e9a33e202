"""The text sample printed at the end of a run: cached decoding through ``m1_jax.generate``."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from m1_jax.inference import generate


def sample_tokens(graphdef, params, prompt_ids, num_tokens: int, *, temperature: float = 0.8, seed: int = 0):
    """``prompt_ids`` (1-D ints) + ``num_tokens`` sampled ids (temperature 0 = greedy)."""
    prompt = np.asarray(prompt_ids, np.int32)
    if prompt.ndim != 1 or prompt.shape[0] == 0:
        raise ValueError("sample: the prompt must hold at least one token")
    model = nnx.merge(graphdef, params)
    tokens, _ = generate(model, prompt[None], max_new_tokens=num_tokens, temperature=temperature, seed=seed)[:2]
    return [int(t) for t in prompt] + [int(t) for t in np.asarray(tokens[0])]


def print_sample(graphdef, state, tokenizer, train_cfg, mesh, say) -> str | None:
    """Sample ``TrainConfig.sample_tokens`` tokens after ``sample_prompt`` (token 0 when empty), print and
    return the text; ``None`` when ``sample_tokens`` is 0. Every process takes part (the parameters may be
    sharded); one prints."""
    tc = train_cfg
    if tc.sample_tokens <= 0:
        return None
    prompt = tokenizer.encode(tc.sample_prompt) if tc.sample_prompt else np.asarray([0], np.int32)
    with jax.set_mesh(mesh):
        ids = sample_tokens(graphdef, state["params"], prompt, tc.sample_tokens, temperature=tc.sample_temperature,
                            seed=tc.seed)
    text = tokenizer.decode(ids)
    say(f"\n--- sample (step {int(jax.device_get(state['step']))}, temperature {tc.sample_temperature}) ---\n"
        f"{text}\n---")
    return text
