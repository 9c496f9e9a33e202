"""How the Mosaic GPU lightning kernel splits sequences into segments: the shipped rule, keyed on the SM
count (``plan_segments``, a time model fitted to the H200 sweep in docs/benchmarks/lightning_attention.md),
and the first rule (``pick_segments``). Plain Python: no JAX kernel code here."""

from __future__ import annotations

import jax

CHUNK = 64  # the Mosaic kernel's chunk
LAM_PAD = 32  # the rates travel as [H, 32] float32 rows


def pick_segments(programs, N, *, target=128, min_chunks=8):
    """The first rule (``rule="programs"``): the smallest power of two that gives ``target`` programs,
    keeping at least ``min_chunks`` chunks per segment (1 when B * H * tiles already fills the GPU)."""
    P = 1
    while programs * P < target and N >= 2 * P * min_chunks:
        P *= 2
    return P


def sm_count(default=132):
    """Streaming multiprocessors of the first GPU (H100 and H200: 132); ``default`` off a GPU."""
    try:
        dev = jax.devices()[0]
        n = getattr(dev, "core_count", None) if dev.platform == "gpu" else None
        return int(n) if n else default
    except Exception:  # pragma: no cover
        return default


def segment_cost(programs, N, P, *, slots, state_cost, join_cost, launch_cost, skip_unused=True, out_walks=1,
                 state_walks=1, other_walks=()):
    """Predicted time of a pass split into P segments, in units of one chunk step of an output walk on
    one SM: ``out_walks`` output walks of ``waves`` x ``L`` steps (``slots`` programs run at once, L
    chunks per segment), and for P > 1 ``state_walks`` state-only walks (a step costs ``state_cost``;
    with ``skip_unused`` the segment whose local state nobody reads is not walked), each with a join
    (``launch_cost`` for the extra launches plus ``join_cost`` per segment). ``other_walks``: more output
    walks of another kernel, as (programs per segment, programs per wave, cost of a step)."""
    L = -(-N // P)
    waves = lambda units, slots=slots: -(-units // slots)  # noqa: E731
    cost = out_walks * waves(programs * P) * L
    cost += sum(step * waves(n * P, per_wave) * L for n, per_wave, step in other_walks)
    if P > 1:
        walked = programs * (P - 1 if skip_unused else P)
        cost += state_walks * (waves(walked) * L * state_cost + launch_cost + join_cost * P)
    return cost


def plan_segments(programs, N, *, slots, state_cost, join_cost, launch_cost, min_chunks, skip_unused=True,
                  out_walks=1, state_walks=lambda P: 1, pad_units=6, margin=0.05, max_segments=512, other_walks=(),
                  return_cost=False):
    """The segment count with the least predicted time (``segment_cost``) among those that keep at least
    ``min_chunks`` chunks per segment. A count that does not divide N needs a padded copy of the
    inputs: ``pad_units`` tensor passes (read and write) against the 4 of an output walk. A count
    replaces a smaller one only when it is predicted ``margin`` faster (the model is rough). With
    ``return_cost``: (count, its predicted cost)."""
    def cost(P):
        c = segment_cost(programs, N, P, slots=slots, state_cost=state_cost, join_cost=join_cost,
                         launch_cost=launch_cost, skip_unused=skip_unused, out_walks=out_walks,
                         state_walks=state_walks(P), other_walks=other_walks)
        return c + (pad_units / 4 * programs * N / slots if N % P else 0.0)
    best, best_cost = 1, cost(1)
    for P in range(2, min(max_segments, N // max(1, min_chunks)) + 1):
        c = cost(P)
        if c < best_cost * (1 - margin):
            best, best_cost = P, c
    return (best, best_cost) if return_cost else best


# Shared memory per SM and per block on Hopper (bytes), and what the hardware reserves per block.
SMEM_PER_SM, SMEM_RESERVED = 228 * 1024, 1024


def walk_smem_bytes(Dx, Dy, BV, steps, *, dtype_bytes=2, with_out=True, lean=False):
    """Shared memory of one ``_walk`` program (the pipeline's stages, operand and output buffers)."""
    C = CHUNK
    stage = C * ((Dx if with_out else 0) + Dy + BV) * dtype_bytes
    fixed = C * BV * dtype_bytes  # r_st * Z
    if with_out:
        fixed += Dy * BV * dtype_bytes + (1 if lean else 2) * C * BV * dtype_bytes  # bf16(S), output slots
    state = Dy * BV * 4  # the float32 staging buffer (scoped in lean mode: the stages reuse it)
    body = max(steps * stage, state) if lean else steps * stage + state
    return fixed + body + LAM_PAD * 4 + 64


def programs_per_sm(smem, max_programs=2):
    """Programs of one warpgroup resident per SM, from shared memory (capped: registers)."""
    return max(1, min(max_programs, SMEM_PER_SM // (smem + SMEM_RESERVED)))


def segments_for(B, H, tiles, N, *, Dx, Dy, BV, steps, lean, segments, rule, target_programs, state_cost,
              join_cost, launch_cost, min_chunks, skip_unused, backward=False, fwd_segments=None, fused_dkdv=False,
              fused_step_cost=2.8, bwd_launch_cost=20.0):
    """Segments per sequence for one pass: the forward, or with ``backward`` the backward's walks
    (``backward_plan``; the forward ignores the backward's keys)."""
    if backward:
        return backward_plan(B, H, tiles, N, Dx=Dx, Dy=Dy, BV=BV, steps=steps, lean=lean, segments=segments, rule=rule,
                             target_programs=target_programs, state_cost=state_cost, join_cost=join_cost,
                             launch_cost=launch_cost, min_chunks=min_chunks, skip_unused=skip_unused,
                             fwd_segments=fwd_segments, fused_dkdv=fused_dkdv, fused_step_cost=fused_step_cost,
                             bwd_launch_cost=bwd_launch_cost)[0]
    if segments:
        return int(segments)
    if rule == "programs":
        return pick_segments(B * H * tiles, N, target=target_programs)
    _check_rule(rule)
    slots = sm_count() * programs_per_sm(walk_smem_bytes(Dx, Dy, BV, steps, lean=lean))
    return plan_segments(B * H * tiles, N, slots=slots, state_cost=state_cost, join_cost=join_cost,
                         launch_cost=launch_cost, min_chunks=min_chunks, skip_unused=skip_unused)


def _check_rule(rule):
    if rule != "waves":
        raise ValueError(f"mosaic_gpu lightning kernel: rule={rule!r}; expected 'programs' or 'waves'")


def backward_plan(B, H, tiles, N, *, Dx, Dy, BV, steps, lean, segments, rule, target_programs, state_cost,
                  join_cost, launch_cost, min_chunks, skip_unused, fwd_segments=None, fused_dkdv=False,
                  fused_step_cost=2.8, bwd_launch_cost=20.0):
    """(segments, fused) for the backward of ``tiles`` column tiles per (b, h): three walks (dq, dv, dk),
    or with ``fused_dkdv`` (the caller checks the head dims) possibly the dq walk and the fused dk/dv walk
    (one program per (b, h) and SM, a step costing ``fused_step_cost`` walk steps), whichever the time
    model predicts faster, each at its best segment count; ``fused_dkdv="always"``: the fused walk at its
    best count. The forward-direction state walk is saved when the count equals the forward's
    (``fwd_segments``). A split costs ``bwd_launch_cost`` here (measured: more than the forward's
    ``launch_cost``, which the backward does not use)."""
    del launch_cost
    if segments or rule == "programs":
        P = int(segments) if segments else pick_segments(B * H * tiles, N, target=target_programs)
        return P, bool(fused_dkdv)
    _check_rule(rule)
    slots = sm_count() * programs_per_sm(walk_smem_bytes(Dx, Dy, BV, steps, lean=lean))
    kw = dict(slots=slots, state_cost=state_cost, join_cost=join_cost, launch_cost=bwd_launch_cost,
              min_chunks=min_chunks, skip_unused=skip_unused, pad_units=8, return_cost=True,
              state_walks=lambda P: 1 if P == fwd_segments else 2)
    P, cost = plan_segments(B * H * tiles, N, out_walks=3, **kw)
    if not fused_dkdv:
        return P, False
    P_f, cost_f = plan_segments(B * H * tiles, N, out_walks=1,
                                other_walks=((B * H, sm_count(), fused_step_cost),), **kw)
    return (P_f, True) if (cost_f <= cost or fused_dkdv == "always") else (P, False)


# Strategy defaults: see docs/kernels.md ("Choosing segments") for the measurements behind them. The
# first rule ("programs": the smallest power of two reaching 128 programs, no skipped walk, no reuse) is
# kept for comparison: tuning={"rule": "programs", "skip_unused": False, "reuse_states": False}.
STRATEGY = dict(rule="waves", target_programs=128, state_cost=0.4, join_cost=0.5, launch_cost=6.0, min_chunks=8,
                skip_unused=True, lean=False, reuse_states=True, fused_dkdv=True, fused_step_cost=2.8,
                bwd_launch_cost=20.0)
LEGACY = dict(rule="programs", skip_unused=False, reuse_states=False, fused_dkdv=False)
