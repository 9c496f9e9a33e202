"""Measured forward (prefill) wall-clock: lightning vs softmax, hybrid vs its softmax twin.

Times, on whatever accelerator JAX sees (written for one H100):

* one lightning layer (``LightningAttention``; every ``--lightning-backends`` entry that works),
* one softmax layer (``SoftmaxAttention``'s projections + ``jax.nn.dot_product_attention`` with
  ``implementation="cudnn"`` on GPU, "xla" elsewhere),
* the one-token decode step of each layer at context T (lightning: recurrent state update; softmax:
  attention over a KV cache of T entries),
* the whole ``small`` preset (7+1 hybrid) and its softmax twin, prefill: ``hidden_states`` over T
  tokens plus the float32 LM head of the last token (full [T, V] logits at 256K would be 200 GB).

Shapes are the ``small`` preset's (hidden 1024, 8 heads x 128, GQA 2), batch 1, bf16 activations.
Each row has the analytic FLOPs (``m1_jax.flops``, causal, prefill conventions) and the achieved
TFLOP/s. The crossover is the first length at which softmax is slower than lightning.

    python benchmarks/flops_measured.py --out results/          # table + JSON + PNG
    python benchmarks/flops_measured.py --quick                  # CPU smoke run (tiny lengths)

Results: ``docs/benchmarks/flops.md``. Everything is best-effort per row: an out-of-memory or an
unsupported backend is recorded and the sweep goes on; ``--budget-s`` stops starting new rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from m1_jax import flops as F  # noqa: E402
from m1_jax.config import ModelConfig  # noqa: E402

T0 = time.time()


def timeit(fn, *args, min_reps=3, min_time=0.5, max_reps=20):
    """Compile + warm up once, then the median of >= min_reps timed calls (>= min_time seconds in all)."""
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t
    times = []
    while len(times) < min_reps or (sum(times) < min_time and len(times) < max_reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times), compile_s


def layer_flops(cfg, kind, T, decode=False):
    """Analytic forward FLOPs of one layer's attention block (projections + core), batch 1."""
    arch = F.as_arch(cfg if kind == "lightning" else F.softmax_twin(cfg))
    layer = next(l for l in arch.layers if l.attn == kind)
    one = F.Arch(name=kind, layers=(layer.__class__(**{**vars(layer), "ffn_params": 0, "ffn_params_all": 0,
                                                        "router_params": 0}),),
                 hidden=arch.hidden, vocab=0, block_size=arch.block_size)
    if decode:  # the token at position T - 1 with T - 1 cached: recurrent lightning, T keys for softmax
        return F.flops_per_token(one, T - 1, F.DECODE)
    return F.forward_flops(one, T, conv=F.PREFILL)


def model_prefill_flops(cfg, T):
    no_head = F.PREFILL.replace(lm_head=False)
    return F.forward_flops(cfg, T, conv=no_head) + 2 * cfg.vocab_size * cfg.hidden_size


def build_layer(cfg, kind, backend, attn_impl):
    from m1_jax.model.lightning import LightningAttention
    from m1_jax.model.softmax_attention import SoftmaxAttention

    if kind == "lightning":
        layer = LightningAttention(cfg.replace(lightning_backend=backend), rngs=nnx.Rngs(0))
        g, s = nnx.split(layer)
        return jax.jit(lambda s, x: nnx.merge(g, s)(x, 0)), s
    layer = SoftmaxAttention(cfg, rngs=nnx.Rngs(0))
    g, s = nnx.split(layer)

    def fwd(s, x):
        m = nnx.merge(g, s)
        pos = jnp.arange(x.shape[1], dtype=jnp.int32)[None]
        q, k, v = m.project_qkv(x, pos)
        return m.output(jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=attn_impl))

    return jax.jit(fwd), s


