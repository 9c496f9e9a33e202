"""Hashes of the lowered CUDA programs of the Mosaic GPU lightning kernels, for refactoring code that only the
compiled path runs (wgmma, register layouts, aliased buffers: the interpreter runs none of it) on a machine
without a GPU. Lowering for CUDA runs anywhere; source locations are left out, so moving code does not
change a hash, and equal hashes mean the same kernels.

    python scripts/lowering_hashes.py > before.txt     # then edit, then
    python scripts/lowering_hashes.py > after.txt && diff before.txt after.txt

Each line: a configuration (shape, tuning, packed rows), the hash of its forward+backward program and its
number of kernel launches.
"""

from __future__ import annotations

import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_traceback_in_locations_limit", 0)  # no source locations in the lowered text

import pallas_kernels.lightning.op as lightning_op  # noqa: E402
from pallas_kernels.lightning import lightning_attention_kernel  # noqa: E402

CASES = [  # (B, H, T, D, tuning, packed rows): every walk kind, both backward forms, both widths
    (1, 2, 520, 128, {"wide": "always", "segments": 2}, False),
    (1, 2, 520, 128, {"wide": "always", "segments": 2}, True),
    (1, 2, 520, 128, {"wide": False, "segments": 2}, False),
    (1, 2, 520, 128, {"wide": False, "segments": 2, "fused_dkdv": False}, True),
    (1, 2, 520, 128, {"wide": False, "segments": 1, "lean": True}, False),
    (1, 2, 520, 64, {"segments": 2}, False),
]


def lowered_text(B, H, T, D, tuning, packed):
    bf16 = jax.ShapeDtypeStruct((B, H, T, D), jnp.bfloat16)
    args = [bf16, bf16, bf16, jax.ShapeDtypeStruct((H,), jnp.float32), jax.ShapeDtypeStruct((B, H, D, D), jnp.float32)]
    if packed:
        args.append(jax.ShapeDtypeStruct((B, T), jnp.int32))

    def program(q, k, v, decay, h0, *ids):
        def loss(q, k, v, h0):
            o, ht = lightning_attention_kernel(q, k, v, decay, initial_state=h0, impl="mosaic_gpu", tuning=tuning,
                                               segment_ids=ids[0] if ids else None)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(ht)
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, h0)
    return jax.jit(program).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def main():
    lightning_op.is_hopper = lambda *a, **k: True  # the Hopper kernel choice, as an H100/H200 makes it
    for case in CASES:
        text = lowered_text(*case)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        print(f"{case}  {digest}  launches={text.count('stablehlo.custom_call')}", flush=True)


if __name__ == "__main__":
    main()
