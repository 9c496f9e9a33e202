"""The end-of-run sample (m1_jax/train/sample.py): greedy ids equal an uncached argmax loop; the printed
text is the decoded prompt + sample; sample_tokens = 0 prints nothing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sharding
from m1_jax import MiniMaxForCausalLM, ModelConfig
from m1_jax.data.tokenizer import ByteTokenizer
from m1_jax.train.config import TrainConfig
from m1_jax.train.sample import print_sample, sample_tokens


def _jit_model(cfg, seed):
    """The model built under jit (eager construction is slow on a loaded CPU)."""
    from m1_jax.model import abstract_model

    graphdef, _ = abstract_model(cfg, seed)
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(seed)), nnx.Param))())


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.preset("tiny", num_hidden_layers=2, layer_types=("linear_attention", "full_attention"),
                             block_size=8, initializer_range=0.3)  # large init: confident, varied argmaxes
    return _jit_model(cfg, 3)


def _greedy_reference(model, prompt, n):
    """The full forward over the whole sequence for every new token: no cache involved. Right padding to
    one fixed length (one compile) changes nothing before it (causal)."""
    ids = list(prompt)
    forward = nnx.jit(lambda m, x: m(x))
    for _ in range(n):
        row = np.zeros((1, len(prompt) + n), np.int32)
        row[0, :len(ids)] = ids
        ids.append(int(jnp.argmax(forward(model, jnp.asarray(row))[0, len(ids) - 1])))
    return ids


def test_greedy_sample_matches_uncached_argmax_and_prints_text(model):
    prompt = ByteTokenizer().encode("ROMEO:")
    graphdef, params = nnx.split(model, nnx.Param)
    got = sample_tokens(graphdef, params, prompt, 7, temperature=0.0)
    assert got == _greedy_reference(model, prompt, 7)
    assert len(set(got[len(prompt):])) > 1  # not a degenerate constant sample
    lines = []
    tc = dataclasses.replace(TrainConfig(), sample_tokens=7, sample_temperature=0.0, sample_prompt="ROMEO:")
    mesh = sharding.make_mesh(sharding.MeshConfig())
    state = {"params": params, "step": jnp.asarray(5, jnp.int32)}
    text = print_sample(graphdef, state, ByteTokenizer(), tc, mesh, lambda *a: lines.append(" ".join(a)))
    assert text == ByteTokenizer().decode(got)
    assert "sample (step 5, temperature 0.0)" in lines[0] and text in lines[0]
    assert print_sample(graphdef, state, ByteTokenizer(), dataclasses.replace(tc, sample_tokens=0), mesh,
                        lines.append) is None


def test_sampling_is_seeded_and_checks_the_prompt(model):
    graphdef, params = nnx.split(model, nnx.Param)
    prompt = ByteTokenizer().encode("JULIET")  # the shapes of the test above: no new compile
    a = sample_tokens(graphdef, params, prompt, 7, temperature=1.0, seed=1)
    b = sample_tokens(graphdef, params, prompt, 7, temperature=1.0, seed=1)
    c = sample_tokens(graphdef, params, prompt, 7, temperature=1.0, seed=2)
    assert a == b and a != c and a[:6] == list(prompt) and all(0 <= t < 256 for t in a)
    with pytest.raises(ValueError, match="at least one token"):
        sample_tokens(graphdef, params, np.zeros(0, np.int32), 3)