def build_decode(cfg, kind, T):
    """One-token step at context T: projections + core, with a random cache/state of the right size."""
    from pallas_kernels.lightning.reference import lightning_decode_reference
    from m1_jax.model.lightning import LightningAttention, lightning_decay
    from m1_jax.model.softmax_attention import SoftmaxAttention

    dt = jnp.bfloat16
    H, N, D, K = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.num_key_value_heads
    key = jax.random.PRNGKey(1)
    if kind == "lightning":
        layer = LightningAttention(cfg, rngs=nnx.Rngs(0))
        g, s = nnx.split(layer)
        state = jax.random.normal(key, (1, N, D, D), jnp.float32)

        def step(s, x, state):
            m = nnx.merge(g, s)
            qkv = jax.nn.silu(jnp.einsum("bh,hnkd->bnkd", x, m.qkv_proj[...].astype(dt)))
            o, st = lightning_decode_reference(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], lightning_decay(cfg, 0), state)
            gate = jax.nn.sigmoid(jnp.einsum("bh,hnd->bnd", x, m.output_gate[...].astype(dt)))
            return jnp.einsum("bnd,ndh->bh", (gate * o).astype(dt), m.out_proj[...].astype(dt)), st

        return jax.jit(step), (s, state)
    layer = SoftmaxAttention(cfg, rngs=nnx.Rngs(0))
    g, s = nnx.split(layer)
    kc = jax.random.normal(key, (1, T, K, D), dt)
    vc = jax.random.normal(jax.random.PRNGKey(2), (1, T, K, D), dt)

    def step(s, x, kc, vc):
        m = nnx.merge(g, s)
        q, k, v = m.project_qkv(x[:, None], jnp.full((1, 1), T - 1, jnp.int32))
        kc = jax.lax.dynamic_update_slice(kc, k, (0, T - 1, 0, 0))
        vc = jax.lax.dynamic_update_slice(vc, v, (0, T - 1, 0, 0))
        o = jax.nn.dot_product_attention(q, kc, vc, implementation="xla")
        return m.output(o)[:, 0], kc, vc

    return jax.jit(step), (s, kc, vc)


def build_model(cfg, attn_impl):
    import m1_jax.model.softmax_attention as sa
    from m1_jax.model import MiniMaxForCausalLM

    if attn_impl and not getattr(sa.causal_attention, "_bench_patched", False):
        orig = sa.causal_attention  # the model's default is the XLA path (T^2 scores): use cuDNN on GPU

        def patched(q, k, v, *, segment_ids=None, implementation=None):
            return orig(q, k, v, segment_ids=segment_ids, implementation=implementation or attn_impl)

        patched._bench_patched = True
        sa.causal_attention = patched
    model = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0))
    g, s = nnx.split(model)

    def prefill(s, ids):
        m = nnx.merge(g, s)
        h, _ = m.hidden_states(ids)
        return m.logits(h[:, -1:])

    return jax.jit(prefill), s


def run_rows(args, log):
    cfg = ModelConfig.preset(args.preset, dtype="bfloat16", param_dtype="bfloat16")
    on_gpu = jax.default_backend() == "gpu"
    softmax_impls = ["cudnn", "xla"] if on_gpu else ["xla"]
    rows = []
    dead = set()  # subjects that hit OOM / the per-row cap: skip their longer lengths

    def record(subject, T, fn_builder, flops):
        if subject in dead:
            return
        if time.time() - T0 > args.budget_s:
            log(f"  budget reached: skip {subject} T={T}")
            return
        row = {"subject": subject, "T": T, "flops": flops}
        try:
            fn, params, inputs = fn_builder()
            sec, comp = timeit(fn, params, *inputs)
            row.update(seconds=sec, compile_s=comp, tflops=flops / sec / 1e12)
            log(f"  {subject:28s} T={T:>8d}  {sec * 1e3:10.3f} ms  {flops / sec / 1e12:8.2f} TFLOP/s  "
                f"(compile {comp:.1f}s)")
            if sec > args.row_cap_s:
                dead.add(subject)
        except Exception as e:  # noqa: BLE001 - recorded and reported
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            row["error"] = msg
            log(f"  {subject:28s} T={T:>8d}  FAILED {msg}")
            if args.verbose:
                traceback.print_exc()
            dead.add(subject)
        rows.append(row)

    key = jax.random.PRNGKey(0)
    layer_lengths = [T for T in args.layer_lengths if T <= args.max_len] if "layers" in args.sections else []
    for T in layer_lengths:
        x = lambda T=T: jax.random.normal(key, (1, T, cfg.hidden_size), jnp.bfloat16)
        for be in args.lightning_backends:
            def b(be=be, T=T):
                fn, s = build_layer(cfg, "lightning", be, None)
                return fn, s, (x(),)
            record(f"lightning layer ({be})", T, b, layer_flops(cfg, "lightning", T))
        for impl in softmax_impls:
            def bs(T=T, impl=impl):
                fn, s = build_layer(cfg, "softmax", None, impl)
                return fn, s, (x(),)
            record(f"softmax layer ({impl})", T, bs, layer_flops(cfg, "softmax", T))
    for T in [T for T in args.decode_lengths if T <= args.max_len and "decode" in args.sections]:
        xd = jax.random.normal(key, (1, cfg.hidden_size), jnp.bfloat16)
        for kind in ("lightning", "softmax"):
            def bd(kind=kind, T=T):
                fn, ins = build_decode(cfg, kind, T)
                return fn, ins[0], (xd, *ins[1:])
            record(f"{kind} layer decode step", T, bd, layer_flops(cfg, kind, T, decode=True))
    twin = F.softmax_twin(cfg)
    ok_cudnn = any(r["subject"] == "softmax layer (cudnn)" and "seconds" in r for r in rows)
    attn_impl = "cudnn" if ok_cudnn or (on_gpu and "layers" not in args.sections) else "xla"
    ok_pallas = any(r["subject"] == "lightning layer (pallas_gpu)" and "seconds" in r for r in rows) or (
        on_gpu and "layers" not in args.sections and "pallas_gpu" in args.lightning_backends)
    cfg = cfg.replace(lightning_backend="pallas_gpu" if ok_pallas else "reference")
    log(f"whole-model softmax attention: {attn_impl}; lightning backend: {cfg.lightning_backend}")
    for T in [T for T in args.model_lengths if T <= args.max_len and "model" in args.sections]:
        ids = lambda T=T: jax.random.randint(key, (1, T), 0, cfg.vocab_size, jnp.int32)
        for name, c in ((f"{args.preset} (hybrid)", cfg), (f"{args.preset} softmax twin", twin)):
            name = f"{name} [{cfg.lightning_backend if c is cfg else attn_impl}]"
            def bm(c=c, T=T):
                fn, s = build_model(c, attn_impl)
                return fn, s, (ids(),)
            record(name, T, bm, model_prefill_flops(c, T))
    return rows, cfg


