"""Generation benchmark: prefill and decode of the ``small`` preset (bf16 weights) and its softmax-only twin.

For each model (``hybrid``: 7 lightning + 1 softmax per block; ``twin``: every layer softmax, same sizes),
batch and context it reports prefill tokens/s, decode ms/token, memory, compile time and the decode step's
memory floor: the bytes one step must read (the experts its tokens route to, attention weights, router,
LM head, lightning states read and written, the KV cache) over the read bandwidth measured in the same run.

Decode at long contexts runs on a cache filled with random values of the right length (decode cost does
not depend on what the cache holds), so batch 64 x 1M needs no 64M-token prefill; the cache of one (model,
batch) is allocated once at the largest context and its fill ``length`` set per context, so decoding
compiles once per (model, batch). Prefill runs for real (batch 1 up to 1M tokens).

Correctness of the GPU paths is checked first (``generate_checks.py``; ``--no-check`` skips it): the Pallas
cache-attention kernel and the packed-row flash path against the XLA blockwise path (bf16 and float32, odd
lengths, left padding), and cached greedy generation against the full forward.

    python benchmarks/generate.py --out OUT                  # one H200: everything, ~9 minutes at most
    python benchmarks/generate.py --quick --out /tmp/gen     # CPU smoke test (tiny model)
    python benchmarks/generate.py --models hybrid --batches 1 --contexts 1K,1M --budget-s 200

Writes ``OUT/generate.json`` (every row, the card, versions, bandwidth), ``OUT/checks.json`` and
``OUT/generate.png``; prints the table last.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.97")  # batch 64 x 1M needs ~128 GiB of KV cache

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax import nnx  # noqa: E402

from m1_jax import MiniMaxForCausalLM, ModelConfig  # noqa: E402
from m1_jax.config import FULL, LINEAR  # noqa: E402
from m1_jax.dtypes import as_dtype  # noqa: E402
from m1_jax.inference import Session, cache_bytes  # noqa: E402
from m1_jax.model.cache import Cache, init_cache, layer_counts  # noqa: E402
from m1_jax.model.compute_weights import cast_to_compute_dtype  # noqa: E402
from m1_jax.model.moe.layer import DECODE_PRODUCTS, is_decode_shape, moe_forward  # noqa: E402

from generate_checks import check_paths  # noqa: E402

CONTEXTS = {"1K": 1 << 10, "8K": 1 << 13, "32K": 1 << 15, "128K": 1 << 17, "512K": 1 << 19, "1M": 1 << 20}
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def parse_contexts(s: str) -> list[int]:
    out = []
    for tok in s.split(","):
        tok = tok.strip()
        out.append(CONTEXTS[tok] if tok in CONTEXTS else int(tok))
    return out


def label(n: int) -> str:
    for k, v in CONTEXTS.items():
        if v == n:
            return k
    return str(n)


# ------------------------------------------------------------------------------------- configs and floor
def configs(quick: bool, moe_impl: str | None = None, param_dtype: str | None = None,
            moe_decode: str | None = None) -> dict[str, ModelConfig]:
    """The hybrid and its softmax-only twin; ``moe_impl``, ``param_dtype`` and ``moe_decode`` replace the
    preset's."""
    if quick:
        base = ModelConfig.preset("tiny", num_hidden_layers=4, layer_types=(LINEAR, FULL) * 2, moe_impl="dense",
                                  max_position_embeddings=1 << 16)
    else:
        base = ModelConfig.preset("small", param_dtype="bfloat16", dtype="bfloat16", max_position_embeddings=1 << 21)
    if moe_impl:
        base = base.replace(moe_impl=moe_impl)
    if param_dtype:
        base = base.replace(param_dtype=param_dtype)
    if moe_decode:
        base = base.replace(moe_decode=moe_decode)
    return {"hybrid": base, "twin": base.replace(layer_types=(FULL,) * base.num_hidden_layers)}


