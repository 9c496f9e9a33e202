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
                 state_walks=1, other_walks=(), step_cost=1.0):
    """Predicted time of a pass split into P segments, in units of one chunk step of an output walk on
    one SM: ``out_walks`` output walks of ``waves`` x ``L`` steps (``slots`` programs run at once, L
    chunks per segment), and for P > 1 ``state_walks`` state-only walks (a step costs ``state_cost``;
    with ``skip_unused`` the segment whose local state nobody reads is not walked), each with a join
    (``launch_cost`` for the extra launches plus ``join_cost`` per segment). ``other_walks``: more output
    walks of another kernel, as (programs per segment, programs per wave, cost of a step). ``step_cost``: the
    cost of one step of these walks' programs (the wide walk's program does the work of two)."""
    L = -(-N // P)
    waves = lambda units, slots=slots: -(-units // slots)  # noqa: E731
    cost = out_walks * waves(programs * P) * L * step_cost
    cost += sum(step * waves(n * P, per_wave) * L for n, per_wave, step in other_walks)
    if P > 1:
        walked = programs * (P - 1 if skip_unused else P)
        cost += state_walks * (waves(walked) * L * state_cost * step_cost + launch_cost + join_cost * P)
    return cost


def plan_segments(programs, N, *, slots, state_cost, join_cost, launch_cost, min_chunks, skip_unused=True,
                  out_walks=1, state_walks=lambda P: 1, pad_units=6, margin=0.05, max_segments=512, other_walks=(),
                  step_cost=1.0, return_cost=False):
    """The segment count with the least predicted time (``segment_cost``) among those that keep at least
    ``min_chunks`` chunks per segment. A count that does not divide N needs a padded copy of the
    inputs: ``pad_units`` tensor passes (read and write) against the 4 of an output walk. A count
    replaces a smaller one only when it is predicted ``margin`` faster (the model is rough). With
    ``return_cost``: (count, its predicted cost)."""
    def cost(P):
        c = segment_cost(programs, N, P, slots=slots, state_cost=state_cost, join_cost=join_cost,
                         launch_cost=launch_cost, skip_unused=skip_unused, out_walks=out_walks,
                         state_walks=state_walks(P), other_walks=other_walks, step_cost=step_cost)
        return c + (pad_units / 4 * programs * N / slots * step_cost if N % P else 0.0)
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
              fused_step_cost=2.8, bwd_launch_cost=20.0, wide=False, wide_step_cost=1.0, wide_bwd_step_cost=None):
    """Segments per sequence for one pass: the forward (``forward_plan``), or with ``backward`` the backward's
    walks (``backward_plan``); each ignores the other's keys."""
    common = dict(Dx=Dx, Dy=Dy, BV=BV, steps=steps, lean=lean, segments=segments, rule=rule,
                  target_programs=target_programs, state_cost=state_cost, join_cost=join_cost,
                  min_chunks=min_chunks, skip_unused=skip_unused, wide=wide)
    if backward:
        return backward_plan(B, H, tiles, N, launch_cost=launch_cost, fwd_segments=fwd_segments,
                             fused_dkdv=fused_dkdv, fused_step_cost=fused_step_cost, bwd_launch_cost=bwd_launch_cost,
                             wide_bwd_step_cost=wide_step_cost if wide_bwd_step_cost is None else wide_bwd_step_cost,
                             **common)[0]
    return forward_plan(B, H, tiles, N, launch_cost=launch_cost, wide_step_cost=wide_step_cost, **common)[0]


def _walk_programs(B, H, tiles, *, Dx, Dy, BV, steps, lean, wide, wide_step_cost):
    """(programs per segment, programs resident at once, cost of a step) of the walks: one program per column
    tile (``gpu_mosaic._walk``), or with ``wide`` one per (b, h) and SM (``gpu_mosaic_wide``)."""
    if wide:
        return B * H, sm_count(), wide_step_cost
    return B * H * tiles, sm_count() * programs_per_sm(walk_smem_bytes(Dx, Dy, BV, steps, lean=lean)), 1.0


def wide_forms(wide):
    """The walk forms a strategy's ``wide`` allows: True lets the plan choose, ``"always"`` takes the wide walks,
    False never (the caller passes False where they do not apply: ``gpu_mosaic_wide.supported``)."""
    forms = {True: (False, True), False: (False,), "always": (True,)}
    if not isinstance(wide, (bool, str)) or wide not in forms:
        raise ValueError(f"mosaic_gpu lightning kernel: wide={wide!r}; expected True, False or 'always'")
    return forms[wide]


def _check_rule(rule):
    if rule != "waves":
        raise ValueError(f"mosaic_gpu lightning kernel: rule={rule!r}; expected 'programs' or 'waves'")


def _choose(forms, B, H, tiles, N, *, segments, rule, target_programs, walk_kw, plan_kw):
    """The cheapest (cost, segments, *form) over ``forms`` [(form, plan_segments keywords)]. With an explicit
    count or the first rule the count is not planned, and neither is the form: the last of ``forms`` (the
    richest one the options allow) is taken."""
    if segments or rule == "programs":
        form, _ = forms[-1]
        programs = _walk_programs(B, H, tiles, wide=form[-1], **walk_kw)[0]
        P = int(segments) if segments else pick_segments(programs, N, target=target_programs)
        return (0.0, P) + form
    _check_rule(rule)
    best = None
    for form, kw in forms:
        programs, slots, step_cost = _walk_programs(B, H, tiles, wide=form[-1], **walk_kw)
        P, cost = plan_segments(programs, N, slots=slots, step_cost=step_cost, return_cost=True, **plan_kw, **kw)
        if best is None or cost < best[0]:
            best = (cost, P) + form
    return best


# The strategy keys forward_plan takes; the rest of STRATEGY is the backward's or the caller's.
FORWARD_KEYS = ("rule", "target_programs", "state_cost", "join_cost", "launch_cost", "min_chunks", "skip_unused",
                "wide", "wide_step_cost")


def forward_plan(B, H, tiles, N, *, Dx, Dy, BV, steps, lean, segments, rule, target_programs, state_cost,
                 join_cost, launch_cost, min_chunks, skip_unused, wide=False, wide_step_cost=1.0):
    """(segments, wide) of the forward of ``tiles`` column tiles per (b, h): the walks one program per tile, or
    with ``wide`` allowed (``wide_forms``) one program per (b, h) whose step costs ``wide_step_cost`` walk steps,
    whichever the time model predicts faster at its best count. Wide walks halve the programs: they win where
    B * H fills the SMs, and lose where one program per tile would fill them and a wide walk needs segments."""
    walk_kw = dict(Dx=Dx, Dy=Dy, BV=BV, steps=steps, lean=lean, wide_step_cost=wide_step_cost)
    plan_kw = dict(state_cost=state_cost, join_cost=join_cost, launch_cost=launch_cost, min_chunks=min_chunks,
                   skip_unused=skip_unused)
    forms = [((w,), {}) for w in wide_forms(wide)]
    _, P, w = _choose(forms, B, H, tiles, N, segments=segments, rule=rule, target_programs=target_programs,
                      walk_kw=walk_kw, plan_kw=plan_kw)
    return P, w


def backward_plan(B, H, tiles, N, *, Dx, Dy, BV, steps, lean, segments, rule, target_programs, state_cost,
                  join_cost, launch_cost, min_chunks, skip_unused, fwd_segments=None, fused_dkdv=False,
                  fused_step_cost=2.8, bwd_launch_cost=20.0, wide=False, wide_bwd_step_cost=1.0, wide_step_cost=None):
    """(segments, fused, wide) for the backward of ``tiles`` column tiles per (b, h): three walks (dq, dv, dk),
    or with ``fused_dkdv`` (the caller checks the head dims) possibly the dq walk and the fused dk/dv walk
    (one program per (b, h) and SM, a step costing ``fused_step_cost`` walk steps); the walks narrow or, where
    ``wide`` allows, wide (``forward_plan``; a wide step costs ``wide_bwd_step_cost`` walk steps here, the
    forward's ``wide_step_cost`` is not used): whichever form the time model predicts fastest, each at its best
    segment count. ``fused_dkdv="always"``: the fused walk. The forward-direction state walk is saved when the
    count equals the forward's (``fwd_segments``). A split costs ``bwd_launch_cost`` here (measured: more
    than the forward's ``launch_cost``, which the backward does not use), and a larger count must be predicted
    15% faster, not 5% (at (8, 24, 16384) two segments were predicted 10% faster and measured 9% slower)."""
    del launch_cost, wide_step_cost
    walk_kw = dict(Dx=Dx, Dy=Dy, BV=BV, steps=steps, lean=lean, wide_step_cost=wide_bwd_step_cost)
    plan_kw = dict(state_cost=state_cost, join_cost=join_cost, launch_cost=bwd_launch_cost, min_chunks=min_chunks,
                   skip_unused=skip_unused, pad_units=8, state_walks=lambda P: 1 if P == fwd_segments else 2,
                   margin=0.15)
    fused_forms = {False: (False,), True: (False, True), "always": (True,)}.get(fused_dkdv, (bool(fused_dkdv),))
    fused_kw = dict(out_walks=1, other_walks=((B * H, sm_count(), fused_step_cost),))
    forms = [((f, w), fused_kw if f else dict(out_walks=3)) for w in wide_forms(wide) for f in fused_forms]
    _, P, fused, w = _choose(forms, B, H, tiles, N, segments=segments, rule=rule, target_programs=target_programs,
                             walk_kw=walk_kw, plan_kw=plan_kw)
    return P, fused, w


# Strategy defaults: see docs/kernels.md ("Choosing segments") for the measurements behind them. The
# first rule ("programs": the smallest power of two reaching 128 programs, no skipped walk, no reuse) is
# kept for comparison: tuning={"rule": "programs", "skip_unused": False, "reuse_states": False}.
STRATEGY = dict(rule="waves", target_programs=128, state_cost=0.4, join_cost=0.5, launch_cost=6.0, min_chunks=8,
                skip_unused=True, lean=False, reuse_states=True, fused_dkdv=True, fused_step_cost=2.8,
                bwd_launch_cost=20.0, wide=True, wide_step_cost=1.42, wide_bwd_step_cost=1.42)
LEGACY = dict(rule="programs", skip_unused=False, reuse_states=False, fused_dkdv=False, wide=False)
