"""The MoE of one decode step, alone: each expert-product form, on weights passed flat and on weights sliced
per layer from a stack inside a ``lax.scan`` (how the model holds them).

    python benchmarks/moe_decode.py --out OUT            # the `small` preset's MoE, 16 layers, bf16 weights
    python benchmarks/moe_decode.py --quick --out /tmp/md  # CPU smoke test (tiny shapes, kernels interpreted)

Forms (``m1_jax.model.moe.layer.moe_forward``): ``batched``, ``grouped`` and ``fused`` / ``fused_gathered``
at decode shapes (tokens x k <= E / 2), the dropless ``gmm`` path, and ``dense`` (every expert). Two
placements of the weights:

* ``flat``: one array per layer, each passed to the program. No slicing.
* ``scanned``: one ``[L, E, H, I]`` stack and a ``lax.scan`` over layers, so each layer's weights are a
  dynamic slice (the model's layout). If XLA copies a slice for a kernel's operand instead of reading
  it in place, ``scanned`` is slower than ``flat`` by about a block of weights per layer.

Prints microseconds per layer and the memory floor (the routed experts' weight bytes at the measured
read bandwidth); writes ``moe_decode.json`` and ``moe_decode.png``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from m1_jax import ModelConfig  # noqa: E402
from m1_jax.model.moe.layer import DECODE_PRODUCTS, is_decode_shape, moe_forward  # noqa: E402

from generate import read_bandwidth  # noqa: E402  (the same bandwidth probe as the generation benchmark)

BF16 = jnp.bfloat16


def forms(tokens: int, k: int, E: int) -> list[tuple[str, dict]]:
    out = [("dense", dict(impl="dense")), ("gmm", dict(impl="gmm"))]
    if is_decode_shape(tokens, k, E):
        out = [(p, dict(impl="gmm", decode_products=p)) for p in DECODE_PRODUCTS] + out[:1]
    return out


def layer_weights(key, L, E, H, I):
    ks = jax.random.split(key, 4)
    gate = jax.random.normal(ks[0], (L, H, E), jnp.float32) * 0.02
    w1, w3 = (jax.random.normal(ks[i], (L, E, H, I), jnp.float32).astype(BF16) * 0.02 for i in (1, 2))
    w2 = jax.random.normal(ks[3], (L, E, I, H), jnp.float32).astype(BF16) * 0.02
    return gate, w1, w3, w2


def program(placement: str, kw: dict, k: int, L: int, iters: int):
    """``iters`` decode steps of ``L`` MoE layers (a residual chain, like the model's) in one program."""
    call = functools.partial(moe_forward, top_k=k, **kw)

    if placement == "scanned":
        def steps(x, gate, w1, w3, w2):
            def layer(h, ws):
                return h + 0.01 * call(h, *ws)[0], None
            return jax.lax.fori_loop(0, iters, lambda i, h: jax.lax.scan(layer, h, (gate, w1, w3, w2))[0], x)
    else:
        def steps(x, gate, w1, w3, w2):
            def one(i, h):
                for ell in range(L):
                    h = h + 0.01 * call(h, gate[ell], w1[ell], w3[ell], w2[ell])[0]
                return h
            return jax.lax.fori_loop(0, iters, one, x)
    return jax.jit(steps)


def flat_args(gate, w1, w3, w2):
    """Per-layer arrays (separate buffers), as tuples the flat program indexes statically."""
    return tuple(tuple(a[ell] for ell in range(a.shape[0])) for a in (gate, w1, w3, w2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="moe_decode_out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", default="1,4,8,64")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    c = ModelConfig.preset("tiny" if args.quick else "small")
    E, k, H, I = c.num_local_experts, c.num_experts_per_tok, c.hidden_size, c.intermediate_size
    L = 2 if args.quick else c.num_hidden_layers
    iters = 2 if args.quick else args.iters
    tokens = [1, 2] if args.quick else [int(t) for t in args.tokens.split(",")]
    bw = read_bandwidth(args.quick)
    dev = jax.devices()[0]
    meta = dict(device=getattr(dev, "device_kind", str(dev)), jax=jax.__version__, E=E, k=k, H=H, I=I, layers=L,
                read_bandwidth_GBps=bw / 1e9, command=" ".join(["python", "benchmarks/moe_decode.py", *(argv or sys.argv[1:])]))
    print(meta, flush=True)
    gate, w1, w3, w2 = layer_weights(jax.random.key(0), L, E, H, I)
    rows = []
    for n in tokens:
        x = jax.random.normal(jax.random.key(n), (n, 1, H), jnp.float32).astype(BF16)
        distinct = E * (1 - (1 - 1 / E) ** (n * k))
        floor_us = 1e6 * distinct * 3 * H * I * 2 / bw
        for name, kw in forms(n, k, E):
            for placement in ("flat", "scanned"):
                row = dict(tokens=n, form=name, placement=placement, floor_us_per_layer=floor_us)
                try:
                    f = program(placement, kw, k, L, iters)
                    a = (x, gate, w1, w3, w2) if placement == "scanned" else (x, *flat_args(gate, w1, w3, w2))
                    exe = f.lower(*a).compile()
                    jax.block_until_ready(exe(*a))
                    ts = []
                    for _ in range(3):
                        t0 = time.perf_counter()
                        jax.block_until_ready(exe(*a))
                        ts.append(time.perf_counter() - t0)
                    row["us_per_layer"] = 1e6 * float(np.median(ts)) / (iters * L)
                except Exception as e:  # noqa: BLE001  (a form that cannot run here is reported, not fatal)
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                print(row, flush=True)
    with open(os.path.join(args.out, "moe_decode.json"), "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print(f"\n{meta['device']}, jax {meta['jax']}, E={E} k={k} H={H} I={I}, {L} layers, read {bw / 1e9:.0f} GB/s\n")
    print("| tokens | form | flat us/layer | scanned us/layer | floor us/layer |\n|---|---|---|---|---|")
    for n in tokens:
        for name, _ in forms(n, k, E):
            got = {r["placement"]: r for r in rows if r["tokens"] == n and r["form"] == name}
            cell = lambda r: f"{r['us_per_layer']:.1f}" if "us_per_layer" in r else r.get("error", "")[:40]  # noqa: E731
            print(f"| {n} | {name} | {cell(got['flat'])} | {cell(got['scanned'])} | {got['flat']['floor_us_per_layer']:.2f} |")
    _plot(rows, tokens, os.path.join(args.out, "moe_decode.png"))
    return 0


def _plot(rows, tokens, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tokens), figsize=(4 * len(tokens), 3.5), squeeze=False)
    for ax, n in zip(axes[0], tokens):
        mine = [r for r in rows if r["tokens"] == n]
        names = list(dict.fromkeys(r["form"] for r in mine))
        for j, placement in enumerate(("flat", "scanned")):
            vals = [next((r.get("us_per_layer", 0.0) for r in mine if r["form"] == f and r["placement"] == placement), 0.0)
                    for f in names]
            ax.bar(np.arange(len(names)) + 0.4 * j, vals, width=0.4, label=placement)
        ax.axhline(mine[0]["floor_us_per_layer"], color="k", ls="--", lw=1, label="floor")
        ax.set_xticks(np.arange(len(names)) + 0.2, names, rotation=30, fontsize=8)
        ax.set_title(f"{n} token(s)")
        ax.set_ylabel("us per layer")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
