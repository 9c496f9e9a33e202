"""Per-device memory of a model on a mesh, from the parameter shapes and the rules table (no devices).

    python -m m1_jax.memory --preset m1-80k --mesh data=1,fsdp=8,expert=8,context=1,tensor=4 \
        --tokens-per-device 8192

``param_bytes`` / ``grad_bytes`` / ``opt_bytes`` are exact for the sharding the rules give (largest shard
per tensor, i.e. the most loaded device). Activations are an estimate for full rematerialisation
(``remat="full"``): the saved input of every layer plus the working set of one layer's recomputation.
"""

from __future__ import annotations

import argparse
import math
from typing import Sequence

from m1_jax.config import ModelConfig
from m1_jax.model import abstract_model
from sharding.mesh import AXES, MeshConfig
from sharding.rules import logical_to_mesh_spec, variable_logical_axes


def compiled_memory_plan_bytes(compiled) -> int | None:
    """Device bytes XLA plans for a compiled program: arguments + outputs - aliased (donated) + temporaries;
    None on backends without ``memory_analysis()``."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
    except Exception:  # backends without the analysis
        return None


def _abstract_mesh(sizes: dict[str, int]):
    from jax.sharding import AbstractMesh

    return AbstractMesh(tuple(sizes[a] for a in AXES), AXES)


def _shard_elems(shape, spec, sizes) -> int:
    n = 1
    for d, dim in enumerate(shape):
        entry = spec[d] if d < len(spec) else None
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        n *= math.ceil(dim / math.prod(sizes[a] for a in axes))
    return n


def param_shards(config, sizes: dict[str, int], *, blocks_only: bool = False) -> tuple[int, int]:
    """(elements per device, total elements) of the model's parameters on a mesh of ``sizes``."""
    import jax
    from flax import nnx

    mesh = _abstract_mesh(sizes)
    per_dev = total = 0
    _, state = abstract_model(config)
    if blocks_only:
        state = state["blocks"]
    for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        shape = v.get_value().shape
        names = variable_logical_axes(v)
        spec = logical_to_mesh_spec(names, shape, mesh) if names else ()
        per_dev += _shard_elems(shape, spec, sizes)
        total += math.prod(shape)
    return per_dev, total


def estimate(config, sizes: dict[str, int], tokens_per_device: int, *, param_bytes: int = 4,
             grad_bytes: int = 4, opt_bytes: int = 8) -> dict[str, float]:
    """GiB per device. Defaults: float32 master weights and gradients, AdamW (two float32 moments)."""
    per_dev, total = param_shards(config, sizes)
    gib = 2.0 ** 30
    c = config
    act_b = 2 if c.dtype != "float32" else 4
    tp = sizes["tensor"]
    ep = sizes["expert"]
    t = tokens_per_device
    saved = c.num_hidden_layers * t * c.hidden_size * act_b  # remat="full": each layer's input
    # one layer's recomputation: qkv + gate + attention output (heads over tensor), the MoE dispatch
    # buffers (k copies of each token, at capacity ~1.25) and the expert intermediate (width over tensor)
    attn = t * (4 * c.num_attention_heads * c.head_dim / tp) * act_b * 2
    moe = t * c.num_experts_per_tok * 1.25 * (2 * c.hidden_size + 3 * c.intermediate_size / tp) * act_b * 2
    head = t * c.vocab_size / tp * 4 * 2  # float32 logits and their gradient (unchunked loss)
    out = {
        "params_total_B": total / 1e9,
        "params_per_device_B": per_dev / 1e9,
        "param_GiB": per_dev * param_bytes / gib,
        "grad_GiB": per_dev * grad_bytes / gib,
        "opt_GiB": per_dev * opt_bytes / gib,
        "act_saved_GiB": saved / gib,
        "act_layer_GiB": (attn + moe) / gib,
        "logits_GiB": head / gib,
    }
    # the scanned block's weights all-gathered over fsdp/context (kept sharded over expert/tensor), in
    # the compute dtype, twice (the gather of the next block overlaps the current one)
    gathered, _ = param_shards(config, dict(sizes, fsdp=1, context=1, data=1), blocks_only=True)
    out["gathered_block_GiB"] = 2 * gathered / c.num_blocks * act_b / gib
    out["total_GiB"] = sum(v for k, v in out.items() if k.endswith("GiB"))
    out["expert_parallel_experts_per_shard"] = c.num_local_experts / ep
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m m1_jax.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="m1-80k")
    ap.add_argument("--mesh", required=True, help="MeshConfig string with explicit sizes (no -1)")
    ap.add_argument("--devices", type=int, default=None, help="needed when the mesh uses -1")
    ap.add_argument("--tokens-per-device", type=int, default=8192)
    ap.add_argument("--param-bytes", type=int, default=4)
    ap.add_argument("--grad-bytes", type=int, default=4)
    ap.add_argument("--opt-bytes", type=int, default=8)
    args = ap.parse_args(argv)
    mc = MeshConfig.from_string(args.mesh)
    n = args.devices or math.prod(s for s in mc.sizes().values() if s > 0)
    sizes = mc.resolve(n)
    cfg = ModelConfig.preset(args.preset)
    est = estimate(cfg, sizes, args.tokens_per_device, param_bytes=args.param_bytes, grad_bytes=args.grad_bytes,
                   opt_bytes=args.opt_bytes)
    print(f"{args.preset} on {n} devices, mesh {sizes}, {args.tokens_per_device} tokens/device")
    for k, v in est.items():
        print(f"  {k:36s} {v:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
