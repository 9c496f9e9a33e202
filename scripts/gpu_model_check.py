"""Compiled lightning kernels inside the model, against the model with the reference backend.

    python scripts/gpu_model_check.py                  # on a GPU (or TPU): small-shaped model, bf16
    python scripts/gpu_model_check.py --layers 8 --seq 2085 --batch 1
    python scripts/gpu_model_check.py --packed          # packed documents (segment_ids) on the kernel
    python scripts/gpu_model_check.py --f32-op-only     # only the float32 op case below

First, the float32 op case: ``lightning_attention`` with float32 q, k, v of shape (1, 4, 520, 128),
forward and backward, must compile and run within ``--f32_limit`` seconds (it once did not return
within 100 s on an H200) and match the float32 XLA reference to 1e-5 relative.

Builds an M1-shaped model (the ``small`` preset with fewer layers and a small vocabulary, bf16
activations), then compares loss, logits and every gradient between ``lightning_backend="auto"``
(the Pallas kernel that ``choose_kernel`` picks on this device) and ``"reference"`` (the XLA chunked
form), both in bf16, against the same model in float32, and times one forward+backward of each. Exits
non-zero when the kernel's error exceeds ``--tol_factor`` times the bf16 reference's. Not part of the CPU test suite: on the CPU ``auto`` is the reference itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from m1_jax import ModelConfig  # noqa: E402
from m1_jax.config import m1_layer_types  # noqa: E402
from m1_jax.model.decoder import MiniMaxForCausalLM  # noqa: E402
from pallas_kernels.lightning import op as lop  # noqa: E402


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def f32_op_case(limit_s, shape=(1, 4, 520, 128)):
    """float32 ``lightning_attention`` on this device's default kernel against the float32 reference:
    outputs and gradients (random initial state and final-state cotangent), with a time limit."""
    B, H, T, D = shape
    ks = jax.random.split(jax.random.PRNGKey(3), 6)
    q, k, v, do = (jax.random.normal(kk, shape, jnp.float32) * s for kk, s in zip(ks[:4], (0.3, 0.3, 1.0, 1.0)))
    h0, dht = (jax.random.normal(kk, (B, H, D, D), jnp.float32) for kk in ks[4:])
    decay = jnp.asarray(np.geomspace(0.9, 1e-4, H), jnp.float32)
    backend = lop.resolve_backend("auto")

    def grads(backend):
        def loss(q, k, v, h0):
            o, ht = lop.lightning_attention(q, k, v, decay, initial_state=h0, backend=backend)
            return jnp.sum(o * do) + jnp.sum(ht * dht)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    kernel = (lop.choose_kernel(backend, shape, D, jnp.float32).impl if backend != "reference" else "reference")
    t0 = time.perf_counter()
    val, g = jax.block_until_ready(grads(backend)(q, k, v, h0))
    took = time.perf_counter() - t0
    val_r, g_r = grads("reference")(q, k, v, h0)
    errs = [abs(float(val) - float(val_r)) / abs(float(val_r))] + [rel(a, b) for a, b in zip(g, g_r)]
    ok = took < limit_s and max(errs) < 1e-5
    print(f"float32 op case {shape} on {kernel}: compile + first run {took:.1f} s (limit {limit_s:.0f} s); "
          f"loss/dq/dk/dv/dh0 vs float32 reference " + " ".join(f"{e:.1e}" for e in errs) +
          f" -> {'PASS' if ok else 'FAIL'}", flush=True)
    return ok


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=4133, help="tokens per row (not a chunk multiple on purpose)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--packed", action="store_true",
                   help="pack documents of random lengths into each row (segment_ids); on Hopper they run on the "
                        "Mosaic kernel's packed form")
    p.add_argument("--f32-op-only", action="store_true", help="run only the float32 op case")
    p.add_argument("--f32_limit", type=float, default=60.0, help="seconds the float32 op case may take")
    p.add_argument("--tol_factor", type=float, default=1.5,
                   help="auto's error against float32 may be at most this times the bf16 reference's")
    args = p.parse_args()

    f32_ok = f32_op_case(args.f32_limit)
    if args.f32_op_only:
        sys.exit(0 if f32_ok else 1)

    base = ModelConfig.preset("small", num_hidden_layers=args.layers, layer_types=m1_layer_types(args.layers),
                              vocab_size=args.vocab, dtype="bfloat16")
    # bf16 with the kernel, bf16 with the XLA reference, and float32 with the reference as the yardstick:
    # in bf16 the MoE's top-2 choice flips for a few tokens on any perturbation, so the kernel is held to
    # "as close to float32 as the bf16 reference is", not to equality with the bf16 reference.
    cfg = {"auto bf16": base, "reference bf16": base.replace(lightning_backend="reference"),
           "reference f32": base.replace(lightning_backend="reference", dtype="float32")}
    heads, hd = base.num_attention_heads, base.head_dim
    backend = lop.resolve_backend("auto")
    kernel = (lop.choose_kernel(backend, (args.batch, heads, args.seq, hd), hd, jnp.bfloat16).impl
              if backend != "reference" else "reference")
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; lightning kernel for auto: {kernel}")

    graphdef, params = nnx.split(MiniMaxForCausalLM(base, rngs=nnx.Rngs(0)), nnx.Param)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.seq + 1), 0, args.vocab)
    segment_ids = None
    if args.packed:
        rng = np.random.default_rng(2)
        starts = np.cumsum(rng.integers(1, 1500, size=(args.batch, args.seq)), axis=1)
        segment_ids = jnp.asarray((np.arange(args.seq)[None, :, None] >= starts[:, None, :]).sum(-1), jnp.int32)
        print(f"packed rows: {int(segment_ids[:, -1].max()) + 1} documents in the longest row")

    def make_loss(c):
        gd = nnx.split(MiniMaxForCausalLM(c, rngs=nnx.Rngs(0)), nnx.Param)[0]

        def loss(params):
            m = nnx.merge(gd, params)
            logits = m(tokens[:, :-1], segment_ids=segment_ids).astype(jnp.float32)
            lp = jax.nn.log_softmax(logits, axis=-1)
            nll = -jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1).mean()
            return nll, logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    results = {}
    for name, c in cfg.items():
        f = make_loss(c)
        (loss, logits), grads = f(params)
        jax.block_until_ready(grads)
        t0 = time.perf_counter()
        for _ in range(3):
            out = f(params)
        jax.block_until_ready(out)
        ms = (time.perf_counter() - t0) / 3 * 1e3
        results[name] = (loss, logits, grads)
        print(f"{name:15s} loss {float(loss):.5f}  forward+backward {ms:8.2f} ms")

    lf, logits_f, gf = results["reference f32"]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(gf)]
    errs = {}
    for name in ("auto bf16", "reference bf16"):
        l, logits, g = results[name]
        per = sorted(((rel(a, b), p) for a, b, p in zip(jax.tree.leaves(g), jax.tree.leaves(gf), paths)),
                     reverse=True)
        errs[name] = dict(loss=abs(float(l) - float(lf)) / abs(float(lf)), logits=rel(logits, logits_f),
                          grads_median=float(np.median([e for e, _ in per])), grads_worst=per[0][0])
        print(f"{name} vs float32: " + ", ".join(f"{k} {v:.2e}" for k, v in errs[name].items())
              + f"; worst tensors: " + "; ".join(f"{p} {e:.1e}" for e, p in per[:3]))
    a, r = errs["auto bf16"], errs["reference bf16"]
    # the floor: relative differences below 1e-4 are rounding noise whatever their ratio (the bf16 losses
    # agree with float32 to 5 digits)
    bad = {k: (a[k], r[k]) for k in a if not a[k] <= args.tol_factor * r[k] + 1e-4}
    print("MODEL CHECK:", "PASS" if not bad else f"FAIL (auto vs reference error) {bad}")
    sys.exit(1 if (bad or not f32_ok) else 0)


if __name__ == "__main__":
    main()
