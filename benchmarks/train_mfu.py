"""Training throughput and MFU of a preset on the local accelerator (synthetic tokens).

    python benchmarks/train_mfu.py                       # small preset, seq 8192, a sweep of layouts
    python benchmarks/train_mfu.py --preset tiny --seq 256 --variants b4-none --steps 3   # CPU smoke

Runs the real train step (``m1_jax.train.step``: model, chunked cross-entropy, MoE aux loss, AdamW,
non-finite guard) jitted on one device; needs neither gin nor Grain. Rows are synthetic: random tokens,
one document per row (no segment ids, so the Pallas lightning kernel is used on GPU); ``+packed`` rows
pass segment ids (document-separated attention; the lightning op then uses its reference path).
MFU = model FLOPs (``m1_jax.flops.train_step_flops``: forward x 3, causal-halved softmax attention,
chunked lightning, k active experts + router, LM head; remat not counted) / time / peak (989 TFLOP/s
dense bf16 for H100/H200 SXM, unless --peak_tflops).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sharding  # noqa: E402
from m1_jax import ModelConfig, flops  # noqa: E402
from m1_jax.train import step as step_lib  # noqa: E402
from m1_jax.train.metrics import device_peak_tflops  # noqa: E402
from m1_jax.train.optimizer import OptimizerConfig, make_optimizer  # noqa: E402

# name -> (batch, remat, head_dtype, packed, moe_impl)
VARIANTS = {
    "b1-none": (1, "none", "bfloat16", False, "ragged"),
    "b2-none": (2, "none", "bfloat16", False, "ragged"),
    "b4-none": (4, "none", "bfloat16", False, "ragged"),
    "b4-dots": (4, "dots_no_batch", "bfloat16", False, "ragged"),
    "b4-full": (4, "full", "bfloat16", False, "ragged"),
    "b8-full": (8, "full", "bfloat16", False, "ragged"),
    "b2-none-f32head": (2, "none", "float32", False, "ragged"),
    "b2-none+packed": (2, "none", "bfloat16", True, "ragged"),
}
DEFAULT = "b2-none,b4-full,b4-dots,b8-full,b2-none-f32head,b2-none+packed"


def head_only(cfg: ModelConfig, tokens: int, head_dtype: str, steps: int) -> float:
    """Seconds of the LM head + cross-entropy forward and backward alone (the loss's share of a step)."""
    from m1_jax.train.loss import chunked_cross_entropy

    k = jax.random.split(jax.random.key(0), 3)
    h = (jax.random.normal(k[0], (1, tokens, cfg.hidden_size), jnp.float32)).astype(cfg.dtype)
    w = jax.random.normal(k[1], (cfg.hidden_size, cfg.vocab_size), jnp.float32) * 0.02
    t = jax.random.randint(k[2], (1, tokens), 0, cfg.vocab_size)
    m = jnp.ones((1, tokens), jnp.float32)
    f = jax.jit(jax.grad(lambda h, w: chunked_cross_entropy(h, w, t, m, head_dtype=head_dtype)[0], (0, 1)))
    jax.block_until_ready(f(h, w))
    t0 = time.perf_counter()
    for _ in range(steps):
        r = f(h, w)
    jax.block_until_ready(r)
    return (time.perf_counter() - t0) / steps


def components(preset: str, batch: int, seq: int, steps: int) -> dict:
    """Seconds of one layer's forward + backward, per kind, at ``batch x seq`` tokens (where a step goes)."""
    from flax import nnx

    from m1_jax.model import LightningAttention, MoE, SoftmaxAttention

    cfg = ModelConfig.preset(preset)
    dt = jnp.dtype(cfg.dtype)
    x = (jax.random.normal(jax.random.key(0), (batch, seq, cfg.hidden_size), jnp.float32)).astype(dt)
    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    out = {}
    for name, make, call in (
        ("moe", lambda: MoE(cfg, rngs=nnx.Rngs(0)), lambda m, x: m(x)[0]),
        ("lightning", lambda: LightningAttention(cfg, rngs=nnx.Rngs(0)), lambda m, x: m(x, 0)),
        ("softmax", lambda: SoftmaxAttention(cfg, rngs=nnx.Rngs(0)), lambda m, x: m(x, pos)),
    ):
        try:
            g, st = nnx.split(make())
            f = jax.jit(jax.grad(lambda st, x: jnp.sum(call(nnx.merge(g, st), x).astype(jnp.float32) ** 2),
                                 argnums=(0, 1)))
            jax.block_until_ready(f(st, x))
            t0 = time.perf_counter()
            for _ in range(steps):
                r = f(st, x)
            jax.block_until_ready(r)
            out[name + "_layer_s"] = (time.perf_counter() - t0) / steps
        except Exception as e:  # pragma: no cover
            out[name + "_layer_s"] = None
            print(f"  component {name} failed: {str(e).splitlines()[0][:200]}", flush=True)
    return out


def run_variant(name: str, preset: str, seq: int, steps: int, warmup: int, peak: float | None) -> dict:
    batch, remat, head_dtype, packed, moe_impl = VARIANTS[name]
    cfg = ModelConfig.preset(preset, remat=remat, moe_impl=moe_impl)
    tx, sched = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=10), 1000)
    mesh = sharding.make_mesh(sharding.MeshConfig())
    t0 = time.perf_counter()
    state, shardings = step_lib.create_state(cfg, tx, 0, mesh)
    graphdef, _ = step_lib.abstract_model(cfg)
    fn = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, tx, sched, aux_loss_coef=cfg.router_aux_loss_coef, z_loss_coef=0.0,
                                 loss_chunk_size=4096, head_dtype=head_dtype, use_segment_ids=packed),
        shardings, mesh)
    rng = np.random.default_rng(0)

    def batch_():
        toks = rng.integers(0, cfg.vocab_size, (batch, seq + 1), dtype=np.int32)
        seg = np.ones((batch, seq), np.int32)
        if packed:  # four documents a row
            seg = np.repeat(np.arange(1, 5, dtype=np.int32), seq // 4)[None].repeat(batch, 0)
        return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg,
                "loss_mask": np.ones((batch, seq), np.float32)}

    batches = [batch_() for _ in range(2)]
    with jax.set_mesh(mesh):
        lowered = fn.lower(state, batches[0])
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        for i in range(warmup):
            state, m = compiled(state, batches[i % 2])
        jax.block_until_ready(m)
        t1 = time.perf_counter()
        for i in range(steps):
            state, m = compiled(state, batches[i % 2])
        jax.block_until_ready((state, m))
        dt = (time.perf_counter() - t1) / steps
    loss = float(m["loss"])
    fl = flops.train_step_flops(cfg, batch, seq)
    n = jax.device_count()
    tflops = fl / dt / n / 1e12
    mem = jax.devices()[0].memory_stats() or {}
    row = {"variant": name, "batch": batch, "seq": seq, "remat": remat, "head_dtype": head_dtype, "packed": packed,
           "moe_impl": moe_impl, "step_s": dt, "tokens_per_s": batch * seq / dt, "tflops_per_device": tflops,
           "mfu": tflops / peak if peak else None, "loss": loss, "compile_s": compile_s,
           "peak_mem_gib": mem.get("peak_bytes_in_use", 0) / 2**30}
    try:
        row["head_s"] = head_only(cfg, batch * seq, head_dtype, steps)
    except Exception as e:  # pragma: no cover
        row["head_s"] = None
        print(f"  head-only timing failed: {e}", flush=True)
    del state, compiled, fn
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--variants", default=DEFAULT, help=f"comma-separated names from {sorted(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak_tflops", type=float, default=None)
    ap.add_argument("--budget_s", type=float, default=520.0, help="skip remaining variants after this long")
    ap.add_argument("--components", action="store_true",
                    help="after the first variant that runs, time one layer of each kind (fwd + bwd)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    peak = args.peak_tflops or device_peak_tflops()
    dev = jax.devices()[0]
    cfg = ModelConfig.preset(args.preset)
    header = {"device": f"{jax.device_count()} x {dev.device_kind}", "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "preset": args.preset, "seq": args.seq,
              "peak_tflops": peak, "train_gflop_per_token": flops.train_flops_per_token(cfg, args.seq) / 1e9,
              "params": cfg.num_params()}
    try:
        import flax, optax
        header["flax"], header["optax"] = flax.__version__, optax.__version__
    except Exception:
        pass
    print(json.dumps(header), flush=True)
    rows = []
    start = time.perf_counter()
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; expected one of {sorted(VARIANTS)}")
        if time.perf_counter() - start > args.budget_s:
            print(f"{name}: skipped (budget)", flush=True)
            continue
        try:
            row = run_variant(name, args.preset, args.seq, args.steps, args.warmup, peak)
        except Exception as e:
            msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            print(f"{name}: FAILED: {msg}", flush=True)
            traceback.print_exc(limit=3)
            rows.append({"variant": name, "error": msg})
            continue
        if args.components and not any("moe_layer_s" in r for r in rows):
            row.update(components(args.preset, row["batch"], args.seq, args.steps))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"header": header, "rows": rows}, f, indent=1)
    print(f"\n{header['device']}, jax {header['jax']}, preset {args.preset}, seq {args.seq}")
    print(f"{'variant':<18} {'batch':>5} {'remat':>13} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'head s':>7} {'mem GiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<18} FAILED: {r['error'][:80]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        hs = f"{r['head_s']:.3f}" if r.get("head_s") else "-"
        print(f"{r['variant']:<18} {r['batch']:>5} {r['remat']:>13} {r['step_s']:>8.3f} {r['tokens_per_s']:>10.0f} "
              f"{r['tflops_per_device']:>8.1f} {mfu:>6} {hs:>7} {r['peak_mem_gib']:>8.1f}")
    for r in rows:
        if r.get("moe_layer_s"):
            L = ModelConfig.preset(args.preset)
            n_lin = sum(t == "linear_attention" for t in L.layer_types)
            n_full = L.num_hidden_layers - n_lin
            parts = {"moe": L.num_hidden_layers * r["moe_layer_s"], "lightning": n_lin * (r["lightning_layer_s"] or 0),
                     "softmax": n_full * (r["softmax_layer_s"] or 0), "lm_head+loss": r.get("head_s") or 0}
            print(f"\nwhere a {r['variant']} step goes (layers timed alone, fwd + bwd; step {r['step_s']:.3f} s): " +
                  ", ".join(f"{k} {v:.3f} s" for k, v in parts.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
