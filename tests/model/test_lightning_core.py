"""The chunked lightning core against the token recurrence and an independent float64 NumPy loop."""

import numpy as np
import jax.numpy as jnp
import pytest

from pallas_kernels import lightning_attention
from pallas_kernels.lightning import lightning_attention_chunked, lightning_attention_recurrent

DECAYS = np.array([0.9, 0.3, 0.05, 1e-2, 1e-3, 1e-4, 3e-5, 1e-5], np.float32)


def numpy_recurrence(q, k, v, decay, s0=None, seg=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, H, T, Dk = q.shape
    S = np.zeros((B, H, Dk, v.shape[-1])) if s0 is None else np.asarray(s0, np.float64).copy()
    o = np.zeros(v.shape)
    g = np.exp(-np.asarray(decay, np.float64))
    for t in range(T):
        keep = np.ones(B) if seg is None or t == 0 else (seg[:, t] == seg[:, t - 1]).astype(np.float64)
        S = keep[:, None, None, None] * g[None, :, None, None] * S + np.einsum("bhk,bhv->bhkv", k[:, :, t], v[:, :, t])
        o[:, :, t] = np.einsum("bhk,bhkv->bhv", q[:, :, t], S)
    return o, S


def random_inputs(rng, B, H, T, Dk, Dv):
    q = rng.standard_normal((B, H, T, Dk)).astype(np.float32) * 0.5
    k = rng.standard_normal((B, H, T, Dk)).astype(np.float32) * 0.5
    v = rng.standard_normal((B, H, T, Dv)).astype(np.float32)
    s0 = rng.standard_normal((B, H, Dk, Dv)).astype(np.float32)
    return q, k, v, s0


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("T, block", [(1, 16), (15, 16), (16, 16), (53, 16), (100, 32), (64, 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_and_scan_match_float64_numpy(T, block, with_state):
    rng = np.random.default_rng(T * 7 + block + with_state)
    q, k, v, s0 = random_inputs(rng, 2, 8, T, 16, 12)
    s0 = s0 if with_state else None
    o_ref, s_ref = numpy_recurrence(q, k, v, DECAYS, s0)
    o_c, s_c = lightning_attention_chunked(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(DECAYS),
                                           None if s0 is None else jnp.asarray(s0), block)
    o_s, s_s = lightning_attention_recurrent(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(DECAYS),
                                             None if s0 is None else jnp.asarray(s0))
    for o, s in ((o_c, s_c), (o_s, s_s)):
        assert o.dtype == jnp.float32 and s.dtype == jnp.float32
        assert rel(o, o_ref) < 2e-5 and rel(s, s_ref) < 2e-5


def test_block_size_changes_rounding_only():
    rng = np.random.default_rng(3)
    q, k, v, s0 = (jnp.asarray(x) for x in random_inputs(rng, 1, 8, 77, 8, 8))
    outs = [lightning_attention(q, k, v, jnp.asarray(DECAYS), initial_state=s0, block_size=c, backend="reference")
            for c in (1, 8, 16, 77, 128)]
    for o, s in outs[1:]:
        assert rel(o, np.asarray(outs[0][0], np.float64)) < 1e-5 and rel(s, np.asarray(outs[0][1], np.float64)) < 1e-5


def test_segment_ids_restart_the_state_at_document_starts():
    rng = np.random.default_rng(4)
    q, k, v, s0 = random_inputs(rng, 2, 8, 45, 8, 8)
    seg = np.stack([np.repeat([0, 1, 2], [10, 20, 15]), np.repeat([5, 6], [33, 12])]).astype(np.int32)
    o_ref, s_ref = numpy_recurrence(q, k, v, DECAYS, s0, seg)
    o, s = lightning_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(DECAYS),
                               initial_state=jnp.asarray(s0), block_size=16, backend="reference",
                               segment_ids=jnp.asarray(seg))
    assert rel(o, o_ref) < 2e-5 and rel(s, s_ref) < 2e-5
    # A later document is exactly that document processed alone from a zero state.
    alone, _ = numpy_recurrence(q[:1, :, 10:30], k[:1, :, 10:30], v[:1, :, 10:30], DECAYS)
    assert rel(np.asarray(o)[:1, :, 10:30], alone) < 2e-5


def test_bfloat16_inputs_keep_a_float32_state():
    rng = np.random.default_rng(5)
    q, k, v, _ = random_inputs(rng, 1, 8, 70, 16, 16)
    o_ref, s_ref = numpy_recurrence(q, k, v, DECAYS)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    o, s = lightning_attention(*bf, jnp.asarray(DECAYS), block_size=32, backend="reference")
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert rel(o.astype(jnp.float32), o_ref) < 3e-2 and rel(s, s_ref) < 3e-2


@pytest.mark.parametrize("bad, message", [
    (dict(decay=np.ones(3, np.float32)), "decay must be \\[H\\]"),
    (dict(initial_state=np.ones((1, 8, 4, 4), np.float32)), "initial_state must be"),
    (dict(backend="cuda"), "backend='cuda'"),
])
def test_op_input_errors(bad, message):
    rng = np.random.default_rng(6)
    q, k, v, _ = random_inputs(rng, 1, 8, 10, 8, 8)
    args = dict(decay=DECAYS, initial_state=None, backend="reference")
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        lightning_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(args.pop("decay")), **args)
