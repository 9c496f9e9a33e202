"""The Mosaic GPU (Hopper) lightning kernels in the Mosaic GPU interpreter on the CPU.

The interpreter (jax >= 0.10) runs the kernels' pipelines, TMA copies, SMEM buffers, chunk order
and segment logic; its wgmma has no transposed operands, so the products run as plain dots there.
In the interpreter float32 runs the Mosaic kernels too (compiled, float32 goes to Triton), which lets
these tests hold the forward and all three backward walks to float32 tolerances.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lightning import common as cm
from pallas_kernels.lightning import gpu_mosaic
from pallas_kernels.lightning import op as lop
from pallas_kernels.lightning import reference
from pallas_kernels.lightning import segments as sg
import pallas_kernels
from test_lightning_kernels import assert_close, kernel_fn, make, reference_f32, rel, value_and_grads

pytestmark = pytest.mark.skipif(not gpu_mosaic.interpret_supported(),
                                reason="this JAX has no Mosaic GPU interpreter")


def mosaic_fn(**tuning):
    def f(q, k, v, decay, initial_state=None):
        return lop.lightning_attention_kernel(q, k, v, decay, initial_state=initial_state, impl="mosaic_gpu",
                                              interpret=True, tuning=tuning or None)
    return f


@pytest.mark.parametrize("T,random_states", [(1, True), pytest.param(63, False, marks=pytest.mark.full),
                                              pytest.param(64, True, marks=pytest.mark.full), (3 * 64 + 5, True)])
def test_mosaic_float32_forward_and_grads(T, random_states):
    x = make(1, 2, T, 64, jnp.float32, seed=T, h0=random_states, dht=random_states, Dv=128)
    assert gpu_mosaic.supported(x["q"], x["v"], 64, interpret=True)
    assert_close(value_and_grads(mosaic_fn(), x), reference_f32(x), 2e-5)


def test_mosaic_bf16():
    x = make(2, 2, 2 * 64 + 9, 64, jnp.bfloat16, seed=3)
    assert gpu_mosaic.supported(x["q"], x["v"], 64)
    assert_close(value_and_grads(mosaic_fn(), x), reference_f32(x), 2e-2)


@pytest.mark.parametrize("T,segments,extra", [
    (9 * 64 + 7, 3, {}),  # a count that is no power of two (the strategy picks any divisor)
    pytest.param(9 * 64 + 7, 4, {"lean": True}, marks=pytest.mark.full),  # padded chunks; one output slot, scoped state
    (8 * 64 + 7, 8, dict(sg.LEGACY)),  # empty trailing segments; every segment walked, no reuse
], ids=["P3", "P4-padded-lean", "P8-empty-legacy"])
def test_mosaic_segments(T, segments, extra):
    """Prefill form: sequences split into segments (local state walks, the join, then outputs; by
    default the segment whose local state nobody reads is not walked and the backward reuses the
    forward's entering states)."""
    x = make(1, 1, T, 64, jnp.float32, seed=segments)
    x["decay"] = jnp.asarray([0.05], jnp.float32)  # slow enough that every segment's state matters
    got = value_and_grads(mosaic_fn(segments=segments, **extra), x)
    assert_close(got, reference_f32(x), 2e-5)


def test_backward_reuses_the_forward_segment_states(monkeypatch):
    """With segments, the forward's entering states replace the dq pass's state-only walk (one state
    walk each way instead of two), and the walks skipped for unread segments cover one segment less."""
    walks = []
    real = gpu_mosaic._walk

    def spy(*a, **kw):
        if not kw.get("with_out", True):
            walks.append(kw["segments"])
        return real(*a, **kw)
    monkeypatch.setattr(gpu_mosaic, "_walk", spy)
    x = make(1, 1, 8 * 64, 64, jnp.bfloat16, seed=2)
    for extra, want in (({}, [3, 3]), (dict(sg.LEGACY), [4, 4, 4])):
        walks.clear()
        jax.make_jaxpr(lambda x: value_and_grads(mosaic_fn(segments=4, **extra), x))(x)  # traced, not run
        assert walks == want, (extra, walks)


def test_mosaic_prefill_in_two_parts_and_decode():
    """prefill(A) then prefill(B) from its state equals prefill(A + B); prefill(T - 1) then one decode
    step equals prefill(T). The second part is split into 2 segments."""
    x = make(1, 2, 64 * 5 + 3, 64, jnp.float32, seed=8)
    f = mosaic_fn()
    o, ht = f(x["q"], x["k"], x["v"], x["decay"], initial_state=x["h0"])
    A = 70
    part = lambda z, s: z[:, :, s]
    o1, s1 = f(part(x["q"], slice(None, A)), part(x["k"], slice(None, A)), part(x["v"], slice(None, A)),
               x["decay"], initial_state=x["h0"])
    o2, s2 = mosaic_fn(segments=2)(part(x["q"], slice(A, None)), part(x["k"], slice(A, None)),
                                   part(x["v"], slice(A, None)), x["decay"], initial_state=s1)
    assert rel(jnp.concatenate([o1, o2], axis=2), o) < 2e-5
    assert rel(s2, ht) < 2e-5
    _, s = f(x["q"][:, :, :-1], x["k"][:, :, :-1], x["v"][:, :, :-1], x["decay"], initial_state=x["h0"])
    o_last, s_new = pallas_kernels.lightning_decode_step(x["q"][:, :, -1], x["k"][:, :, -1], x["v"][:, :, -1],
                                                          x["decay"], s)
    assert rel(o_last, o[:, :, -1]) < 2e-5
    assert rel(s_new, ht) < 2e-5


def test_mosaic_head_dims_padded_to_64():
    """Head dims that are not multiples of 64 are zero-padded to one (the Mosaic kernel's tile)."""
    x = make(1, 1, 70, 16, jnp.float32, seed=1, Dv=40)
    assert_close(value_and_grads(mosaic_fn(), x), reference_f32(x), 2e-5)


def test_unsupported_calls_take_the_triton_kernels():
    q = jnp.zeros((1, 1, 64, 64), jnp.float32)
    assert not gpu_mosaic.supported(q, q, 64)  # compiled float32: Triton (wgmma would be tf32)
    assert not gpu_mosaic.supported(q.astype(jnp.bfloat16), q, 32)  # chunk other than 64
    x = make(1, 1, 20, 16, jnp.float32, seed=2)
    got = value_and_grads(kernel_fn("pallas_gpu", "mosaic_gpu", 16), x)  # chunk 16: the Triton kernel
    assert_close(got, reference_f32(x), 2e-5)


def test_join_matches_sequential_segments():
    """The XLA join of segment states against a float64 loop over the segments' real rows."""
    rng = np.random.default_rng(0)
    B, H, P, L, C, T = 1, 2, 5, 2, 4, 27  # 5 segments of 8 rows: 3 full, one of 3 rows, one empty
    lam = np.array([0.3, 0.01])
    M = rng.standard_normal((B, H, P, 3, 2))
    s_in = rng.standard_normal((B, H, 3, 2))
    rows = [min(max(T - p * L * C, 0), L * C) for p in range(P)]
    for reverse in (False, True):
        want = np.zeros_like(M)
        E = s_in.copy()
        order = range(P - 1, -1, -1) if reverse else range(P)
        for p in order:
            want[:, :, p] = E
            E = np.exp(-lam * rows[p])[None, :, None, None] * E + M[:, :, p]
        got = cm.segment_join(jnp.asarray(M, jnp.float32), jnp.asarray(lam, jnp.float32),
                              jnp.asarray(s_in, jnp.float32), T=T, C=C, L=L, reverse=reverse)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_pick_segments():
    assert sg.pick_segments(128, 64) == 1  # B * H * tiles already fills the GPU
    assert sg.pick_segments(16, 512) == 8
    assert sg.pick_segments(16, 2048) == 8
    assert sg.pick_segments(4, 40) == 4  # at least 8 chunks per segment
    assert sg.pick_segments(4, 20) == 2
    assert sg.pick_segments(1, 3) == 1


def test_plan_segments_fills_waves_of_the_sms():
    """The shipped rule keyed on the SM count: split until the programs fill one wave of the SMs, never
    into a partial second wave, only into divisors of the chunk count unless the padding pays."""
    kw = {k: sg.STRATEGY[k] for k in ("state_cost", "join_cost", "launch_cost", "min_chunks")}
    plan = lambda programs, N, slots=132, **o: sg.plan_segments(programs, N, slots=slots, **kw, **o)  # noqa
    assert plan(16, 2048) == 8 and plan(16, 2048, slots=264) == 16  # one full wave, on 132 or 264 SMs
    assert plan(132, 1024) == 1 and plan(512, 256) == 1  # already a wave or more
    assert plan(48, 1024) == 8  # 384 programs = 3 waves of 128 chunks, not 4 segments = 192 = 2 waves of 256
    assert plan(16, 16) == 1  # 16 chunks: an extra state walk and join do not pay
    P = plan(16, 1025)
    assert P > 1 and 1025 % P == 0  # 1025 = 5 * 5 * 41 chunks: a divisor, no padded copy
    assert plan(16, 257) > 1  # a prime count: padding is worth it with 16 programs on 132 SMs
    assert sg.segment_cost(16, 2048, 8, slots=132, **{k: kw[k] for k in kw if k != "min_chunks"}) < \
        sg.segment_cost(16, 2048, 1, slots=132, **{k: kw[k] for k in kw if k != "min_chunks"})
    assert sg.programs_per_sm(sg.walk_smem_bytes(128, 128, 64, 3)) == 1
    assert sg.programs_per_sm(sg.walk_smem_bytes(128, 128, 64, 2, lean=True)) == 2


def test_hopper_gets_the_mosaic_kernel(monkeypatch):
    monkeypatch.setattr(lop, "is_hopper", lambda device=None: True)
    for shape in ((4, 16, 4096, 128), (1, 8, 131072, 128)):
        assert lop.choose_kernel("pallas_gpu", shape, 128, jnp.bfloat16).impl == "mosaic_gpu"
    assert lop.choose_kernel("pallas_gpu", (4, 16, 4096, 128), 128, jnp.float32).impl == "triton_fused"
    monkeypatch.setattr(lop, "is_hopper", lambda device=None: False)  # A100, Blackwell: Triton
    assert lop.choose_kernel("pallas_gpu", (4, 16, 4096, 128), 128, jnp.bfloat16).impl == "triton_fused"


def test_is_hopper_reads_the_compute_capability():
    class Dev:
        platform = "gpu"

        def __init__(self, cc):
            self.compute_capability = cc
    assert lop.is_hopper(Dev("9.0"))
    assert not lop.is_hopper(Dev("8.0"))
    assert not lop.is_hopper(Dev("10.0"))
    assert not lop.is_hopper(jax.devices("cpu")[0])


def _segment_ids(T, starts_per_row):
    seg = np.zeros((len(starts_per_row), T), np.int32)
    for r, starts in enumerate(starts_per_row):
        for s in starts:
            seg[r, s:] += 1
    return jnp.asarray(seg)


@pytest.mark.parametrize("T,segments,starts", [
    (3 * 64 + 5, 1, ([5, 6, 64, 100, 130], [63, 64, 65])),  # one-token documents, starts at chunk edges
    (9 * 64 + 7, 2, ([128, 259, 260, 320, 321, 500],)),  # a start at a segment's first row (320)
    pytest.param(9 * 64 + 7, 4, ([1, 192, 447], []), marks=pytest.mark.full),  # 9 chunks in 4 segments: padded
    (8 * 64 + 7, 8, ([10, 129, 300],)),  # 9 chunks in 8 segments: empty trailing segments
])
def test_mosaic_packed_documents(T, segments, starts):
    """Packed rows: the state restarts at each document start (inside chunks, at chunk and segment
    edges); outputs, final state and all gradients against the reference's segment_ids form."""
    x = make(len(starts), 2, T, 64, jnp.float32, seed=T + segments)
    x["decay"] = jnp.asarray([0.05, 1e-3], jnp.float32)
    seg = _segment_ids(T, starts)
    f = lambda q, k, v, d, initial_state: lop.lightning_attention_kernel(  # noqa: E731
        q, k, v, d, initial_state=initial_state, impl="mosaic_gpu", interpret=True,
        tuning={"segments": segments}, segment_ids=seg)
    assert_close(value_and_grads(f, x), reference_f32(x, seg), 2e-5)


def test_mosaic_packed_documents_bf16():
    x = make(1, 2, 150, 64, jnp.bfloat16, seed=21)
    seg = _segment_ids(150, ([40, 64, 90],))
    f = lambda q, k, v, d, initial_state: lop.lightning_attention_kernel(  # noqa: E731
        q, k, v, d, initial_state=initial_state, impl="mosaic_gpu", interpret=True, segment_ids=seg)
    assert_close(value_and_grads(f, x), reference_f32(x, seg), 2e-2)


def test_doc_bounds_against_a_loop():
    T, C = 150, 64
    seg = _segment_ids(T, ([3, 64, 65, 130], [127, 128]))
    Tp, P = 192, 3
    got = gpu_mosaic.doc_bounds(seg, Tp, C, P)
    s = np.pad(np.asarray(seg), ((0, 0), (0, Tp - T)), mode="edge")
    for r in range(2):
        starts = [t for t in range(1, Tp) if s[r, t] != s[r, t - 1]]
        for t in range(Tp):
            c0 = t // C * C
            begin = max([u for u in starts if u <= t], default=0)
            end = min([u for u in starts if u > t], default=Tp) - 1
            assert got.first[r, t] == (begin - c0 if begin >= c0 and begin in starts else -1)
            assert got.last[r, t] == min(end - c0, C - 1)
        assert list(np.asarray(got.reset[r])) == [any(p * C <= u < (p + 1) * C for u in starts) for p in range(P)]


def test_packed_rows_route(monkeypatch):
    """The one gate (op.packed_rows_on_kernel): packed rows take the Mosaic kernel where it is chosen
    (Hopper, bf16), the reference elsewhere (other GPUs); kernels that cannot take them refuse them by
    name."""
    from pallas_kernels.lightning import vjp
    x = make(1, 2, 100, 64, jnp.bfloat16, seed=4)
    seg = _segment_ids(100, ([30, 70],))
    want = reference_f32(x, seg)[:2]
    calls = []
    real = vjp.lightning_pallas
    monkeypatch.setattr(vjp, "lightning_pallas", lambda *a, **k: calls.append(a[5].impl) or real(*a, **k))
    for hopper, route in ((True, ["mosaic_gpu"]), (False, [])):
        monkeypatch.setattr(lop, "is_hopper", lambda device=None, h=hopper: h)
        calls.clear()
        o, ht = pallas_kernels.lightning_attention(x["q"], x["k"], x["v"], x["decay"], initial_state=x["h0"],
                                                   backend="pallas_gpu", interpret=True, segment_ids=seg)
        assert_close([o.astype(jnp.float32), ht], want, 2e-2, names=("o", "final_state"))
        assert calls == route
    assert lop.packed_rows_on_kernel(lop.choose_kernel("pallas_gpu", (1, 2, 100, 64), 64, jnp.bfloat16,
                                                       impl="mosaic_gpu"), jnp.bfloat16)
    assert not lop.packed_rows_on_kernel(lop.choose_kernel("pallas_gpu", (1, 2, 100, 64), 64, jnp.float32,
                                                           impl="mosaic_gpu"), jnp.float32)  # compiled f32
    with pytest.raises(ValueError, match="segment_ids.*mosaic_gpu"):
        lop.lightning_attention_kernel(x["q"], x["k"], x["v"], x["decay"], impl="triton_fused", interpret=True,
                                       segment_ids=seg)
