"""Cached generation against recomputing the whole sequence, and against transformers' generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1_jax import MiniMaxForCausalLM, ModelConfig, generate
from m1_jax.config import FULL, LINEAR


@pytest.fixture(scope="module")
def model():
    c = ModelConfig.preset("tiny", num_hidden_layers=4, layer_types=(LINEAR, FULL, LINEAR, LINEAR), block_size=4,
                           vocab_size=61)
    return MiniMaxForCausalLM(c, rngs=nnx.Rngs(0))


def check_greedy_by_teacher_forcing(model, prompt, tokens, logprobs):
    """One uncached forward over prompt + generated tokens: each generated token must be the argmax at
    its position and its log-probability the full-sequence one."""
    seq = jnp.asarray([list(prompt) + list(np.asarray(tokens))], jnp.int32)
    logits = model(seq)[0, len(prompt) - 1:-1]
    assert list(np.asarray(jnp.argmax(logits, -1))) == list(np.asarray(tokens))
    ref = jax.nn.log_softmax(logits)[jnp.arange(len(tokens)), jnp.asarray(tokens)]
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_greedy_with_caches_and_left_padding_equals_full_recompute(model):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 61, n) for n in (11, 6, 1)]
    ids = np.zeros((3, 11), np.int32)
    for r, p in enumerate(prompts):
        ids[r, 11 - len(p):] = p
    tokens, logprobs = generate(model, ids, max_new_tokens=7, lengths=[len(p) for p in prompts])
    assert tokens.shape == (3, 7) and tokens.dtype == jnp.int32 and logprobs.dtype == jnp.float32
    for r, p in enumerate(prompts):
        check_greedy_by_teacher_forcing(model, p, tokens[r], logprobs[r])


def test_sampling_filters_and_seed(model):
    ids = np.random.default_rng(1).integers(0, 61, (2, 5)).astype(np.int32)
    greedy, _ = generate(model, ids, max_new_tokens=4)
    top1, _ = generate(model, ids, max_new_tokens=4, temperature=1.3, top_k=1, seed=3)
    nucleus, _ = generate(model, ids, max_new_tokens=4, temperature=0.7, top_p=1e-6, seed=4)
    assert np.array_equal(np.asarray(top1), np.asarray(greedy)) and np.array_equal(np.asarray(nucleus), np.asarray(greedy))
    a, la = generate(model, ids, max_new_tokens=6, temperature=1.0, seed=7)
    b, lb = generate(model, ids, max_new_tokens=6, temperature=1.0, seed=7)
    c, _ = generate(model, ids, max_new_tokens=6, temperature=1.0, seed=8)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
    # Log-probabilities are the model's own (temperature 1) for the sampled tokens.
    seq = list(ids[0]) + list(np.asarray(a[0]))
    logits = model(jnp.asarray([seq], jnp.int32))[0]
    ref = jax.nn.log_softmax(logits[len(ids[0]) - 1:-1])[jnp.arange(6), jnp.asarray(a[0])]
    np.testing.assert_allclose(np.asarray(la[0]), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_top_k_samples_stay_in_the_top_k(model):
    ids = np.random.default_rng(2).integers(0, 61, (4, 3)).astype(np.int32)
    tokens, _ = generate(model, ids, max_new_tokens=1, temperature=5.0, top_k=3, seed=0)
    top3 = jax.lax.top_k(model(jnp.asarray(ids))[:, -1], 3)[1]
    assert all(int(tokens[r, 0]) in np.asarray(top3[r]) for r in range(4))


def test_stop_tokens_end_a_row(model):
    ids = np.random.default_rng(3).integers(0, 61, (2, 4)).astype(np.int32)
    greedy, _ = generate(model, ids, max_new_tokens=6)
    stop = int(greedy[0, 2])
    tokens, logprobs = generate(model, ids, max_new_tokens=6, stop_tokens=(stop,))
    first = list(np.asarray(tokens[0])).index(stop)
    assert np.all(np.asarray(tokens[0, first:]) == stop) and np.all(np.asarray(logprobs[0, first + 1:]) == 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2, lengths=[0, 3]), "lengths"),
    (dict(max_new_tokens=2, top_p=1.5), "top_p"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
])
def test_bad_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, np.ones((2, 3), np.int32), **kwargs)


def test_matches_transformers_greedy_generate(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from m1_jax import load_hf_checkpoint

    cfg = transformers.MiniMaxConfig(
        vocab_size=71, hidden_size=32, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, block_size=4,
        layer_types=[LINEAR, LINEAR, LINEAR, FULL], full_attn_alpha_factor=1.5, linear_attn_alpha_factor=1.5,
        mlp_alpha_factor=1.5, max_position_embeddings=128)
    torch.manual_seed(0)
    hf = transformers.MiniMaxForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    _, ours = load_hf_checkpoint(str(tmp_path))
    prompt = np.random.default_rng(4).integers(0, 71, (1, 9))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0)
    tokens, _ = generate(ours, prompt.astype(np.int32), max_new_tokens=8)
    assert list(np.asarray(tokens[0])) == ref[0, 9:].tolist()
