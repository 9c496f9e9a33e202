"""Throughput of the real training step of a preset on 1, 2, 4, 8 devices with FSDP, expert and context parallelism.

One process drives all local devices; each configuration ``N:mesh[:moe_impl]`` runs on the first ``N``
devices with its own mesh. The step is ``m1_jax.train.step`` (model, chunked cross-entropy + z-loss,
MoE aux loss, AdamW with clipping, non-finite guard, optional gradient accumulation), jitted with the
shardings of a mesh run (``sharding.state_shardings`` for the state, ``sharding.batch_sharding`` for
the batch), exactly as ``m1-jax train`` builds it.

    python benchmarks/scaling.py --configs "1:fsdp=1" "2:fsdp=2" "2:expert=2" "4:fsdp=2,expert=2" \
        "8:fsdp=2,expert=4" "2:context=2" "8:expert=4,context=2" --microbatches 1 --profile --out scaling.jsonl

Scaling (``--scaling``): ``weak`` (default) gives every device ``--batch-per-device x --seq`` tokens (a
context-parallel mesh multiplies the sequence by the context size instead of the batch); ``strong``
runs the same ``--batch x --seq`` global batch on every row (same data and init: the first-step losses
agree across meshes, which the CPU test checks).

MoE: ``auto`` (the preset's choice) on meshes without an expert axis; with one, the dropless
``ep_ragged`` (``ragged_all_to_all``) on GPU/TPU, and on the CPU (XLA:CPU has no ragged-all-to-all)
the dropless ``ep_capacity`` (``moe_capacity_factor = -1``); ``:impl`` on a config or ``--moe-impl``
overrides.

Every row: tokens/s, tokens/s per device, MFU (``m1_jax.flops.train_step_flops`` / step time / devices /
peak, peak from ``m1_jax.train.metrics.device_peak_tflops`` or ``--peak_tflops``), per-device efficiency
vs the 1-device row of the same run, compile seconds, the compiled step's memory plan per device
(arguments + outputs - aliased + temporaries), and with ``--profile`` the communication time of one
step: a ``jax.profiler`` trace read back with ``jax.profiler.ProfileData``, summing the events whose
names are collectives (all-reduce, all-gather, reduce-scatter, all-to-all, ragged-all-to-all,
collective-permute, and NCCL kernels), per device. A markdown table at the end; ``--out`` appends JSON lines.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import re
import sys
import tempfile
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 2 ** 30
COLLECTIVE = re.compile(r"^(ragged-all-to-all|all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                        r"(-start|-done)?([.\-_]\d+)*$")
NCCL_KERNEL = re.compile(r"nccl.*(AllReduce|AllGather|ReduceScatter|AllToAll|SendRecv|Broadcast)", re.I)


def parse_config(s: str) -> tuple[int, str, str | None]:
    """``"N:mesh[:moe_impl]"`` -> (N, mesh string, impl or None)."""
    n, sep, rest = s.partition(":")
    if not sep or not n.strip().isdigit() or int(n) < 1:
        raise SystemExit(f"--configs entry {s!r}: expected 'N:mesh[:moe_impl]' with N a positive integer, "
                         "e.g. '4:fsdp=2,expert=2'")
    mesh, _, impl = rest.partition(":")
    return int(n), mesh, impl or None


def communication_seconds(trace_dir: str, n_devices: int) -> tuple[float | None, int, str]:
    """(seconds of collectives per device in the trace, number of collective events, how it was read).

    GPU/TPU: the device planes (``/device:...``); their ``XLA Ops`` line when present (one event per HLO
    op), else NCCL kernels on the stream lines. CPU: XLA:CPU records one host event per collective
    thunk (each device's), so the host total is divided by the device count. None when no trace file
    or no reader exists."""
    import jax

    reader = getattr(jax.profiler, "ProfileData", None)
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if reader is None or not files:
        return None, 0, "not available (no jax.profiler.ProfileData or no trace file)"
    total_ns, count, device_planes = 0, 0, 0
    host_ns, host_count = 0, 0
    for f in files:
        data = reader.from_file(f)
        for plane in data.planes:
            lines = list(plane.lines)
            if plane.name.startswith("/device:"):
                device_planes += 1
                ops = [ln for ln in lines if ln.name == "XLA Ops"]
                for ln in ops or lines:
                    for ev in ln.events:
                        if COLLECTIVE.match(ev.name) or (not ops and NCCL_KERNEL.search(ev.name)):
                            total_ns += ev.duration_ns
                            count += 1
            elif plane.name.startswith("/host:"):
                for ln in lines:
                    for ev in ln.events:
                        if COLLECTIVE.match(ev.name):
                            host_ns += ev.duration_ns
                            host_count += 1
    if device_planes:
        return total_ns / 1e9 / device_planes, count, f"device planes ({device_planes})"
    if host_count:
        return host_ns / 1e9 / n_devices, host_count, "host thunk events / devices"
    return 0.0, 0, "no collective events in the trace"


def default_impl(mesh_sizes: dict, requested: str | None, platform: str) -> tuple[str, float | None]:
    """(moe_impl, capacity factor override) for a row."""
    if requested:
        return requested, None
    if mesh_sizes["expert"] > 1:
        if platform in ("gpu", "tpu"):
            return "ep_ragged", None
        return "ep_capacity", -1.0  # dropless; XLA:CPU has no ragged-all-to-all
    return "auto", None


def run_config(spec: str, args, overrides: dict, devices, peak: float | None) -> dict:
    import jax

    import sharding
    from m1_jax import ModelConfig, flops
    from m1_jax.memory import compiled_memory_plan_bytes
    from m1_jax.model.moe import resolve_impl
    from m1_jax.train import step as step_lib
    from m1_jax.train.optimizer import OptimizerConfig, make_optimizer
    from m1_jax.train.setup import check_batch_layout

    n, mesh_str, impl = parse_config(spec)
    mesh = sharding.make_mesh(sharding.MeshConfig.from_string(mesh_str), devices=devices[:n])
    sizes = sharding.mesh_sizes(mesh)
    impl, cf = default_impl(sizes, impl or args.moe_impl, jax.default_backend())
    kw = dict(overrides, remat=args.remat, moe_impl=impl)
    if cf is not None:
        kw["moe_capacity_factor"] = cf
    elif args.capacity_factor is not None:
        kw["moe_capacity_factor"] = args.capacity_factor
    cfg = ModelConfig.preset(args.preset, **kw)
    cp = sizes["context"]
    if args.scaling == "weak":
        B, T = args.batch_per_device * n // cp, args.seq * cp
        if B < 1 or args.batch_per_device * n % cp:
            raise ValueError(f"config {spec!r}: --batch-per-device {args.batch_per_device} x {n} devices is not "
                             f"divisible by context = {cp}")
    else:
        B, T = args.batch, args.seq
    check_batch_layout(mesh, B, T, batch_field="batch", seq_field="seq")
    ways = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if B % (args.microbatches * ways):
        raise ValueError(f"config {spec!r}: batch {B} is not divisible by --microbatches {args.microbatches} x "
                         f"data*fsdp*expert = {ways}")

    tx, sched = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=10), 1000)
    state, shardings = step_lib.create_state(cfg, tx, args.seed, mesh)
    graphdef, _ = step_lib.abstract_model(cfg)
    fn = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, tx, sched, aux_loss_coef=cfg.router_aux_loss_coef, z_loss_coef=1e-4,
                                 loss_chunk_size=min(args.loss_chunk_size, T), head_dtype=args.head_dtype,
                                 use_segment_ids=False, microbatches=args.microbatches),
        shardings, mesh)
    rng = np.random.default_rng(args.seed)
    toks = rng.integers(0, cfg.vocab_size, (B, T + 1), dtype=np.int32)
    host = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((B, T), np.int32),
            "loss_mask": np.ones((B, T), np.float32)}
    bs = sharding.batch_sharding(mesh, 2)
    batch = {k: jax.device_put(v, bs) for k, v in host.items()}
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        compiled = fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        plan_bytes = compiled_memory_plan_bytes(compiled)
        plan = None if plan_bytes is None else plan_bytes / GIB
        print(f"  {spec}: compiled in {compile_s:.1f} s, memory plan {plan if plan is None else round(plan, 2)} "
              f"GiB/device; batch {B} x {T}, moe {resolve_impl(impl, mesh)}", flush=True)
        state, m = compiled(state, batch)  # first step: same data and init on every row
        first_loss = float(m["loss"])
        for _ in range(max(0, args.warmup - 1)):
            state, m = compiled(state, batch)
        jax.block_until_ready(state)
        t1 = time.perf_counter()
        for _ in range(args.steps):
            state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
        dt = (time.perf_counter() - t1) / max(args.steps, 1)
        comm = {}
        if args.profile:
            with tempfile.TemporaryDirectory() as d:
                with jax.profiler.trace(d):
                    state, m = compiled(state, batch)
                    jax.block_until_ready((state, m))
                try:
                    s, count, how = communication_seconds(d, n)
                except Exception as e:  # an unreadable trace is reported, never guessed
                    s, count, how = None, 0, f"not available ({type(e).__name__}: {str(e)[:200]})"
            comm = {"comm_s": s, "comm_events": count, "comm_source": how,
                    "comm_fraction": (s / dt) if (s is not None and dt > 0) else None}
    fl = flops.train_step_flops(cfg, B, T)
    tflops = fl / dt / n / 1e12
    tokens = B * T
    row = {"config": spec, "n": n, "mesh": {k: v for k, v in sizes.items() if v > 1}, "moe_impl": resolve_impl(impl, mesh),
           "moe_capacity_factor": cfg.moe_capacity_factor, "preset": args.preset, "scaling": args.scaling,
           "batch": B, "seq": T, "microbatches": args.microbatches, "remat": args.remat, "step_s": dt,
           "tokens_per_s": tokens / dt, "tokens_per_s_per_device": tokens / dt / n, "tflops_per_device": tflops,
           "mfu": tflops / peak if peak else None, "compile_s": compile_s, "mem_plan_gib": plan,
           "first_loss": first_loss, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
           "max_expert_load": float(m["moe/max_load"]), **comm}
    del state, compiled, fn, batch
    gc.collect()
    jax.clear_caches()
    return row


def markdown(rows: list[dict], header: dict) -> str:
    ok = [r for r in rows if "error" not in r and "skipped" not in r]
    base = next((r["tokens_per_s_per_device"] for r in ok if r["n"] == 1), None)
    out = [f"{header['device']}, jax {header['jax']}, preset {header['preset']}, {header['scaling']} scaling, "
           f"{header['tokens']}, microbatches {header['microbatches']}, remat {header['remat']}, AdamW, "
           f"{header['date']}", "",
           "| devices | mesh | MoE | batch x seq | step (s) | tokens/s | tokens/s/device | eff. vs 1 | MFU | "
           "comm/step (s) | mem plan (GiB/dev) | compile (s) | first loss |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r or "skipped" in r:
            out.append(f"| - | {r['config']} | | | {'FAILED: ' + r['error'][:60] if 'error' in r else r['skipped']} "
                       "| | | | | | | | |")
            continue
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items()) or "single"
        eff = f"{r['tokens_per_s_per_device'] / base:.2f}" if base else "- (no 1-device row)"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "- (no peak)"
        comm = ("-" if "comm_source" not in r else
                f"{r['comm_s']:.4f} ({100 * r['comm_fraction']:.0f}%)" if r.get("comm_s") is not None else
                "not available")
        mem = f"{r['mem_plan_gib']:.2f}" if r["mem_plan_gib"] is not None else "-"
        out.append(f"| {r['n']} | {mesh} | {r['moe_impl']} | {r['batch']} x {r['seq']} | {r['step_s']:.3f} | "
                   f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_device']:,.0f} | {eff} | {mfu} | {comm} | {mem} | "
                   f"{r['compile_s']:.0f} | {r['first_loss']:.5f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--configs", nargs="+", default=["1:fsdp=1", "2:fsdp=2", "2:expert=2", "4:fsdp=2,expert=2",
                                                     "8:fsdp=2,expert=4", "2:context=2", "8:expert=4,context=2"])
    ap.add_argument("--moe-impl", default=None, help="every row's MoE (default: see the module doc)")
    ap.add_argument("--capacity-factor", type=float, default=None, help="for ep_capacity rows (default: preset's)")
    ap.add_argument("--scaling", choices=("weak", "strong"), default="weak")
    ap.add_argument("--batch-per-device", type=int, default=4, help="weak scaling: sequences per device")
    ap.add_argument("--batch", type=int, default=8, help="strong scaling: global batch")
    ap.add_argument("--seq", type=int, default=8192, help="tokens per sequence (x context in weak scaling)")
    ap.add_argument("--microbatches", type=int, default=1, help="gradient accumulation steps per optimizer step")
    ap.add_argument("--steps", type=int, default=4, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps (the first is the loss every row reports)")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--head-dtype", default="bfloat16")
    ap.add_argument("--loss-chunk-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak_tflops", type=float, default=None, help="per-device peak (default: from the device kind)")
    ap.add_argument("--profile", action="store_true", help="communication time of one step from a profiler trace")
    ap.add_argument("--time-budget", type=float, default=540.0, help="seconds; later configs are skipped")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--override", nargs="*", default=[], help="ModelConfig overrides key=value (Python literals)")
    args = ap.parse_args(argv)
    for name in ("batch_per_device", "batch", "seq", "microbatches", "warmup"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} = {getattr(args, name)}: expected a positive integer")
    if args.steps < 1:
        raise SystemExit(f"--steps = {args.steps}: expected a positive integer")
    specs = [parse_config(s) for s in args.configs]  # all parsed before any compute
    from m1_jax.config import ConfigError, parse_overrides

    try:
        overrides = parse_overrides(args.override, flag="--override")
    except ConfigError as e:
        raise SystemExit(str(e)) from None

    import jax

    from m1_jax import ModelConfig
    from m1_jax.train.metrics import device_peak_tflops

    ModelConfig.preset(args.preset, **overrides)  # a bad override fails here, naming the field
    devices = jax.devices()
    peak = args.peak_tflops or device_peak_tflops()
    header = {"device": f"{len(devices)} x {devices[0].device_kind}", "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "preset": args.preset,
              "overrides": overrides, "scaling": args.scaling, "microbatches": args.microbatches,
              "remat": args.remat, "peak_tflops": peak,
              "tokens": (f"{args.batch_per_device} x {args.seq} tokens per device" if args.scaling == "weak"
                         else f"{args.batch} x {args.seq} tokens per step")}
    try:
        import flax
        import optax
        header["flax"], header["optax"] = flax.__version__, optax.__version__
    except Exception:  # pragma: no cover
        pass
    out_f = open(args.out, "a") if args.out else None

    def emit(rec):
        line = json.dumps(rec)
        print(line, flush=True)
        if out_f:
            out_f.write(line + "\n")
            out_f.flush()

    emit({"info": header})
    rows: list[dict] = []
    t_start = time.time()
    for i, (spec, (n, _, _)) in enumerate(zip(args.configs, specs)):
        elapsed = time.time() - t_start
        if elapsed > args.time_budget:
            rows.append({"config": spec, "skipped": "time budget"})
        elif n > len(devices):
            rows.append({"config": spec, "skipped": f"needs {n} devices, {len(devices)} present"})
        else:
            eta = f", ~{elapsed / i * (len(specs) - i):.0f} s left" if i else ""
            print(f"[{i + 1}/{len(specs)}] {spec} ({elapsed:.0f} s elapsed{eta})", flush=True)
            try:
                rows.append(run_config(spec, args, overrides, devices, peak))
            except Exception as e:  # one failing config must not lose the others
                rows.append({"config": spec, "error": f"{type(e).__name__}: {str(e)[:1500]}"})
                traceback.print_exc(limit=4)
        emit(rows[-1])
    print()
    print(markdown(rows, header))
    if out_f:
        out_f.close()
    return 0 if any("error" not in r and "skipped" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
