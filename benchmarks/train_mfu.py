"""Training throughput, MFU, memory and compile time of a preset on the local accelerator (synthetic tokens).

    python benchmarks/train_mfu.py --preset small --variants b2,b2+packed --components
    python benchmarks/train_mfu.py --preset medium --variants b4-mb4,b4-mb4+packed --components
    python benchmarks/train_mfu.py --preset tiny --seq 256 --variants b4 --steps 3     # CPU smoke

Runs the real train step (``m1_jax.train.step``: model, chunked cross-entropy, MoE aux loss, AdamW
with clipping, non-finite guard) jitted on one device; needs neither gin nor Grain. A variant is
``b<batch>`` followed by ``-`` / ``+`` options:

* remat ``none`` (default) | ``full`` | ``dots`` (= ``dots_no_batch``) | ``dotsall`` (= ``dots``);
* ``mb<n>``: gradient accumulation over n microbatches (one optimizer update per step);
* ``packed``: four documents a row (segment ids; document-separated attention);
* ``cast``: the parameter tree cast to bf16 once per step instead of at every use;
* ``f32head``: float32 LM-head operands (default bf16 operands, float32 logits);
* an MoE implementation (``gmm``, ``ragged``, ``dense``; default the preset's ``auto``) or a grouped-GEMM
  backend (``mosaic``, ``triton``, ``xla``).

Every row prints tokens/s, MFU, the step's device memory (XLA's buffer plan for the compiled step:
arguments + outputs - aliased + temporaries), lowering and compile seconds. ``--components`` adds a
step breakdown for the first row: one layer of each kind forward + backward, the LM head with the
loss, and the optimizer update, each jitted and timed alone. MFU = model FLOPs
(``m1_jax.flops.train_step_flops``: forward x 3, causal-halved softmax attention, chunked lightning,
k active experts + router, LM head; remat not counted) / time / peak (989 TFLOP/s dense bf16 for
H100/H200 SXM, unless --peak_tflops).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sharding  # noqa: E402
from m1_jax import ModelConfig, flops  # noqa: E402
from m1_jax.config import ConfigError, parse_overrides  # noqa: E402
from m1_jax.memory import compiled_memory_plan_bytes  # noqa: E402
from m1_jax.train import step as step_lib  # noqa: E402
from m1_jax.train.metrics import device_peak_tflops  # noqa: E402
from m1_jax.train.optimizer import OptimizerConfig, make_optimizer  # noqa: E402

GIB = 2 ** 30
REMAT = {"none": "none", "full": "full", "dots": "dots_no_batch", "dotsall": "dots"}
MOE_IMPLS = ("gmm", "ragged", "dense", "auto")
BACKENDS = {"mosaic": "mosaic_gpu", "triton": "triton", "xla": "xla"}
DEFAULT = {"small": "b2,b2+packed", "medium": "b4-mb4,b4-mb4+packed"}


def parse_variant(name: str) -> dict:
    m = re.fullmatch(r"b(\d+)((?:[-+][a-z0-9_]+)*)", name)
    if not m:
        raise SystemExit(f"variant {name!r}: expected b<batch> followed by -/+ options (see --help)")
    v = dict(name=name, batch=int(m.group(1)), remat="none", microbatches=1, packed=False, cast=False,
             head_dtype="bfloat16", moe_impl=None, moe_backend=None)
    for opt in re.findall(r"[-+]([a-z0-9_]+)", m.group(2)):
        if opt in REMAT:
            v["remat"] = REMAT[opt]
        elif re.fullmatch(r"mb\d+", opt):
            v["microbatches"] = int(opt[2:])
        elif opt == "packed":
            v["packed"] = True
        elif opt == "cast":
            v["cast"] = True
        elif opt == "f32head":
            v["head_dtype"] = "float32"
        elif opt in MOE_IMPLS:
            v["moe_impl"] = opt
        elif opt in BACKENDS:
            v["moe_backend"] = BACKENDS[opt]
        else:
            raise SystemExit(f"variant {name!r}: unknown option {opt!r}")
    return v


def config_for(preset: str, v: dict, overrides: dict) -> ModelConfig:
    kw = dict(overrides, remat=v["remat"])
    if v["moe_impl"]:
        kw["moe_impl"] = v["moe_impl"]
    if v["moe_backend"]:
        kw["moe_backend"] = v["moe_backend"]
    return ModelConfig.preset(preset, **kw)


def time_fn(fn, *args, steps: int) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


def components(cfg: ModelConfig, v: dict, seq: int, steps: int, tx) -> dict:
    """Seconds of one layer of each kind forward + backward, of the LM head + loss, and of the optimizer
    update, each jitted alone at the row's microbatch (where a step goes)."""
    from flax import nnx

    from m1_jax.model import LightningAttention, MoE, SoftmaxAttention
    from m1_jax.train.loss import chunked_cross_entropy

    dt = jnp.dtype(cfg.dtype)
    B = v["batch"] // v["microbatches"]
    x = jax.random.normal(jax.random.key(0), (B, seq, cfg.hidden_size), jnp.float32).astype(dt)
    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (B, seq))
    seg = jnp.broadcast_to(jnp.repeat(jnp.arange(1, 5, dtype=jnp.int32), seq // 4), (B, seq)) if v["packed"] else None
    out = {}
    for name, make, call in (
        ("moe", lambda: MoE(cfg, rngs=nnx.Rngs(0)), lambda m, x: m(x)[0]),
        ("lightning", lambda: LightningAttention(cfg, rngs=nnx.Rngs(0)), lambda m, x: m(x, 0, segment_ids=seg)),
        ("softmax", lambda: SoftmaxAttention(cfg, rngs=nnx.Rngs(0)), lambda m, x: m(x, pos, segment_ids=seg)),
    ):
        try:
            g, st = nnx.split(make())
            f = jax.jit(jax.grad(lambda st, x: jnp.sum(call(nnx.merge(g, st), x).astype(jnp.float32) ** 2),
                                 argnums=(0, 1)))
            out[name + "_layer_s"] = time_fn(f, st, x, steps=steps) * v["microbatches"]
        except Exception as e:  # pragma: no cover
            out[name + "_layer_s"] = None
            print(f"  component {name} failed: {str(e).splitlines()[0][:200]}", flush=True)
    try:
        k = jax.random.split(jax.random.key(1), 2)
        w = jax.random.normal(k[0], (cfg.hidden_size, cfg.vocab_size), jnp.float32) * 0.02
        t = jax.random.randint(k[1], (B, seq), 0, cfg.vocab_size)
        mask = jnp.ones((B, seq), jnp.float32)
        f = jax.jit(jax.grad(lambda h, w: chunked_cross_entropy(h, w, t, mask, head_dtype=v["head_dtype"],
                                                                chunk_size=4096)[0], (0, 1)))
        out["head_s"] = time_fn(f, x, w, steps=steps) * v["microbatches"]
    except Exception as e:  # pragma: no cover
        out["head_s"] = None
        print(f"  component head failed: {str(e).splitlines()[0][:200]}", flush=True)
    try:
        params = jax.jit(lambda: step_lib.init_state(cfg, tx, 0)["params"])()
        opt = jax.jit(tx.init)(params)
        grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

        def update(params, opt, grads):
            import optax
            upd, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, upd), opt

        f = jax.jit(update, donate_argnums=(0, 1))
        params, opt = f(params, opt, grads)
        jax.block_until_ready(params)
        t0 = time.perf_counter()
        for _ in range(steps):
            params, opt = f(params, opt, grads)
        jax.block_until_ready(params)
        out["optimizer_s"] = (time.perf_counter() - t0) / steps
        del params, opt, grads
    except Exception as e:  # pragma: no cover
        out["optimizer_s"] = None
        print(f"  component optimizer failed: {str(e).splitlines()[0][:200]}", flush=True)
    return out


def _plan_gib(compiled) -> float | None:
    b = compiled_memory_plan_bytes(compiled)
    return None if b is None else b / GIB


def run_variant(v: dict, preset: str, seq: int, steps: int, warmup: int, peak: float | None, overrides: dict,
                want_components: bool) -> dict:
    cfg = config_for(preset, v, overrides)
    batch, mb = v["batch"], v["microbatches"]
    tx, sched = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=10), 1000)
    mesh = sharding.make_mesh(sharding.MeshConfig())
    state, shardings = step_lib.create_state(cfg, tx, 0, mesh)
    graphdef, _ = step_lib.abstract_model(cfg)
    fn = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, tx, sched, aux_loss_coef=cfg.router_aux_loss_coef, z_loss_coef=1e-4,
                                 loss_chunk_size=4096, head_dtype=v["head_dtype"], use_segment_ids=v["packed"],
                                 microbatches=mb, cast_params=cfg.dtype if v["cast"] else None),
        shardings, mesh)
    rng = np.random.default_rng(0)

    def batch_():
        toks = rng.integers(0, cfg.vocab_size, (batch, seq + 1), dtype=np.int32)
        seg = np.ones((batch, seq), np.int32)
        if v["packed"]:  # four documents a row
            seg = np.repeat(np.arange(1, 5, dtype=np.int32), seq // 4)[None].repeat(batch, 0)
        return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg,
                "loss_mask": np.ones((batch, seq), np.float32)}

    batches = [batch_() for _ in range(2)]
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        lowered = fn.lower(state, batches[0])
        t1 = time.perf_counter()
        print(f"  {v['name']}: lowered in {t1 - t0:.1f} s, compiling ...", flush=True)
        compiled = lowered.compile()
        t2 = time.perf_counter()
        print(f"  {v['name']}: compiled in {t2 - t1:.1f} s, memory plan {_plan_gib(compiled)} GiB", flush=True)
        for i in range(warmup):
            state, m = compiled(state, batches[i % 2])
        jax.block_until_ready(m)
        t3 = time.perf_counter()
        for i in range(steps):
            state, m = compiled(state, batches[i % 2])
        jax.block_until_ready((state, m))
        dt = (time.perf_counter() - t3) / steps
    fl = flops.train_step_flops(cfg, batch, seq)
    tflops = fl / dt / jax.device_count() / 1e12
    mem = jax.devices()[0].memory_stats() or {}
    row = {"variant": v["name"], "preset": preset, "batch": batch, "microbatches": mb, "seq": seq, "remat": v["remat"],
           "head_dtype": v["head_dtype"], "packed": v["packed"], "cast_params": v["cast"], "moe_impl": cfg.moe_impl,
           "moe_backend": cfg.moe_backend, "step_s": dt, "tokens_per_s": batch * seq / dt, "tflops_per_device": tflops,
           "mfu": tflops / peak if peak else None, "loss": float(m["loss"]), "lower_s": t1 - t0,
           "compile_s": t2 - t1, "mem_plan_gib": _plan_gib(compiled),
           "process_peak_gib": mem.get("peak_bytes_in_use", 0) / GIB}
    del state, compiled, fn, lowered
    if want_components:
        row.update(components(cfg, v, seq, max(2, steps), tx))
    return row