def xla_cost_check(cfg, T, log):
    """XLA's cost analysis of the model forward on this backend vs the analytic count (unrolled layers)."""
    from m1_jax.model import MiniMaxForCausalLM

    out = {}
    for impl in ("ragged", "dense"):
        try:
            c = cfg.replace(scan_layers=False, moe_impl=impl)
            m = nnx.eval_shape(lambda: MiniMaxForCausalLM(c, rngs=nnx.Rngs(0)))
            g, s = nnx.split(m)
            comp = jax.jit(lambda s, ids: nnx.merge(g, s).hidden_states(ids)[0]).lower(
                s, jax.ShapeDtypeStruct((1, T), jnp.int32)).compile()
            ca = comp.cost_analysis()
            ca = ca[0] if isinstance(ca, (list, tuple)) else ca
            conv = F.PREFILL.replace(causal=False, lm_head=False)
            res = {"xla_flops": float(ca["flops"])}
            for e in F.EXPERT_MODES:
                res[f"analytic_{e}"] = F.forward_flops(c, T, conv=conv.replace(experts=e))
            out[impl] = res
            log(f"  XLA cost analysis, moe_impl={impl}, T={T}: " + ", ".join(f"{k}={v:.3e}" for k, v in res.items()))
        except Exception as e:  # noqa: BLE001
            out[impl] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            log(f"  XLA cost analysis, moe_impl={impl}: FAILED {out[impl]['error']}")
    return out


def environment():
    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "jax": jax.__version__, "backend": jax.default_backend(),
           "device": str(jax.devices()[0].device_kind), "python": platform.python_version()}
    try:
        import flax
        import jaxlib
        env["flax"], env["jaxlib"] = flax.__version__, jaxlib.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return env


def crossovers(rows):
    """First T at which the softmax subject is slower than the lightning / hybrid one."""
    by = rows_by_subject(rows)

    def first(fast, slow):
        a, b = by.get(fast, {}), by.get(slow, {})
        return next((T for T in sorted(a) if T in b and b[T] > a[T]), None)

    out = {}
    for lin in [k for k in by if k.startswith("lightning layer (")]:
        for sm in [k for k in by if k.startswith("softmax layer (")]:
            out[f"{lin} vs {sm}"] = first(lin, sm)
    out["decode step"] = first("lightning layer decode step", "softmax layer decode step")
    hyb = next((k for k in by if "(hybrid)" in k), None)
    tw = next((k for k in by if "softmax twin" in k), None)
    out["hybrid vs softmax twin"] = first(hyb, tw) if hyb and tw else None
    return out


def rows_by_subject(rows):
    by = {}
    for r in rows:
        if "seconds" in r:
            by.setdefault(r["subject"], {})[r["T"]] = r["seconds"]
    return by


