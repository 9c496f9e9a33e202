"""The wide walks of the Mosaic GPU lightning kernels (gpu_mosaic_wide: both column pieces of a state in one
program), in the Mosaic GPU interpreter: against the walks of one program per piece they replace, through the
public op against the float32 recurrence and the chunked reference's VJP, where the plan takes them, their
shared memory and bad arguments."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.lightning import gpu_mosaic
from pallas_kernels.lightning import gpu_mosaic_wide as wide
from pallas_kernels.lightning import op as lop
from pallas_kernels.lightning import segments as sg
from test_lightning_kernels import assert_close, make, reference_f32, rel, value_and_grads
from test_lightning_mosaic import _segment_ids

pytestmark = pytest.mark.skipif(not gpu_mosaic.interpret_supported(),
                                reason="this JAX has no Mosaic GPU interpreter")
C = 64


@pytest.mark.parametrize("Dy,P,reverse,with_out,starts,from_zero", [
    (64, 3, False, True, ([5, 64, 130],), False),  # the forward from entering states, packed documents
    (64, 3, True, False, ([5, 64, 130],), True),  # a reverse state-only walk from zero, packed documents
    pytest.param(64, 2, True, True, None, False, marks=pytest.mark.full),  # a reverse walk with outputs
    pytest.param(128, 1, False, True, None, False, marks=pytest.mark.full),  # MiniMax's head dims
], ids=["fwd-docs", "rev-state-docs", "rev-out", "D128"])
def test_wide_walk_matches_the_narrow_walk(Dy, P, reverse, with_out, starts, from_zero):
    """Same outputs and leaving states as ``_walk`` with one program per 64-column piece, random inputs and
    entering states, the last chunk short."""
    N = 2 * P if P > 1 else 3
    Tp, T = N * C, (N - 1) * C + 7
    ks = jax.random.split(jax.random.PRNGKey(Dy + P + reverse), 4)
    rows = (jnp.arange(Tp) < T)[None, None, :, None]  # padded rows are zero, as the kernels' callers pad
    x, y = (jax.random.normal(k, (1, 2, Tp, Dy)) * rows for k in ks[:2])
    z = jax.random.normal(ks[2], (1, 2, Tp, 128)) * rows
    s0 = None if from_zero else jax.random.normal(ks[3], (1, 2, P, Dy, 128))
    lam = jnp.asarray([0.05, 0.3], jnp.float32)
    docs = None if starts is None else gpu_mosaic.doc_bounds(_segment_ids(T, starts), Tp, C, P)
    kw = dict(T=T, C=C, L=N // P, reverse=reverse, with_out=with_out, docs=docs, interpret=True, segments=P)
    out, st = wide.wide_walk(x if with_out else None, y, z, lam, s0, **kw)
    out_n, st_n = gpu_mosaic._walk(x if with_out else None, y, z, lam, s0, BV=64, **kw)
    assert st.shape == (1, 2, P, Dy, 128) and rel(st, st_n) < 1e-6 and rel(st, 0 * st) > 0.1
    if with_out:
        assert out.shape == (1, 2, Tp, 128) and rel(out, out_n) < 1e-6 and rel(out, 0 * out) > 0.1


def _spy(monkeypatch):
    calls = []
    real = wide.wide_walk
    monkeypatch.setattr(wide, "wide_walk", lambda *a, **k: calls.append(a[2].shape) or real(*a, **k))
    return calls


def _op(tuning, segment_ids=None):
    return lambda q, k, v, d, initial_state: lop.lightning_attention_kernel(  # noqa: E731
        q, k, v, d, initial_state=initial_state, impl="mosaic_gpu", interpret=True, tuning=tuning,
        segment_ids=segment_ids)


def test_public_op_forward_through_the_wide_walks(monkeypatch):
    """Dk = 64, Dv = 128: the forward's state and output walks are wide, the backward's walks narrow (they
    include walks with 64-wide states); float32 outputs and gradients against the references with a random
    initial state and final-state cotangent, two segments (the backward reuses the forward's entering states)
    and packed rows."""
    calls = _spy(monkeypatch)
    T = 3 * C + 5
    x = make(1, 2, T, 64, jnp.float32, seed=7, Dv=128)
    ids = _segment_ids(T, ([40, 64, 129],))
    assert_close(value_and_grads(_op({"wide": "always", "segments": 2}, ids), x), reference_f32(x, ids), 2e-5)
    assert calls  # the forward took the wide walks


@pytest.mark.full
def test_public_op_all_walks_wide(monkeypatch):
    """Dk = Dv = 128: with wide walks allowed and an explicit count every walk of both directions is wide (the
    backward with the fused dk/dv walk), against the references."""
    calls = _spy(monkeypatch)
    x = make(1, 1, 2 * C + 5, 128, jnp.float32, seed=8)
    assert_close(value_and_grads(_op({"wide": "always", "segments": 2}), x), reference_f32(x), 2e-5)
    assert len(calls) >= 4  # forward: state and output walks; backward: dq walk and the reverse state walk


def _plans(B, H, T, D=128, **strat):
    params = {k: v for k, v in sg.STRATEGY.items() if k not in ("lean", "reuse_states")}
    params.update(strat)
    base = dict(Dx=D, Dy=D, BV=64, steps=3, lean=False, segments=params.pop("segments", None))
    P, w = sg.forward_plan(B, H, D // 64, T // C, **base, **{k: params[k] for k in sg.FORWARD_KEYS})
    return (P, w), sg.backward_plan(B, H, D // 64, T // C, **base, **params, fwd_segments=P)


def test_plan_takes_the_wide_walks_where_they_fill_the_sms(monkeypatch):
    """On 132 SMs the forward is wide where B * H fills the SMs or a narrow split would need twice the
    segments, and narrow where one program per piece fills them unsplit (B * H = 64) or the call is too short
    to split; the backward the same (a wide step costed as the forward's), or narrow where a wide step is
    costed as two narrow ones."""
    monkeypatch.setattr(sg, "sm_count", lambda default=132: 132)
    assert _plans(16, 16, 16384)[0] == (1, True)
    assert _plans(1, 8, 131072)[0] == (16, True)
    assert _plans(4, 16, 4096)[0] == (1, False) and _plans(1, 64, 8192)[0] == (1, False)
    assert _plans(2, 16, 1024)[0] == (1, False)
    assert _plans(16, 16, 16384)[1] == (1, True, True)  # the wide dq walk and the fused dk/dv walk
    assert _plans(4, 16, 4096)[1] == (1, False, False) and _plans(1, 8, 131072)[1] == (16, True, True)
    assert _plans(16, 16, 16384, wide_bwd_step_cost=2.0)[1] == (1, True, False)
    assert _plans(4, 16, 4096, wide="always")[0] == (2, True)  # wide at its own best count
    assert _plans(16, 16, 16384, wide=False)[0] == (1, False)
    assert _plans(1, 8, 4096, segments=4)[0] == (4, True)  # an explicit count: the wide walks where allowed
    assert _plans(1, 8, 4096, rule="programs", wide=False)[0] == (8, False)


def test_wide_walks_fit_in_shared_memory():
    assert wide.pipeline_steps(128, 3) == 3 and wide.pipeline_steps(128, 3, docs=True) == 2
    assert wide.pipeline_steps(128, 4, with_out=False) == 4
    for Dy in (64, 128):
        for kw in (dict(), dict(docs=True), dict(with_out=False)):
            assert wide.smem_bytes(Dy, wide.pipeline_steps(Dy, 4, **kw), **kw) <= wide.SMEM_LIMIT


def test_wide_option_and_widths_are_checked():
    x = make(1, 1, 100, 64, jnp.bfloat16, seed=1, Dv=128)
    with pytest.raises(ValueError, match="wide='yes'"):
        jax.make_jaxpr(lambda x: value_and_grads(_op({"wide": "yes"}), x))(x)
    with pytest.raises(ValueError, match="Dz=64"):
        wide.wide_walk(x["q"], x["k"], x["q"], jnp.ones((1,)), None, T=64, C=C, L=1, segments=1, interpret=True)
    with pytest.raises(ValueError, match="X Y\\^T"):
        wide.wide_walk(x["v"], x["k"], x["v"], jnp.ones((1,)), None, T=64, C=C, L=1, segments=1, interpret=True)
    assert wide.supported(128, 128) and not wide.supported(64, 128) and wide.supported(64, 128, interpret=True)
    assert not wide.supported(128, 64, interpret=True) and not wide.supported(128, 256)
