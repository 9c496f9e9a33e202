"""The generation engine against the model's own full forward (teacher forcing), each prompt alone,
one-shot prefill, and transformers' generate; sampling, stops, request errors and compile counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1_jax import MiniMaxForCausalLM, ModelConfig, generate, generate_stream
from m1_jax.config import FULL, LINEAR
from m1_jax.inference import compile_stats

V = 61
LENS = (11, 6, 1)


@pytest.fixture(scope="module")
def model():
    c = ModelConfig.preset("tiny", num_hidden_layers=4, layer_types=(LINEAR, FULL) * 2, block_size=4, vocab_size=V,
                           moe_impl="dense")
    return MiniMaxForCausalLM(c, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, V, n) for n in LENS]
    ids = np.zeros((len(rows), max(LENS)), np.int32)
    for r, p in enumerate(rows):
        ids[r, ids.shape[1] - len(p):] = p  # left padding
    return rows, ids


@pytest.fixture(scope="module")
def greedy(model, prompts):
    return generate(model, prompts[1], max_new_tokens=7, lengths=LENS)


_forward = nnx.jit(lambda model, ids: model(ids))


def full_forward_logits(model, prompts, tokens):
    """Per row, the logits that predicted each generated token, from one uncached forward over prompt +
    tokens (rows right-padded to one length: causal, so padding after a row never changes it)."""
    n = tokens.shape[1]
    seqs = np.zeros((len(prompts), max(len(p) for p in prompts) + n), np.int32)
    for r, p in enumerate(prompts):
        seqs[r, :len(p) + n] = list(p) + list(np.asarray(tokens[r]))
    logits = _forward(model, jnp.asarray(seqs))
    return [logits[r, len(p) - 1:len(p) - 1 + n] for r, p in enumerate(prompts)]


def test_greedy_tokens_and_logprobs_equal_the_full_forward_at_every_step(model, prompts, greedy):
    tokens, logprobs = greedy
    assert tokens.shape == (3, 7) and tokens.dtype == jnp.int32 and logprobs.dtype == jnp.float32
    for r, logits in enumerate(full_forward_logits(model, prompts[0], tokens)):
        assert list(np.asarray(jnp.argmax(logits, -1))) == list(np.asarray(tokens[r]))
        ref = jax.nn.log_softmax(logits)[jnp.arange(7), tokens[r]]
        np.testing.assert_allclose(np.asarray(logprobs[r]), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_a_batch_equals_each_prompt_alone(model, prompts, greedy):
    for r, p in enumerate(prompts[0]):
        alone, lp = generate(model, p[None].astype(np.int32), max_new_tokens=7)
        assert np.array_equal(np.asarray(alone[0]), np.asarray(greedy[0][r]))
        np.testing.assert_allclose(np.asarray(lp[0]), np.asarray(greedy[1][r]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [4, 11, 64])  # smaller and not dividing, equal to, larger than the prompt
def test_chunked_prefill_equals_one_shot(model, prompts, greedy, chunk):
    tokens, logprobs = generate(model, prompts[1], max_new_tokens=7, lengths=LENS, prefill_chunk=chunk)
    assert np.array_equal(np.asarray(tokens), np.asarray(greedy[0]))
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(greedy[1]), rtol=1e-5, atol=1e-5)


def test_prompts_of_one_bucket_share_every_compiled_function(model, prompts, greedy):
    before = compile_stats()["compiles"]
    rng = np.random.default_rng(5)
    ids = rng.integers(0, V, (3, 9)).astype(np.int32)  # another length, same bucket (16), other max_new_tokens
    generate(model, ids, max_new_tokens=5, lengths=[9, 2, 4], stop_tokens=(3,))
    assert compile_stats()["compiles"] == before


def nucleus(logits, top_k, top_p):
    """Token ids a top-k-then-top-p sampler at temperature 1 may draw (NumPy, float64)."""
    z = np.asarray(logits, np.float64)
    order = np.argsort(-z)[:top_k]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    before = np.cumsum(p) - p  # mass strictly above each candidate
    return set(order[before < top_p].tolist())


def test_sampling_seeds_filters_and_model_logprobs(model, prompts):
    ids, kw = prompts[1], dict(max_new_tokens=7, lengths=LENS, temperature=1.0, top_k=3, top_p=0.5)
    a, la = generate(model, ids, seed=7, **kw)
    b, lb = generate(model, ids, seed=7, **kw)
    c, _ = generate(model, ids, seed=8, **kw)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(la), np.asarray(lb))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    for r, logits in enumerate(full_forward_logits(model, prompts[0], a)):
        for i, t in enumerate(np.asarray(a[r])):  # inside the top-3, then inside their 0.5 nucleus
            assert int(t) in nucleus(logits[i], 3, 0.5), (r, i)
        # the model's own (temperature 1, unfiltered) log-probabilities of the sampled tokens
        ref = jax.nn.log_softmax(logits)[jnp.arange(7), a[r]]
        np.testing.assert_allclose(np.asarray(la[r]), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # a tiny nucleus keeps only the most likely token: greedy
    g, _ = generate(model, ids, max_new_tokens=7, lengths=LENS, temperature=0.7, top_k=3, top_p=1e-6, seed=4)
    for r, logits in enumerate(full_forward_logits(model, prompts[0], g)):
        assert list(np.asarray(jnp.argmax(logits, -1))) == list(np.asarray(g[r]))


def test_stop_tokens_lengths_and_certain_stop(model, prompts, greedy):
    tokens, logprobs = (np.asarray(x) for x in greedy)
    stop = int(tokens[0, 2])
    t, lp, n = (np.asarray(x) for x in generate(model, prompts[1], max_new_tokens=7, lengths=LENS,
                                                 stop_tokens=(stop,), return_lengths=True))
    for r in range(3):  # each row ends at its first stop token (included), then repeats it with logprob 0
        hits = np.flatnonzero(tokens[r] == stop)
        end = hits[0] + 1 if hits.size else 7
        assert n[r] == end and n.dtype == np.int32
        assert np.array_equal(t[r, :end], tokens[r, :end]) and np.all(t[r, end:] == t[r, end - 1])
        assert np.allclose(lp[r, :end], logprobs[r, :end], atol=1e-5) and np.all(lp[r, end:] == 0)
    # certain_stop=(2, p): done once two tokens in a row each had probability >= p (p: between two of the
    # observed probabilities near the median, so rounding cannot move a token across it)
    probs = np.exp(logprobs)
    ranked = np.sort(probs.ravel())
    p = float(ranked[10] + ranked[11]) / 2
    t, lp, n = (np.asarray(x) for x in generate(model, prompts[1], max_new_tokens=7, lengths=LENS,
                                                 certain_stop=(2, p), return_lengths=True))
    for r in range(3):
        sure = probs[r] >= p
        runs = [i for i in range(1, 7) if sure[i] and sure[i - 1]]
        end = runs[0] + 1 if runs else 7
        assert n[r] == end, (r, probs[r], p)
        assert np.array_equal(t[r, :end], tokens[r, :end]) and np.all(lp[r, end:] == 0)


def test_streaming_yields_the_same_tokens_with_timings(model, prompts, greedy):
    timings = {}
    chunks = list(generate_stream(model, prompts[1], max_new_tokens=7, lengths=LENS, stream_every=3, timings=timings))
    assert [c.tokens.shape[1] for c in chunks] == [3, 3, 1]
    assert np.array_equal(np.concatenate([c.tokens for c in chunks], axis=1), np.asarray(greedy[0]))
    assert timings["prompt_tokens"] == sum(LENS) and timings["generated_tokens"] == 21
    assert timings["prefill_s"] > 0 and timings["decode_s"] > 0 and "compile_s" in timings


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(max_new_tokens=-3), "max_new_tokens must be an int >= 1"),
    (dict(max_new_tokens=4096), "exceeds the model's positions"),
    (dict(max_new_tokens=2, lengths=[0, 3]), "lengths"),
    (dict(max_new_tokens=2, prefill_chunk=0), "prefill_chunk"),
    (dict(max_new_tokens=2, prefill_chunk=2.5), "prefill_chunk"),
    (dict(max_new_tokens=2, top_p=1.5), "top_p"),
    (dict(max_new_tokens=2, top_k=0), "top_k"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=2, stop_tokens=(V,)), "stop_tokens"),
    (dict(max_new_tokens=2, certain_stop=(0, 0.9)), "certain_stop"),
    (dict(max_new_tokens=2, certain_stop=(3, 1.5)), "certain_stop"),
])
def test_bad_requests_fail_before_any_compute(model, kwargs, message):
    before = compile_stats()["compiles"]
    with pytest.raises(ValueError, match=message):
        generate(model, np.ones((2, 3), np.int32), **kwargs)
    assert compile_stats()["compiles"] == before


@pytest.mark.parametrize("ids, message", [
    (np.zeros((2, 0), np.int32), "empty prompt"),
    (np.array([[1, V]], np.int32), f"found {V}.*vocab_size = {V}"),
    (np.array([[-1, 2]], np.int32), "found -1"),
    (np.ones((3,), np.int32), r"\[batch, prompt_len\]"),
    (np.ones((1, 3), np.float32), "integer dtype"),
])
def test_bad_prompts_are_named(model, ids, message):
    with pytest.raises(ValueError, match=message):
        generate(model, ids, max_new_tokens=2)


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
    tokens, _ = generate(ours, prompt.astype(np.int32), max_new_tokens=8, prefill_chunk=4)
    assert list(np.asarray(tokens[0])) == ref[0, 9:].tolist()


def test_fused_decode_experts_generate_what_the_batched_products_do():
    """``moe_decode="fused"`` (the two Triton-lowered expert kernels, here in the Pallas interpreter) against
    the default batched products: the same greedy tokens and log-probabilities, float32, 16 experts."""
    c = ModelConfig.preset("tiny", num_hidden_layers=2, layer_types=(LINEAR, FULL), block_size=4, vocab_size=V,
                           num_local_experts=16, moe_impl="gmm")
    batched = MiniMaxForCausalLM(c, rngs=nnx.Rngs(2))
    fused = MiniMaxForCausalLM(c.replace(moe_decode="fused"), rngs=nnx.Rngs(2))
    ids = np.random.default_rng(4).integers(0, V, (2, 5)).astype(np.int32)
    a = generate(batched, ids, max_new_tokens=5, lengths=[5, 3])
    b = generate(fused, ids, max_new_tokens=5, lengths=[5, 3])
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b[1]), rtol=1e-5, atol=1e-5)