def breakdown(row: dict, cfg: ModelConfig) -> str:
    n_lin = sum(t == "linear_attention" for t in cfg.layer_types)
    n_full = cfg.num_hidden_layers - n_lin
    parts = {"moe": cfg.num_hidden_layers * (row.get("moe_layer_s") or 0),
             "lightning": n_lin * (row.get("lightning_layer_s") or 0),
             "softmax": n_full * (row.get("softmax_layer_s") or 0),
             "lm_head+loss": row.get("head_s") or 0, "optimizer": row.get("optimizer_s") or 0}
    parts["rest"] = row["step_s"] - sum(parts.values())
    return ", ".join(f"{k} {v * 1e3:.1f} ms ({v / row['step_s']:.0%})" for k, v in parts.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--variants", default=None, help="comma-separated variants (default per preset: "
                    f"{DEFAULT})")
    ap.add_argument("--set", action="append", default=[], help="model override key=value (Python literal)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak_tflops", type=float, default=None)
    ap.add_argument("--budget_s", type=float, default=520.0, help="skip remaining variants after this long")
    ap.add_argument("--components", action="store_true", help="step breakdown for the first row")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    try:
        overrides = parse_overrides(args.set, flag="--set")
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    variants = [parse_variant(s.strip()) for s in (args.variants or DEFAULT.get(args.preset, "b1")).split(",")
                if s.strip()]
    peak = args.peak_tflops or device_peak_tflops()
    dev = jax.devices()[0]
    cfg = ModelConfig.preset(args.preset, **overrides)
    header = {"device": f"{jax.device_count()} x {dev.device_kind}", "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "preset": args.preset, "seq": args.seq,
              "overrides": overrides, "peak_tflops": peak,
              "train_gflop_per_token": flops.train_flops_per_token(cfg, args.seq) / 1e9, "params": cfg.num_params()}
    try:
        import flax
        import optax
        header["flax"], header["optax"] = flax.__version__, optax.__version__
    except Exception:  # pragma: no cover
        pass
    print(json.dumps(header), flush=True)
    rows = []
    start = time.perf_counter()

    def dump():
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"header": header, "rows": rows}, f, indent=1)

    for i, v in enumerate(variants):
        if time.perf_counter() - start > args.budget_s:
            print(f"{v['name']}: skipped (budget)", flush=True)
            rows.append({"variant": v["name"], "error": "skipped (budget)"})
            continue
        try:
            row = run_variant(v, args.preset, args.seq, args.steps, args.warmup, peak, overrides,
                              args.components and not any("moe_layer_s" in r for r in rows))
        except Exception as e:
            msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            print(f"{v['name']}: FAILED: {msg}", flush=True)
            traceback.print_exc(limit=3)
            rows.append({"variant": v["name"], "error": msg})
            dump()
            continue
        rows.append(row)
        print(json.dumps(row), flush=True)
        dump()
    print(f"\n{header['device']}, jax {header['jax']}, preset {args.preset}, seq {args.seq}")
    print(f"{'variant':<22} {'step s':>7} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8} {'lower s':>8} "
          f"{'compile s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<22} FAILED: {r['error'][:80]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        mem = f"{r['mem_plan_gib']:.1f}" if r.get("mem_plan_gib") is not None else "-"
        print(f"{r['variant']:<22} {r['step_s']:>7.3f} {r['tokens_per_s']:>9.0f} {r['tflops_per_device']:>8.1f} "
              f"{mfu:>6} {mem:>8} {r['lower_s']:>8.1f} {r['compile_s']:>9.1f}")
    for r in rows:
        if r.get("moe_layer_s") is not None:
            print(f"\nwhere a {r['variant']} step goes (parts jitted alone; step {r['step_s'] * 1e3:.1f} ms): "
                  + breakdown(r, config_for(args.preset, parse_variant(r["variant"]), overrides)))
    dump()
    return 0 if any("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
