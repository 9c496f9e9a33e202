"""The fused dk/dv walk of the Mosaic GPU lightning backward (gpu_mosaic_dkdv), in the Mosaic GPU interpreter:
against the two walks it replaces and, through the public op, against the float32 recurrence and the chunked
reference's VJP (segments and packed documents included); where the backward takes it; its plan and shared
memory."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lightning import gpu_mosaic
from pallas_kernels.lightning import gpu_mosaic_dkdv as dkdv
from pallas_kernels.lightning import op as lop
from pallas_kernels.lightning import segments as sg
from test_lightning_kernels import assert_close, make, reference_f32, rel, value_and_grads
from test_lightning_mosaic import _segment_ids

pytestmark = pytest.mark.skipif(not gpu_mosaic.interpret_supported(),
                                reason="this JAX has no Mosaic GPU interpreter")
C = 64


def _padded(x, Tp):
    return {k: (jnp.pad(v, ((0, 0), (0, 0), (0, Tp - v.shape[2]), (0, 0))) if k in ("q", "k", "v", "do") else v)
            for k, v in x.items()}


@pytest.mark.parametrize("Dk,P,starts", [
    pytest.param(64, 1, None, marks=pytest.mark.full),
    (64, 3, ([5, 64, 130, 200],)),  # packed documents, starts at chunk edges, three segments
    pytest.param(128, 2, None, marks=pytest.mark.full),
], ids=["Dk64", "Dk64-P3-docs", "Dk128-P2"])
def test_fused_walk_matches_the_two_walks(Dk, P, starts):
    """Same dk, dv and leaving states as the separate dv and dk walks, from random entering states."""
    N = 4 if P in (1, 2) else 2 * P  # chunks, a multiple of P; the last one short
    Tp, T = N * C, (N - 1) * C + 5
    x = _padded(make(1, 2, T, Dk, jnp.float32, seed=Dk + P, Dv=128), Tp)
    lam = jnp.asarray([0.05, 0.3], jnp.float32)
    s_in = jax.random.normal(jax.random.PRNGKey(P), (1, 2, P, Dk, 128), jnp.float32)
    docs = None if starts is None else gpu_mosaic.doc_bounds(_segment_ids(T, starts), Tp, C, P)
    dk, dv, dS = dkdv.dkdv_walk(x["q"], x["k"], x["v"], x["do"], lam, s_in, T=T, C=C, docs=docs, interpret=True)
    kw = dict(T=T, C=C, interpret=True, docs=docs)
    dv_w, dS_w = gpu_mosaic._walk(x["k"], x["q"], x["do"], lam, s_in, reverse=True, BV=64, **kw)
    dk_w, _ = gpu_mosaic._walk(x["v"], x["do"], x["q"], lam, jnp.swapaxes(s_in, -1, -2), reverse=True, BV=64, **kw)
    for name, got, want in (("dk", dk, dk_w), ("dv", dv, dv_w), ("dS", dS, dS_w)):
        assert rel(got, want) < 1e-5, (name, rel(got, want))
    assert rel(dk, 0 * dk) > 0.1 and rel(dS, 0 * dS) > 0.1  # the walk wrote something


def _spy(monkeypatch):
    calls = []
    real = dkdv.dkdv_walk
    monkeypatch.setattr(dkdv, "dkdv_walk", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    return calls


def test_public_op_gradients_through_the_fused_walk(monkeypatch):
    """Dv = 128: the backward is the dq walk and the fused walk (an explicit segment count: the plan would
    keep three walks for a problem this small); float32 gradients against the references, with a random
    initial state and final-state cotangent, packed rows and two segments (unsplit and without documents:
    the walk comparison above and the full suite)."""
    calls = _spy(monkeypatch)
    T = 3 * C + 5
    x = make(1, 2, T, 64, jnp.float32, seed=5, Dv=128)
    seg = _segment_ids(T, ([40, 64, 129],))
    cases = ((2, seg), (1, None)) if os.environ.get("M1_FULL_TESTS") else ((2, seg),)
    for segments, ids in cases:
        f = lambda q, k, v, d, initial_state: lop.lightning_attention_kernel(  # noqa: E731
            q, k, v, d, initial_state=initial_state, impl="mosaic_gpu", interpret=True,
            tuning={"segments": segments}, segment_ids=ids)
        assert_close(value_and_grads(f, x), reference_f32(x, ids), 2e-5)
    assert len(calls) == len(cases)


@pytest.mark.parametrize("Dk,Dv,tuning,fused", [
    (64, 128, None, True), (128, 128, None, True), (64, 64, None, False), (128, 256, None, False),
    (64, 128, {"fused_dkdv": False}, False), (64, 128, dict(sg.LEGACY), False),
    (64, 128, {"fused_dkdv": "always"}, True), (64, 64, {"fused_dkdv": "always"}, False),
])
def test_where_the_backward_takes_the_fused_walk(monkeypatch, Dk, Dv, tuning, fused):
    calls = _spy(monkeypatch)
    x = make(1, 1, 100, Dk, jnp.bfloat16, seed=1, Dv=Dv)
    tuning = {"segments": 1, **(tuning or {})}  # the plan alone would keep three walks this small
    f = lambda q, k, v, d, initial_state: lop.lightning_attention_kernel(  # noqa: E731
        q, k, v, d, initial_state=initial_state, impl="mosaic_gpu", interpret=True, tuning=tuning)
    jax.make_jaxpr(lambda x: value_and_grads(f, x))(x)  # traced, not run
    assert bool(calls) == fused


def _plan(B, H, T, strat=None, **kw):
    """(segments, fused) of the backward with one program per column tile (the wide walks: test_lightning_wide)."""
    params = {k: v for k, v in sg.STRATEGY.items() if k not in ("lean", "reuse_states")}
    params.update(wide=False, **(strat or {}))
    N = T // C
    base = dict(Dx=128, Dy=128, BV=64, steps=3, lean=False, segments=None)
    fwd = sg.segments_for(B, H, 2, N, **base, **params)
    P, fused, wide = sg.backward_plan(B, H, 2, N, **{**base, **params, **kw}, fwd_segments=fwd)
    assert wide is False
    return P, fused


def test_backward_plan_chooses_the_form_and_its_segments(monkeypatch):
    """On 132 SMs: the fused walk where B * H fills the SMs or the sequence is split anyway, the three walks
    where the fused walk would leave half the SMs idle (B * H = 64, one program per (b, h)); a requested
    count is kept; the first rule never fuses unless asked."""
    monkeypatch.setattr(sg, "sm_count", lambda default=132: 132)
    assert _plan(16, 16, 16384, fused_dkdv=True) == (1, True)
    assert _plan(1, 64, 8192, fused_dkdv=True) == (1, False)
    P, fused = _plan(1, 8, 131072, fused_dkdv=True)
    assert fused and P * 8 >= 128  # one wave of fused programs on 132 SMs
    assert _plan(1, 64, 8192, fused_dkdv="always") == (2, True)  # the fused walk at its own count
    assert _plan(16, 16, 16384, fused_dkdv=False)[1] is False
    assert _plan(16, 16, 16384, fused_dkdv=True, segments=4) == (4, True)
    assert _plan(1, 8, 131072, fused_dkdv=False, strat=dict(rule="programs")) == (8, False)


def test_fused_walk_fits_in_shared_memory():
    assert dkdv.pipeline_steps(128, 3) == 2 and dkdv.pipeline_steps(64, 3) == 3
    for Dk in (64, 128):
        assert dkdv.smem_bytes(Dk, dkdv.pipeline_steps(Dk, 3)) <= 227 * 1024
    assert dkdv.smem_bytes(128, 3) > 227 * 1024  # why Dk = 128 takes two stages


def test_fused_dkdv_option_is_checked():
    x = make(1, 1, 100, 64, jnp.bfloat16, seed=1, Dv=128)
    f = lambda q, k, v, d, initial_state: lop.lightning_attention_kernel(  # noqa: E731
        q, k, v, d, initial_state=initial_state, impl="mosaic_gpu", interpret=True, tuning={"fused_dkdv": "yes"})
    with pytest.raises(ValueError, match="fused_dkdv='yes'"):
        jax.make_jaxpr(lambda x: value_and_grads(f, x))(x)


def test_fused_walk_rejects_other_head_dims():
    x = make(1, 1, 64, 64, jnp.float32, seed=0)
    with pytest.raises(ValueError, match="Dk=64, Dv=64"):
        dkdv.dkdv_walk(x["q"], x["k"], x["v"], x["do"], jnp.ones((1,)), jnp.zeros((1, 1, 1, 64, 64)), T=64, C=C,
                       interpret=True)
    assert not dkdv.supported(64, 64) and not dkdv.supported(256, 128) and dkdv.supported(128, 128)
    assert dkdv.supported(64, 128, interpret=True) and not dkdv.supported(64, 128)  # not compiled on a GPU yet
    assert np.isfinite(dkdv.smem_bytes(64, 1))