def expected_experts(E: int, picks: int) -> float:
    """Expected distinct experts among ``picks`` uniform choices of ``E`` (random routing)."""
    return E * (1.0 - (1.0 - 1.0 / E) ** picks)


def floor_bytes(c: ModelConfig, batch: int, context: int, cast_weights: bool = True) -> dict[str, float]:
    """Bytes one decode step must read (each once): weights it uses, states (read + written), KV cache.
    ``cast_weights``: the engine holds the weights in ``c.dtype`` where the parameters are wider (the LM
    head keeps its dtype: it runs in float32)."""
    head_w = np.dtype(as_dtype(c.param_dtype)).itemsize
    w = min(head_w, np.dtype(as_dtype(c.dtype)).itemsize) if cast_weights else head_w
    H, N, K, D, I, E = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                        c.intermediate_size, c.num_local_experts)
    n_lin, n_full = layer_counts(c)
    lightning_w = (H * 3 * N * D + H * N * D + N * D * H) * w
    softmax_w = (H * N * D + 2 * H * K * D + N * D * H) * w
    experts = c.num_hidden_layers * expected_experts(E, batch * c.num_experts_per_tok) * 3 * H * I * w
    router = c.num_hidden_layers * H * E * 4
    head = c.vocab_size * H * head_w
    states = 2 * n_lin * batch * N * D * D * 4
    kv = n_full * 2 * batch * context * K * D * np.dtype(as_dtype(c.dtype)).itemsize
    parts = dict(attention_weights=n_lin * lightning_w + n_full * softmax_w, experts=experts, router=router,
                 lm_head=head, states=states, kv_cache=kv)
    parts["total"] = sum(parts.values())
    return parts


def read_bandwidth(quick: bool) -> float:
    """Bytes/s of a large read-only reduction (median of 10)."""
    n = (1 << 20) if quick else (4 << 30)  # bf16 elements: 8 GiB on the GPU
    x = jnp.ones((n,), jnp.bfloat16) * 1.5
    f = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    f(x).block_until_ready()
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t)
    del x
    return 2 * n / float(np.median(ts))