def table(rows):
    lines = ["| subject | T | ms | analytic GFLOP | TFLOP/s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "seconds" in r:
            lines.append(f"| {r['subject']} | {r['T']:,} | {r['seconds'] * 1e3:.3f} | {r['flops'] / 1e9:,.2f} | "
                         f"{r['tflops']:.2f} |")
        else:
            lines.append(f"| {r['subject']} | {r['T']:,} | {r.get('error', '')[:80]} | {r['flops'] / 1e9:,.2f} | - |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = rows_by_subject(rows)
    groups = [("one layer, prefill", lambda k: k.endswith(")") and "layer (" in k),
              ("one layer, decode step at context T", lambda k: "decode" in k),
              ("whole model, prefill", lambda k: "hybrid" in k or "twin" in k)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, (title, sel) in zip(axes, groups):
        for k, s in by.items():
            if sel(k):
                Ts = sorted(s)
                ax.plot(Ts, [s[T] * 1e3 for T in Ts], "o-", label=k)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (tokens)")
        ax.set_ylabel("wall-clock (ms)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(paths, out):
    rows, envs = {}, []
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        envs.append(res["env"])
        for r in res["rows"]:
            rows[(r["subject"], r["T"])] = r
    order = ["lightning layer (", "softmax layer (", "lightning layer decode", "softmax layer decode", "(hybrid)", "twin"]
    rank = lambda r: (next((i for i, o in enumerate(order) if o in r["subject"]), 9), r["subject"], r["T"])
    rows = sorted(rows.values(), key=rank)
    os.makedirs(out, exist_ok=True)
    res = {"envs": envs, "rows": rows, "crossovers": crossovers(rows)}
    with open(os.path.join(out, "flops_measured.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = table(rows) + "\n\ncrossovers (first T where softmax is slower): " + json.dumps(res["crossovers"])
    with open(os.path.join(out, "flops_measured.md"), "w") as f:
        f.write(md + "\n")
    plot(rows, os.path.join(out, "flops_measured.png"))
    print(md)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    K = 1024
    p.add_argument("--out", default="flops_measured_out")
    p.add_argument("--preset", default="small")
    p.add_argument("--layer-lengths", type=lambda s: [int(x) for x in s.split(",")],
                   default=[K * 2**i for i in range(11)])  # 1K .. 1M
    p.add_argument("--decode-lengths", type=lambda s: [int(x) for x in s.split(",")],
                   default=[K * 4**i for i in range(6)])  # 1K .. 1M
    p.add_argument("--model-lengths", type=lambda s: [int(x) for x in s.split(",")],
                   default=[K, 4 * K, 16 * K, 32 * K, 64 * K, 128 * K, 256 * K])
    p.add_argument("--lightning-backends", type=lambda s: s.split(","), default=["reference", "pallas_gpu"])
    p.add_argument("--max-len", type=int, default=1 << 20)
    p.add_argument("--budget-s", type=float, default=480, help="start no new row after this many seconds")
    p.add_argument("--row-cap-s", type=float, default=8.0, help="a row slower than this ends its subject's sweep")
    p.add_argument("--sections", type=lambda s: s.split(","), default=["layers", "decode", "model", "xla"],
                   help="comma-separated subset of layers,decode,model,xla")
    p.add_argument("--skip-xla-check", action="store_true")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny preset, short lengths")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--merge", type=lambda s: s.split(","), default=None,
                   help="no measuring: merge saved flops_measured.json files (later files replace earlier rows "
                        "of the same subject and T) and write the table and PNG to --out")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.quick:
        args.preset, args.max_len = "tiny", 256
        args.layer_lengths, args.decode_lengths, args.model_lengths = [64, 256], [64, 256], [64, 256]
        args.lightning_backends = ["reference"]
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "log.txt"), "w")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    env = environment()
    log(json.dumps(env))
    rows, cfg = run_rows(args, log)
    res = {"env": env, "preset": args.preset, "rows": rows, "crossovers": crossovers(rows)}
    if not args.skip_xla_check and "xla" in args.sections and time.time() - T0 < args.budget_s + 60:
        res["xla_cost_analysis"] = xla_cost_check(cfg, 256 if args.quick else 4096, log)
    with open(os.path.join(args.out, "flops_measured.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = table(rows) + "\n\ncrossovers (first T where softmax is slower): " + json.dumps(res["crossovers"])
    with open(os.path.join(args.out, "flops_measured.md"), "w") as f:
        f.write(md + "\n")
    log(md)
    try:
        plot(rows, os.path.join(args.out, "flops_measured.png"))
    except Exception as e:  # noqa: BLE001
        log(f"plot failed: {e}")
    log(f"total {time.time() - T0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
