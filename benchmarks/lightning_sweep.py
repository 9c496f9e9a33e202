"""Shape sweep of the lightning kernels against the HBM floor (``lightning_attention.py --mode sweep``).

One run measures the card's copy bandwidth, then times our kernels over a grid of B x H x T x D
(forward and forward+backward, bf16), short prefill chunks and the decode step, fla's
``chunk_simple_gla`` at a subset, and checks bf16 outputs and gradients against float32 references
at a sample of the grid. Points are spread over worker processes that compile in parallel and take a
file lock for every timing, so only one process times at a time. A deadline bounds the run: points
left when it comes are recorded as skipped.

The floor of a point is its fewest bytes over the measured bandwidth: q, k, v read and o written
(bf16), the float32 final state written and the initial state read when given; forward+backward adds
dO read and dq, dk, dv written (and d(initial state) written when an initial state is given).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
INTERPRET = bool(os.environ.get("LIGHTNING_BENCH_INTERPRET"))  # dry runs on the CPU

# (B, H, T, D): B * H from 8 to 256, T from 1K to 256K, B * H * T capped at 4M token-heads (memory);
# the five benchmark shapes are among them.
GRID = [(1, 8, T, 128) for T in (1024, 4096, 16384, 32768, 131072, 262144)] + \
    [(2, 8, T, 128) for T in (1024, 16384, 262144)] + [(1, 24, T, 128) for T in (4096, 65536)] + \
    [(2, 16, T, 128) for T in (1024, 16384, 65536)] + [(4, 16, 4096, 128), (4, 16, 65536, 128), (1, 64, 8192, 128)] + \
    [(4, 24, T, 128) for T in (1024, 16384)] + [(8, 16, T, 128) for T in (2048, 16384, 32768)] + \
    [(8, 24, T, 128) for T in (1024, 16384)] + [(16, 16, T, 128) for T in (1024, 4096, 16384)] + \
    [(1, 8, 65536, 64), (4, 16, 4096, 64), (16, 16, 16384, 64)]
BENCH_SHAPES = [(4, 16, 4096, 128), (1, 8, 32768, 128), (1, 64, 8192, 128), (8, 16, 2048, 128), (1, 8, 131072, 128)]
# fla at the five benchmark shapes (both settings) and at three corners of the grid (training setting)
FLA_EXTRA = [(1, 8, 1024, 128), (16, 16, 16384, 128), (2, 8, 262144, 128)]
SHORT = [(16, 64, T, 128) for T in (1, 16, 64, 256, 512)]  # prefill chunks from a state (generation)
DECODE = [(16, 16, 128), (16, 64, 128)]  # one token, state in and out
CHECKS = [(1, 8, 8195, 128), (4, 24, 1029, 128), (16, 16, 4099, 128), (1, 8, 8195, 64), (1, 24, 5003, 128),
          (16, 64, 5, 128), (8, 16, 130, 128)]  # the last two: wide walks of one and three chunks (prefill chunks)


if os.environ.get("LIGHTNING_SWEEP_TINY"):  # dry runs of the machinery on the CPU (interpret mode)
    GRID, BENCH_SHAPES, FLA_EXTRA = [(1, 2, 130, 64), (2, 1, 64, 64)], [(1, 2, 130, 64)], []
    SHORT, DECODE, CHECKS = [(1, 2, 5, 64)], [(1, 2, 64)], [(1, 2, 71, 64)]

# Variant sets: {name: (tuning, shapes or None for the whole grid)}. "default" is whatever the shipped
# strategy picks; "explore" holds the alternatives timed to choose it (docs/benchmarks/lightning_attention.md).
_SPLIT = dict(skip_unused=True, reuse_states=True)
_DKDV_POINTS = [(4, 16, 4096, 128), (1, 64, 8192, 128), (4, 16, 65536, 128), (8, 16, 2048, 128), (1, 24, 65536, 128),
                (4, 24, 16384, 128), (2, 16, 16384, 128), (16, 16, 16384, 128), (1, 8, 4096, 128), (2, 16, 1024, 128)]
_WIDE_POINTS = [(16, 16, 16384, 128), (8, 16, 2048, 128), (2, 16, 16384, 128), (4, 24, 16384, 128),
                (1, 8, 131072, 128)]


def _legacy_points():
    """Grid points where the first segment rule (LEGACY) splits differently from the shipped one (and
    one where both split the same way: there only the skipped walk and the reused states differ).
    Elsewhere both run the same kernels. Assumes 132 SMs (H100, H200)."""
    sys.path.insert(0, os.path.dirname(HERE))
    from pallas_kernels.lightning import segments as g
    out = []
    for B, H, T, D in GRID:
        N, tiles = -(-T // 64), D // 64
        kw = dict(Dx=D, Dy=D, BV=64, steps=3, lean=False, segments=None,
                  **{k: v for k, v in g.STRATEGY.items() if k not in ("lean", "reuse_states")})
        f = g.segments_for(B, H, tiles, N, **kw)
        b = g.segments_for(B, H, tiles, N, backward=True, fwd_segments=f, **kw)
        legacy = g.pick_segments(B * H * tiles, N)
        if not (f == b == legacy) or (B, H, T, D) == (1, 8, 131072, 128):  # one point where only the
            out.append((B, H, T, D))  # skipped walk and the reused states differ
    return out


PRESETS = {
    "default": {"default": ({}, None)},
    "legacy": {"legacy": (None, "legacy")},
    "explore": {
        "lean_s2": (dict(lean=True, steps=2), [(8, 16, 4096, 128), (4, 24, 16384, 128), (16, 16, 4096, 128)]),
        "lean_s3": (dict(lean=True, steps=3), [(8, 16, 4096, 128), (4, 16, 4096, 64)]),
        "bv128_lean_s2": (dict(lean=True, steps=2, BV=128, BK=128), [(8, 16, 4096, 128)]),
        "P8_split": (dict(segments=8, **_SPLIT), [(1, 8, 131072, 128)]),
        "P16_split": (dict(segments=16, **_SPLIT), [(1, 8, 131072, 128), (1, 8, 1024, 128)]),
        "P8_split_lean_s2": (dict(segments=8, lean=True, steps=2, **_SPLIT), [(1, 8, 131072, 128)]),
        "P1": (dict(segments=1), [(2, 16, 16384, 128)]),
        "P4_split": (dict(segments=4, **_SPLIT), [(2, 16, 16384, 128), (1, 8, 1024, 128)]),
    },
    # the fused dk/dv walk (gpu_mosaic_dkdv) wherever it applies, the two walks it replaces, the fused walk
    # at one backward segment, and the shipped plan (segments.backward_plan), which picks between them
    "dkdv": {
        "fused_dkdv": (dict(fused_dkdv="always"), _DKDV_POINTS),
        "shipped_plan": ({}, _DKDV_POINTS),
        "separate_dkdv": (dict(fused_dkdv=False), _DKDV_POINTS),
        "fused_bwd_P1": (dict(bwd_segments=1), [
            (4, 16, 4096, 128), (1, 64, 8192, 128), (4, 16, 65536, 128), (2, 16, 1024, 128)]),
    },
    # the wide walks (gpu_mosaic_wide) where the plan takes them: every walk narrow instead, and the forward's
    # walks wide with the backward's narrow (a wide backward step costed as two narrow ones); and the wide walks
    # where the plan does not take them
    "wide": {
        "narrow": (dict(wide=False), _WIDE_POINTS),
        "narrow_bwd": (dict(wide_bwd_step_cost=2.0), _WIDE_POINTS),
        "wide_always": (dict(wide="always"), [(4, 16, 4096, 128), (1, 64, 8192, 128)]),
    },
}


def _resolve_presets():
    from pallas_kernels.lightning import segments as g
    pts = _legacy_points()
    PRESETS["legacy"] = {"legacy": (dict(g.LEGACY), pts)}


if os.environ.get("LIGHTNING_SWEEP_TINY"):
    PRESETS["explore"] = {k: (t, [GRID[0]]) for k, (t, _) in list(PRESETS["explore"].items())[:2]}


def shape_bytes(B, H, T, D, *, bwd, h0, itemsize=2):
    """Fewest HBM bytes of one call (see the module docstring)."""
    x, st = B * H * T * D * itemsize, B * H * D * D * 4
    n = 4 * x + st + (st if h0 else 0)
    if bwd:
        n += 4 * x + (st if h0 else 0)
    return n


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------

def time_tasks(variants, *, grid=GRID, fla=False, settings=True, priority=2):
    """Timing tasks: under each named variant ({name: (tuning, shapes or None)}) its shapes, or the whole
    grid and, with ``settings``, the benchmark shapes once more with an initial state and a final-state
    cotangent (``setting="state"``); with ``fla`` fla at the benchmark shapes (both settings) and FLA_EXTRA."""
    out = []
    for name, (tuning, shapes) in variants.items():
        for shp in (grid if shapes is None else shapes):
            out.append(dict(kind="time", shape=list(shp), variant=name, tuning=tuning, setting="train",
                            priority=priority))
        if settings and shapes is None:
            for shp in BENCH_SHAPES:
                out.append(dict(kind="time", shape=list(shp), variant=name, tuning=tuning, setting="state",
                                priority=priority))
    if fla:
        for shp in BENCH_SHAPES:
            for setting in ("train", "state"):
                out.append(dict(kind="fla", shape=list(shp), setting=setting, priority=priority, group="fla"))
        for shp in FLA_EXTRA:
            out.append(dict(kind="fla", shape=list(shp), setting="train", priority=priority, group="fla"))
    return out


def other_tasks(tuning, *, checks=True, packed=True, short=True):
    out = []
    if checks:
        out += [dict(kind="check", shape=list(s), tuning=tuning, priority=1) for s in CHECKS]
    if packed and not os.environ.get("LIGHTNING_SWEEP_TINY"):
        out.append(dict(kind="packed", tuning=tuning, priority=1))
    if short:
        out += [dict(kind="short", shape=list(s), tuning=tuning, priority=3) for s in SHORT]
        out += [dict(kind="decode", shape=list(s), priority=3) for s in DECODE]
    return out


def task_cost(t):
    """Rough relative cost, to balance workers (compiles dominate)."""
    if t["kind"] in ("time", "fla"):
        B, H, T, D = t["shape"]
        return 1.0 + B * H * T / 2 ** 21
    return {"check": 2.0, "packed": 4.0, "short": 0.5, "decode": 0.2, "bandwidth": 0.5}.get(t["kind"], 1.0)


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------

def split_tasks(tasks, workers):
    """Greedy balance by cost; each worker runs by priority (lower first), big tasks first."""
    key = lambda t: (t.get("priority", 2), -task_cost(t))  # noqa: E731
    load, parts = [0.0] * workers, [[] for _ in range(workers)]
    pinned = {}  # tasks of one group (fla: one process keeps its compiled kernels) share a worker
    for t in sorted(tasks, key=lambda t: -task_cost(t)):
        g = t.get("group")
        w = pinned[g] if g in pinned else int(np.argmin(load))
        if g is not None:
            pinned[g] = w
        parts[w].append(t)
        load[w] += task_cost(t)
    return [sorted(p, key=key) for p in parts]


def run_workers(tasks, *, workers, deadline, tmp, mem_fraction, log):
    """Spawns worker processes (``lightning_attention.py --mode worker``) and gathers their records."""
    lock_path = os.path.join(tmp, "gpu.lock")
    procs, outs = [], []
    parts = split_tasks(tasks, workers)
    parts[0].insert(0, dict(kind="bandwidth"))  # the card's copy bandwidth, under the lock, first
    for i, part in enumerate(parts):
        tp, op = os.path.join(tmp, f"tasks{i}.json"), os.path.join(tmp, f"out{i}.jsonl")
        json.dump(part, open(tp, "w"))
        open(op, "w").close()
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
                   XLA_PYTHON_CLIENT_MEM_FRACTION=str(mem_fraction))
        cmd = [sys.executable, os.path.join(HERE, "lightning_attention.py"), "--mode", "worker", "--tasks", tp,
               "--worker-out", op, "--lock", lock_path, "--deadline", str(deadline)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        outs.append(op)
    stopped = []

    def stop(signum, frame):  # an outer time limit (SIGTERM): stop the workers, keep what they wrote
        stopped.append(signum)
        for p in procs:
            p.kill()
    old_handler = signal.signal(signal.SIGTERM, stop)
    try:
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline + 30 - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    if stopped:
        print("stopped by SIGTERM: writing the records gathered so far", flush=True)
    recs = []
    for op in outs:
        recs += [json.loads(line) for line in open(op) if line.strip()]
    return recs


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def add_floors(recs, bw):
    for r in recs:
        if r.get("kind") in ("time", "fla") and "fwd" in r:
            B, H, T, D = r["shape"]
            h0 = r["setting"] == "state"
            r["floor_fwd"] = shape_bytes(B, H, T, D, bwd=False, h0=h0) / bw * 1e3
            r["floor_fwdbwd"] = shape_bytes(B, H, T, D, bwd=True, h0=h0) / bw * 1e3
            r["x_floor"] = [r["fwd"] / r["floor_fwd"], r["fwdbwd"] / r["floor_fwdbwd"]]
        if r.get("kind") == "short" and "fwd" in r:
            B, H, T, D = r["shape"]
            r["floor_fwd"] = shape_bytes(B, H, T, D, bwd=False, h0=True) / bw * 1e3
            r["x_floor"] = [r["fwd"] / r["floor_fwd"]]
        if r.get("kind") == "decode" and "fwd" in r:
            B, H, D = r["shape"]
            r["floor_fwd"] = (2 * B * H * D * D * 4 + 4 * B * H * D * 2) / bw * 1e3
            r["x_floor"] = [r["fwd"] / r["floor_fwd"]]
    return recs


def sweep_table(recs, variant):
    """Markdown table of one variant's grid points (training setting), with fla where measured."""
    fla = {(tuple(r["shape"]), r["setting"]): r for r in recs if r.get("kind") == "fla" and "fwd" in r}
    rows = sorted((r for r in recs if r.get("kind") == "time" and r.get("variant") == variant and "fwd" in r),
                  key=lambda r: (r["setting"], r["shape"][3], r["shape"][0] * r["shape"][1], r["shape"][2]))
    lines = ["| setting | B,H,T,D | B·H | fwd ms | × floor | fwd+bwd ms | × floor | fla fwd / fwd+bwd ms | fla ÷ ours |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        B, H, T, D = r["shape"]
        f = fla.get((tuple(r["shape"]), r["setting"]))
        fs = f"{f['fwd']:.3f} / {f['fwdbwd']:.3f}" if f else "-"
        ratio = f"{f['fwd'] / r['fwd']:.2f}x / {f['fwdbwd'] / r['fwdbwd']:.2f}x" if f else "-"
        lines.append(f"| {r['setting']} | {B},{H},{T},{D} | {B * H} | {r['fwd']:.3f} | {r['x_floor'][0]:.2f} | "
                     f"{r['fwdbwd']:.3f} | {r['x_floor'][1]:.2f} | {fs} | {ratio} |")
    return "\n".join(lines)


def worst(recs, variant, k=5):
    rows = [r for r in recs if r.get("kind") == "time" and r.get("variant") == variant and "x_floor" in r
            and r["setting"] == "train"]
    out = {}
    for i, name in ((0, "fwd"), (1, "fwdbwd")):
        out[name] = [(r["shape"], round(r["x_floor"][i], 2)) for r in sorted(rows, key=lambda r: -r["x_floor"][i])[:k]]
    return out


def heatmap(recs, variant, path):
    """time / floor over (B·H, T), D = 128, training setting; forward and forward+backward."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in recs if r.get("kind") == "time" and r.get("variant") == variant and "x_floor" in r
            and r["setting"] == "train" and r["shape"][3] == 128]
    if not rows:
        return
    bhs = sorted({(r["shape"][0], r["shape"][1]) for r in rows}, key=lambda bh: (bh[0] * bh[1], bh))
    Ts = sorted({r["shape"][2] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(bhs) + 2.2))
    for ax, i, title in ((axes[0], 0, "forward"), (axes[1], 1, "forward + backward")):
        M = np.full((len(bhs), len(Ts)), np.nan)
        for r in rows:
            M[bhs.index((r["shape"][0], r["shape"][1])), Ts.index(r["shape"][2])] = r["x_floor"][i]
        im = ax.imshow(M, cmap="RdYlGn_r", vmin=1.0, vmax=4.0, aspect="auto")
        for a in range(len(bhs)):
            for b in range(len(Ts)):
                if np.isfinite(M[a, b]):
                    ax.text(b, a, f"{M[a, b]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(Ts)))
        ax.set_xticklabels([f"{T // 1024}K" for T in Ts])
        ax.set_yticks(range(len(bhs)))
        ax.set_yticklabels([f"B={b} H={h} ({b * h})" for b, h in bhs], fontsize=8)
        ax.set_xlabel("T")
        ax.set_title(f"{title}: time / HBM floor ({variant}, bf16, D=128)")
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def start_f32(tmp, lock_path, log, configs="", mem_fraction=0.03):
    """The float32 candidates of ``lightning_f32.py`` (``configs``, comma-separated; empty: all), each in
    its own process (they compile in parallel)."""
    sys.path.insert(0, HERE)
    import lightning_f32
    out = os.path.join(tmp, "f32.jsonl")
    open(out, "w").close()
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", XLA_PYTHON_CLIENT_MEM_FRACTION=str(mem_fraction))
    procs = {name: subprocess.Popen([sys.executable, os.path.join(HERE, "lightning_f32.py"), "--config", name,
                                     "--out", out, "--lock", lock_path, "--speed"],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
             for name in (configs.split(",") if configs else lightning_f32.CONFIGS)}
    return dict(procs=procs, out=out, start=time.time())


def finish_f32(f32, timeout, deadline):
    """Waits for the float32 candidates (each at most ``timeout`` s from the start); a candidate still
    running then is killed and recorded with the last stage it finished."""
    killed = {}
    for name, p in f32["procs"].items():
        left = min(f32["start"] + timeout, deadline + 20) - time.time()
        try:
            p.wait(timeout=max(0.5, left))
        except subprocess.TimeoutExpired:
            p.kill()
            killed[name] = round(time.time() - f32["start"], 1)
    recs = [json.loads(line) for line in open(f32["out"]) if line.strip()]
    for name, at in killed.items():
        stages = [r["stage"] for r in recs if r.get("config") == name]
        recs.append(dict(config=name, stage="killed", s=at, last_stage=stages[-1] if stages else None))
    return recs


def summary(result):
    """The compact tables printed last."""
    recs, lines = result["records"], []
    bw = result["bandwidth"]
    lines.append(f"copy bandwidth {bw['bytes_per_s'] / 1e12:.2f} TB/s ({bw.get('source', 'measured')})")
    variants = sorted({r["variant"] for r in recs if r.get("kind") == "time"})
    for v in variants:
        rows = [r for r in recs if r.get("kind") == "time" and r["variant"] == v and "x_floor" in r]
        if not rows:
            continue
        for r in sorted(rows, key=lambda r: (r["setting"], r["shape"][0] * r["shape"][1], r["shape"][2])):
            lines.append(f"{v:16s} {r['setting']:5s} {str(tuple(r['shape'])):22s} fwd {r['fwd']:8.3f} "
                         f"({r['x_floor'][0]:4.2f}x) fwd+bwd {r['fwdbwd']:8.3f} ({r['x_floor'][1]:4.2f}x)")
        w = worst(recs, v, k=3)
        lines.append(f"{v}: worst fwd {w['fwd']}; worst fwd+bwd {w['fwdbwd']}")
    for r in recs:
        if r.get("kind") == "fla" and "fwd" in r:
            lines.append(f"fla {r['setting']:5s} {tuple(r['shape'])} fwd {r['fwd']:.3f} fwd+bwd {r['fwdbwd']:.3f}")
        if r.get("kind") in ("short", "decode") and "fwd" in r:
            lines.append(f"{r['kind']:6s} {tuple(r['shape'])} {r['fwd']:.4f} ms ({r['x_floor'][0]:.2f}x floor)")
        if r.get("kind") in ("check", "packed") and ("ok" in r or "error" in r):
            errs = " ".join(f"{k} {e:.1e}" for k, e in r.get("errs", {}).items())
            lines.append(f"{r['kind']} {tuple(r.get('shape', ()))} {'ok' if r.get('ok') else 'BAD'} {errs} "
                         f"{r.get('error', '')[:200]}")
        if "error" in r and r.get("kind") in ("time", "fla", "short", "decode"):
            lines.append(f"ERR {r['kind']} {r.get('variant', '')} {r.get('shape')}: {r['error'][:200]}")
    skipped = [r for r in recs if "skipped" in r]
    if skipped:
        lines.append(f"skipped (deadline): {len(skipped)} tasks")
    for r in result.get("f32", []):
        keep = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "config"}
        lines.append(f"f32 {r['config']:15s} {json.dumps(keep)[:300]}")
    return "\n".join(lines)


def sweep_main(args, meta):
    import tempfile
    t0 = time.time()
    deadline = t0 + args.budget
    tmp = tempfile.mkdtemp(prefix="lightning_sweep_")
    log = open(os.path.join(args.out, f"sweep_{args.tag}.log"), "w")
    _resolve_presets()
    variants = {}
    for name in args.variants.split(","):
        variants.update(PRESETS[name])
    full = {k: v for k, v in variants.items() if v[1] is None}
    tasks = time_tasks(full, fla=args.fla, settings=True, priority=2)
    # variants at a few points run after the whole grid (skipped first when time runs out)
    tasks += time_tasks({k: v for k, v in variants.items() if v[1] is not None}, settings=False, priority=3)
    default_tuning = next(iter(full.values()))[0] if full else {}
    tasks += other_tasks(default_tuning, checks=args.checks, packed=args.checks, short=args.short)
    lock_path = os.path.join(tmp, "gpu.lock")
    f32 = start_f32(tmp, lock_path, log, args.f32_configs) if args.f32 else None
    recs = run_workers(tasks, workers=args.workers, deadline=deadline, tmp=tmp, mem_fraction=args.mem_fraction,
                       log=log)
    f32_recs = finish_f32(f32, args.f32_timeout, deadline) if f32 else []
    bw = next((r for r in recs if r.get("kind") == "bandwidth" and "bytes_per_s" in r), None)
    if bw is None:  # never happens unless worker 0 died; the figure KINDS.md gives for this card
        bw = dict(bytes_per_s=4.3e12, source="not measured: 4.3 TB/s assumed")
    add_floors(recs, bw["bytes_per_s"])
    result = dict(meta=dict(meta, wall_s=round(time.time() - t0, 1), variants={k: v[0] for k, v in variants.items()}),
                  bandwidth=bw, records=recs, f32=f32_recs)
    with open(os.path.join(args.out, f"sweep_{args.tag}.json"), "w") as f:
        json.dump(result, f, indent=1)
    for name in full:
        heatmap(recs, name, os.path.join(args.out, f"sweep_{args.tag}.png"))
        break
    log.close()
    print(summary(result))
    print(f"wall {time.time() - t0:.0f} s")


def report_main(args):
    """Tables and the heat map again from a saved sweep (``--inputs sweep_<tag>.json``), the floors at the
    run's measured bandwidth or at ``--bandwidth`` bytes/s; ``--fastest``: each point's fastest run."""
    result = json.load(open(args.inputs))
    bw = dict(result["bandwidth"])
    if args.bandwidth:
        bw = dict(bytes_per_s=args.bandwidth, source=f"given: {args.bandwidth / 1e12:.2f} TB/s")
    result["bandwidth"] = bw
    if getattr(args, "fastest", False):
        for r in result["records"]:
            if r.get("fwd_runs") and r.get("fwdbwd_runs"):
                r["fwd"], r["fwdbwd"] = min(r["fwd_runs"]), min(r["fwdbwd_runs"])
    add_floors(result["records"], bw["bytes_per_s"])
    os.makedirs(args.out, exist_ok=True)
    for v in sorted({r["variant"] for r in result["records"] if r.get("kind") == "time"}):
        print(f"\n### {v} (floors at {bw['bytes_per_s'] / 1e12:.2f} TB/s)\n")
        print(sweep_table(result["records"], v))
        print(worst(result["records"], v))
    if args.tag:
        heatmap(result["records"], "default", os.path.join(args.out, f"sweep_{args.tag}.png"))