def mem_stats() -> dict:
    try:
        s = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001
        s = {}
    return {k: int(s[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in s}


def fill_random_cache(c: ModelConfig, B: int, S: int, seed: int) -> Cache:
    """A cache of ``S`` slots holding random keys, values and states (one random block of slots tiled)."""
    n_lin, n_full = layer_counts(c)
    blk = math.gcd(S, 4096)

    def make():
        cache = init_cache(c, B, S)
        k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
        shape = (n_full, B, c.num_key_value_heads, blk, c.head_dim)
        kb = jax.random.normal(k1, shape, jnp.float32).astype(cache.keys.dtype)
        vb = jax.random.normal(k2, shape, jnp.float32).astype(cache.values.dtype)

        def body(i, kv):
            at = (0, 0, 0, i * blk, 0)
            return jax.lax.dynamic_update_slice(kv[0], kb, at), jax.lax.dynamic_update_slice(kv[1], vb, at)

        keys, values = jax.lax.fori_loop(0, S // blk, body, (cache.keys, cache.values))
        states = 0.05 * jax.random.normal(k3, cache.lightning.shape, jnp.float32)
        return cache._replace(lightning=states, keys=keys, values=values)

    return jax.jit(make)()


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def run_decode(name, model, c, B, contexts, steps, repeats, bw, budget, rows, save, cast_weights=True):
    slots = -(-(max(contexts) + (repeats + 2) * steps + 8) // 256) * 256
    need = cache_bytes(c, slots, B)
    log(f"decode {name} B={B}: cache of {slots} slots, {need / 2**30:.1f} GiB")
    try:
        cache = fill_random_cache(c, B, slots, seed=B)
        sess = Session(model, np.ones((B, 1), np.int32), max_new_tokens=steps, slots=slots, cast_weights=cast_weights)
        logits = jax.random.normal(jax.random.key(0), (B, c.vocab_size), jnp.float32)
        cache = jax.block_until_ready(cache)
    except Exception as e:  # noqa: BLE001  (out of memory: report and go on)
        rows.append(dict(kind="decode", model=name, batch=B, context=max(contexts), error=f"{type(e).__name__}: {str(e)[:300]}"))
        log(f"  failed: {rows[-1]['error']}")
        save()
        return
    for ctx in sorted(contexts):
        if budget.left() < 10:
            log("  budget exhausted")
            break
        times, compile_s = [], 0.0
        try:
            for r in range(repeats + 1):
                c0 = sess.timings["compile_s"]
                sess.start_from_cache(cache._replace(length=jnp.int32(ctx)), logits)
                d0 = sess.timings["decode_s"]
                sess.decode()
                compile_s += sess.timings["compile_s"] - c0
                times.append((sess.timings["decode_s"] - d0) / (steps - 1))
                cache = sess.state.cache
            exe = sess.executables.get("decode")
            temp = exe.memory_analysis().temp_size_in_bytes if exe is not None else None
        except Exception as e:  # noqa: BLE001
            rows.append(dict(kind="decode", model=name, batch=B, context=ctx, error=f"{type(e).__name__}: {str(e)[:300]}"))
            log(f"  {label(ctx)} failed: {rows[-1]['error']}")
            save()
            return
        fb = floor_bytes(c, B, ctx, cast_weights)
        ms = 1e3 * float(np.median(times[1:]))
        floor_ms = 1e3 * fb["total"] / bw
        rows.append(dict(kind="decode", model=name, batch=B, context=ctx, ms_per_token=ms, floor_ms=floor_ms,
                         vs_floor=ms / floor_ms, floor_bytes=fb, compile_s=compile_s, cache_slots=slots,
                         cache_bytes=need, temp_bytes=temp, **mem_stats(), times_ms=[1e3 * t for t in times]))
        log(f"  {name} B={B} {label(ctx)}: {ms:.3f} ms/token (floor {floor_ms:.3f} ms, x{ms / floor_ms:.1f}), "
            f"compile {compile_s:.1f} s")
        save()
    del cache, sess


def run_prefill(name, model, c, B, contexts, chunk, budget, rows, save, cast_weights=True):
    slots = -(-(max(contexts) + 64) // 256) * 256
    rng = np.random.default_rng(B)
    for ctx in sorted(contexts):
        if budget.left() < 15:
            log("  budget exhausted")
            break
        try:
            ids = rng.integers(0, c.vocab_size, (B, ctx)).astype(np.int32)
            reps = 1 if B * ctx >= (1 << 19) else 3
            ts, compile_s = [], 0.0
            for _ in range(reps):
                sess = Session(model, ids, max_new_tokens=1, prefill_chunk=chunk, slots=slots, cast_weights=cast_weights)
                sess.prefill()
                compile_s += sess.timings["compile_s"]
                ts.append(sess.timings["prefill_s"])
                del sess
            t = float(np.median(ts))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(kind="prefill", model=name, batch=B, context=ctx, error=f"{type(e).__name__}: {str(e)[:300]}"))
            log(f"  prefill {name} B={B} {label(ctx)} failed: {rows[-1]['error']}")
            save()
            return
        rows.append(dict(kind="prefill", model=name, batch=B, context=ctx, seconds=t, tokens_per_s=B * ctx / t,
                         compile_s=compile_s, chunk=chunk, cache_slots=slots, **mem_stats()))
        log(f"  prefill {name} B={B} {label(ctx)}: {t:.3f} s, {B * ctx / t:,.0f} tok/s, compile {compile_s:.1f} s")
        save()


def run_breakdown(name, model, c, B, rows, save, iters=50, cast_weights=True):
    """Where a decode step goes: the MoE of every layer alone, and the final norm + LM head + argmax alone,
    each at decode shapes ([B, 1, hidden]) inside a ``fori_loop`` like the decode loop (ms per step), on
    the weights as the engine holds them (``cast_weights``)."""
    graphdef, state = nnx.split(model.blocks)
    if cast_weights:
        state = cast_to_compute_dtype(state, c)
    x0 = jax.random.normal(jax.random.key(3), (B, 1, c.hidden_size), jnp.float32).astype(as_dtype(c.dtype))

    def moe_all(state, x, **call):
        def one_step(i, x):
            def body(h, st):
                block = nnx.merge(graphdef, st)
                for layer in block.layers:
                    m = layer.block_sparse_moe
                    if not call:  # the model's own call; else moe_forward with these settings
                        y = m(h)[0]
                    else:
                        kw = dict(dict(impl="gmm", decode_products="batched", fuse=None), **call)
                        y = moe_forward(h, m.gate.value, m.w1.value, m.w3.value, m.w2.value,
                                        top_k=c.num_experts_per_tok, backend=c.moe_backend, **kw)[0]
                    h = h + 0.01 * y
                return h, None
            return jax.lax.scan(body, x, state)[0]
        return jax.lax.fori_loop(0, iters, one_step, x)

    head_g, head_s = nnx.split(model)
    if cast_weights:
        head_s = cast_to_compute_dtype(head_s, c)

    def head(st, x):
        m = nnx.merge(head_g, st)

        def one_step(i, carry):
            x, tok = carry
            t = jnp.argmax(m.logits(m.norm(x))[:, 0], axis=-1).astype(jnp.int32)
            return x + 0.001 * t[:, None, None].astype(x.dtype), tok + t
        return jax.lax.fori_loop(0, iters, one_step, (x, jnp.zeros((B,), jnp.int32)))

    out = {}
    # "dense": every expert on every token; at a few tokens it reads the same weights as the routed experts'.
    # "_concat": gate and up as one product over w1 and w3 concatenated in every step (a copy of both
    # weights; what the model did before the fusion rule of m1_jax.model.moe.experts.fuse_gate_up).
    parts = [("moe_all_layers", moe_all, (state, x0)), ("norm_lm_head_argmax", head, (head_s, x0)),
             ("moe_all_layers_concat", functools.partial(moe_all, fuse=True), (state, x0)),
             ("moe_all_layers_dense", functools.partial(moe_all, impl="dense"), (state, x0)),
             ("moe_all_layers_dense_concat", functools.partial(moe_all, impl="dense", fuse=True), (state, x0))]
    if is_decode_shape(B, c.num_experts_per_tok, c.num_local_experts):  # both decode-shape expert products
        parts += [(f"moe_all_layers_{p}", functools.partial(moe_all, decode_products=p), (state, x0))
                  for p in DECODE_PRODUCTS]
    for part, fn, args in parts:
        try:
            f = jax.jit(fn).lower(*args).compile()
            jax.block_until_ready(f(*args))
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                jax.block_until_ready(f(*args))
                ts.append((time.perf_counter() - t) / iters)
            out[part] = 1e3 * float(np.median(ts))
        except Exception as e:  # noqa: BLE001
            out[part] = f"{type(e).__name__}: {str(e)[:200]}"
    rows.append(dict(kind="breakdown", model=name, batch=B, context=0, **{f"{k}_ms": v for k, v in out.items()}))
    log(f"  breakdown {name} B={B}: {out}")
    save()


# ------------------------------------------------------------------------------------- report
def table(rows) -> str:
    lines = ["| model | batch | context | decode ms/token | floor ms | x floor | prefill tok/s | prefill s | "
             "compile s | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["batch"], r["context"]) for r in rows if r["kind"] in ("decode", "prefill")},
                  key=lambda k: (k[0], k[1], k[2]))
    for m, b, ctx in keys:
        d = next((r for r in rows if r["kind"] == "decode" and (r["model"], r["batch"], r["context"]) == (m, b, ctx)), None)
        p = next((r for r in rows if r["kind"] == "prefill" and (r["model"], r["batch"], r["context"]) == (m, b, ctx)), None)

        def f(r, k, fmt):
            if r is None:
                return "-"
            if "error" in r:  # "not run: KV cache 128 GiB" (does not fit) is not a failure
                if r["error"].startswith("not run"):
                    return r["error"] if k == "ms_per_token" else "-"
                return "fails"
            return fmt.format(r[k]) if r.get(k) is not None else "-"
        peak = max([r.get("peak_bytes_in_use", 0) for r in (d, p) if r and "error" not in r] or [0])
        comp = sum(r.get("compile_s", 0.0) for r in (d, p) if r and "error" not in r)
        lines.append(f"| {m} | {b} | {label(ctx)} | {f(d, 'ms_per_token', '{:.3f}')} | {f(d, 'floor_ms', '{:.3f}')} | "
                     f"{f(d, 'vs_floor', '{:.1f}')} | {f(p, 'tokens_per_s', '{:,.0f}')} | {f(p, 'seconds', '{:.2f}')} | "
                     f"{comp:.0f} | {peak / 2**30:.1f} |")
    for r in rows:
        if r["kind"] == "breakdown":
            parts = ", ".join(f"{k[:-3]} {v:.3f} ms" if isinstance(v, float) else f"{k[:-3]} {v}"
                              for k, v in r.items() if k.endswith("_ms"))
            lines.append(f"\nstep breakdown {r['model']} B={r['batch']}: {parts}")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (m, b), color, marker in ((("hybrid", 1), "C0", "o"), (("twin", 1), "C1", "o"), (("hybrid", 64), "C2", "s"),
                                  (("twin", 64), "C3", "s")):
        d = sorted([r for r in rows if r["kind"] == "decode" and r["model"] == m and r["batch"] == b and "error" not in r],
                   key=lambda r: r["context"])
        if d:
            a1.plot([r["context"] for r in d], [r["ms_per_token"] for r in d], color=color, marker=marker,
                    label=f"{m} B={b}")
            a1.plot([r["context"] for r in d], [r["floor_ms"] for r in d], color=color, ls=":", alpha=0.7,
                    label=f"{m} B={b}: memory floor")
        style = color + "-"
        p = sorted([r for r in rows if r["kind"] == "prefill" and r["model"] == m and r["batch"] == b and "error" not in r],
                   key=lambda r: r["context"])
        if p:
            a2.plot([r["context"] for r in p], [r["tokens_per_s"] for r in p], style, marker=marker, label=f"{m} B={b}")
    for a, t, y in ((a1, "decode (ms per step, dotted: memory floor)", "ms / token"), (a2, "prefill", "tokens / s")):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("context (tokens)")
        a.set_ylabel(y)
        a.set_title(t)
        a.grid(True, which="both", alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_variant(args, steps, repeats, budget_s):
    """Hybrid decode in a subprocess with extra XLA_FLAGS. It runs before this process touches the GPU:
    the parent would otherwise hold XLA_PYTHON_CLIENT_MEM_FRACTION of the memory and leave the variant none."""
    import subprocess

    vout = os.path.join(args.out, "variant")
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + args.variant_flags).strip())
    cmd = [sys.executable, os.path.abspath(__file__), "--out", vout, "--models", "hybrid", "--no-check",
           "--no-prefill", "--batches", args.batches, "--contexts", args.variant_contexts,
           "--budget-s", str(max(10.0, budget_s - 15)), "--steps", str(steps), "--repeats", str(repeats)]
    if args.quick:
        cmd += ["--quick"]
    if args.compile_cache:
        cmd += ["--compile-cache", args.compile_cache]
    if args.breakdown:
        cmd += ["--breakdown"]
    if args.moe_impl:
        cmd += ["--moe-impl", args.moe_impl]
    if args.param_dtype:
        cmd += ["--param-dtype", args.param_dtype]
    if args.moe_decode:
        cmd += ["--moe-decode", args.moe_decode]
    if args.no_cast_weights:
        cmd += ["--no-cast-weights"]
    log(f"variant: XLA_FLAGS={env['XLA_FLAGS']}")
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(20.0, budget_s))
        log(r.stdout[-2000:] + r.stderr[-1500:])
        with open(os.path.join(vout, "generate.json")) as f:
            return [dict(row, model=f"hybrid [{args.variant_flags}]") for row in json.load(f)["rows"]]
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        log(f"variant produced no results: {e}")
        return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="generate_out")
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: tiny model, short contexts")
    ap.add_argument("--models", default="hybrid,twin")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--contexts", default="1K,8K,32K,128K,512K,1M")
    ap.add_argument("--steps", type=int, default=33, help="tokens per decode run (the loop runs steps - 1 forwards)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefill-tokens", type=int, default=1 << 20, help="largest batch x context prefilled for real")
    ap.add_argument("--twin-prefill-max", type=int, default=1 << 17)
    ap.add_argument("--twin-cache-gib", type=float, default=100.0, help="largest KV cache tried for the twin")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting new cases after this")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--checks", default=None, help="comma list: cache_attention, cache_attention_long, moe_decode, "
                    "flash_attention, generate (default: all)")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--prefill-batches", default=None, help="batches prefilled for real (default: all)")
    ap.add_argument("--prefill-contexts", default=None, help="contexts prefilled for real (default: --contexts)")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="default: 16K tokens per forward, at most 8192")
    ap.add_argument("--breakdown", action="store_true", help="time the MoE (the model's, every expert densely, and "
                    "at decode shapes both expert products) and the LM head alone at decode shapes")
    ap.add_argument("--moe-impl", default=None, help="ModelConfig.moe_impl of both models (default: the preset's)")
    ap.add_argument("--param-dtype", default=None, choices=("float32", "bfloat16"),
                    help="parameter dtype (default bfloat16; float32 is a training checkpoint or the RL policy)")
    ap.add_argument("--moe-decode", default=None, choices=DECODE_PRODUCTS,
                    help="ModelConfig.moe_decode: the expert products at decode shapes (default: the preset's)")
    ap.add_argument("--no-cast-weights", action="store_true",
                    help="keep wider parameters as they are (Session(cast_weights=False)): every step casts them")
    ap.add_argument("--variant-flags", default=None,
                    help="also run hybrid decode (batch 1 and the largest, --variant-contexts) in a subprocess "
                         "with these XLA_FLAGS, e.g. --xla_gpu_enable_command_buffer=...")
    ap.add_argument("--variant-contexts", default="1K,1M")
    ap.add_argument("--variant-budget-s", type=float, default=150.0, help="seconds for the variant (part of --budget-s)")
    ap.add_argument("--compile-cache", default=None, help="persistent XLA compilation cache folder")
    ap.add_argument("--replot", nargs="+", default=None, metavar="JSON",
                    help="no run: merge the rows of these generate.json files (later files win) into OUT's plot and table")
    args = ap.parse_args(argv)
    if args.replot:
        merged = {}
        for path in args.replot:
            with open(path) as f:
                for r in json.load(f)["rows"]:
                    merged[(r["kind"], r["model"], r["batch"], r["context"])] = r
        os.makedirs(args.out, exist_ok=True)
        plot(list(merged.values()), os.path.join(args.out, "generate.png"))
        print(table(list(merged.values())))
        return 0
    os.makedirs(args.out, exist_ok=True)
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    budget = Budget(args.budget_s)
    quick = args.quick
    contexts = [64, 256] if quick and args.contexts == ap.get_default("contexts") else parse_contexts(args.contexts)
    batches = [1, 4] if quick and args.batches == ap.get_default("batches") else [int(b) for b in args.batches.split(",")]
    steps, repeats = (5, 2) if quick else (args.steps, args.repeats)
    variant_rows = run_variant(args, steps, repeats, min(args.variant_budget_s, budget.left())) if args.variant_flags else []
    dev = jax.devices()[0]
    meta = dict(date=datetime.date.today().isoformat(), device=getattr(dev, "device_kind", str(dev)),
                platform=jax.default_backend(), jax=jax.__version__, flax=nnx.__name__ and __import__("flax").__version__,
                python=platform.python_version(), command=" ".join(["python", "benchmarks/generate.py", *(argv or sys.argv[1:])]))
    log(f"{meta}")
    checks = []
    if not args.no_check:
        try:
            checks = check_paths(quick, set(args.checks.split(",")) if args.checks else None, log)
        except Exception as e:  # noqa: BLE001
            checks = [dict(check="crashed", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-3000:], ok=False)]
            log(f"checks crashed: {e}")
        with open(os.path.join(args.out, "checks.json"), "w") as f:
            json.dump(checks, f, indent=1)
    bw = read_bandwidth(quick)
    meta["read_bandwidth_GBps"] = bw / 1e9
    log(f"read bandwidth {bw / 1e9:.0f} GB/s")
    rows: list[dict] = []

    def save():
        with open(os.path.join(args.out, "generate.json"), "w") as f:
            json.dump(dict(meta=meta, checks=checks, rows=rows), f, indent=1, default=str)

    cfgs = configs(quick, args.moe_impl, args.param_dtype, args.moe_decode)
    cast = not args.no_cast_weights
    meta.update(moe_impl=cfgs["hybrid"].moe_impl, param_dtype=cfgs["hybrid"].param_dtype, cast_weights=cast,
                moe_decode=cfgs["hybrid"].moe_decode)
    names = [m for m in ("hybrid", "twin") if m in args.models.split(",")]
    # per model: decode at every batch (one compile per batch), then the real prefills
    for name in names:
        c = cfgs[name]
        model = MiniMaxForCausalLM(c, rngs=nnx.Rngs(0))  # one model at a time: batch 64 x 1M leaves little room
        for B in batches:
            if budget.left() < 20:
                break
            ctxs = [x for x in contexts if name == "hybrid" or cache_bytes(c, x, B) <= args.twin_cache_gib * 2**30]
            for x in sorted(set(contexts) - set(ctxs)):
                rows.append(dict(kind="decode", model=name, batch=B, context=x,
                                 error=f"not run: KV cache {cache_bytes(c, x, B) / 2**30:.0f} GiB"))
            if ctxs:
                run_decode(name, model, c, B, ctxs, steps, repeats, bw, budget, rows, save, cast)
            if args.breakdown and name == "hybrid" and budget.left() > 30:
                run_breakdown(name, model, c, B, rows, save, cast_weights=cast)
        pb = None if args.prefill_batches is None else {int(b) for b in args.prefill_batches.split(",")}
        for B in batches:
            limit = args.prefill_tokens if name == "hybrid" else min(args.prefill_tokens, args.twin_prefill_max)
            pcs = parse_contexts(args.prefill_contexts) if args.prefill_contexts else contexts
            pctx = [] if args.no_prefill or (pb is not None and B not in pb) else [x for x in pcs if B * x <= limit]
            if pctx and budget.left() > 20:
                chunk = args.prefill_chunk or (max(16, min(8192, (1 << 14) // B)) if not quick else 32)
                run_prefill(name, model, c, B, pctx, chunk, budget, rows, save, cast)
        del model
    rows += variant_rows
    save()
    try:
        plot(rows, os.path.join(args.out, "generate.png"))
    except Exception as e:  # noqa: BLE001
        log(f"plot failed: {e}")
    print("\nchecks:", json.dumps([{k: v for k, v in r.items() if k != "trace"} for r in checks]))
    print(f"\n{meta['device']}, jax {meta['jax']}, read bandwidth {bw / 1e9:.0f} GB/s\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
