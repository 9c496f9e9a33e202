"""A long training sequence split over ``context=N`` devices vs the same sequence on fewer devices.

Loss and every parameter gradient of the real model (``MiniMaxForCausalLM``: LASP-2 lightning layers and
context-parallel softmax attention, which the model uses when the mesh has a ``context`` axis > 1;
chunked cross-entropy + z-loss + MoE aux loss, the objective of ``m1_jax.train.step``) are computed on
``--mesh`` and on ``--ref-mesh`` (default ``context=1``: one device), from the same parameters and tokens,
and compared: the loss's relative difference and, per gradient leaf, ``max|g - g_ref| / max|g_ref|``
(the worst leaf is reported). Pass/fail with tolerances by dtype (``--loss-tol`` / ``--grad-tol`` override).

    # 8 GPUs: a 1M-token sequence over context=8 vs context=2 (one GPU cannot hold 1M tokens of medium)
    python scripts/cp_long_check.py --preset medium --mesh context=8 --ref-mesh context=2 --remat full
    # CPU, fake devices
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python scripts/cp_long_check.py \
        --preset tiny --seq 256 --mesh context=4 --ref-mesh context=1 --documents 3

Exit status 0 = pass, 1 = fail, 2 = cannot run (fewer than 2 devices, bad arguments). The last line is a
JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (loss, gradient) relative tolerances by the model's compute dtype
TOLERANCES = {"float32": (1e-5, 1e-4), "bfloat16": (1e-2, 1e-1), "float16": (1e-2, 1e-1)}


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def mesh_config(spec: str, n_dev: int):
    """(MeshConfig, devices it uses): axes not named are 1 (``fsdp`` too, unlike ``MeshConfig``'s default
    -1), so ``context=4`` is 4 devices whatever the device count; a ``-1`` axis fills all devices."""
    import dataclasses

    import sharding

    cfg = sharding.MeshConfig.from_string(spec)
    if "fsdp" not in {p.split("=")[0].strip() for p in spec.split(",")}:
        cfg = dataclasses.replace(cfg, fsdp=1)
    sizes = cfg.sizes()
    n = n_dev if -1 in sizes.values() else int(np.prod(list(sizes.values())))
    cfg.resolve(n)  # raises ValueError naming the axis
    return cfg, n


def fail(msg: str) -> None:
    print(f"cp_long_check: {msg}", file=sys.stderr, flush=True)
    print(json.dumps({"status": "cannot run", "reason": msg}), flush=True)
    sys.exit(2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--set", nargs="*", default=[], help="ModelConfig overrides key=value (Python literals)")
    ap.add_argument("--seq", type=int, default=1 << 20, help="tokens in the sequence (default 1M = 1048576)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--mesh", default=None, help="the context-parallel mesh (default context=<all devices>)")
    ap.add_argument("--ref-mesh", default="context=1", help="the reference mesh (fewer context shards)")
    ap.add_argument("--dtype", default=None, help="compute dtype (ModelConfig.dtype; default the preset's)")
    ap.add_argument("--param-dtype", default=None, help="ModelConfig.param_dtype (default the preset's)")
    ap.add_argument("--remat", default=None, help="ModelConfig.remat (full for 1M tokens on GPUs)")
    ap.add_argument("--documents", type=int, default=1, help="documents packed in the sequence (segment ids)")
    ap.add_argument("--loss-tol", type=float, default=None)
    ap.add_argument("--grad-tol", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loss-chunk-size", type=int, default=4096)
    args = ap.parse_args(argv)
    from m1_jax.config import ConfigError, parse_overrides

    try:
        overrides = parse_overrides(args.set, flag="--set")
    except ConfigError as e:
        fail(str(e))
    for name in ("seq", "batch", "documents"):
        if getattr(args, name) < 1:
            fail(f"--{name} = {getattr(args, name)}: expected a positive integer")
    if args.documents > args.seq:
        fail(f"--documents = {args.documents}: expected at most --seq = {args.seq}")

    import jax
    from flax import nnx

    import sharding
    from m1_jax import ModelConfig
    from m1_jax.model import MiniMaxForCausalLM, load_balancing_loss
    from m1_jax.train.loss import chunked_cross_entropy

    n_dev = jax.device_count()
    if n_dev < 2:
        fail(f"needs >= 2 devices (context parallelism splits the sequence over devices); found {n_dev} "
             f"{jax.devices()[0].device_kind}. On the CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh_str = args.mesh or f"context={n_dev}"
    try:
        (cfg_a, n_a), (cfg_b, n_b) = mesh_config(mesh_str, n_dev), mesh_config(args.ref_mesh, n_dev)
    except ValueError as e:
        fail(f"--mesh / --ref-mesh: {e}")
    for flag, n in (("--mesh", n_a), ("--ref-mesh", n_b)):
        if n > n_dev:
            fail(f"{flag} needs {n} devices; {n_dev} present")
    devices = jax.devices()
    mesh_a = sharding.make_mesh(cfg_a, devices=devices[:n_a])
    mesh_b = sharding.make_mesh(cfg_b, devices=devices[:n_b])
    cp_a, cp_b = sharding.mesh_sizes(mesh_a)["context"], sharding.mesh_sizes(mesh_b)["context"]
    if cp_a < 2 or cp_a <= cp_b:
        fail(f"--mesh {mesh_str!r} has context = {cp_a}: expected at least 2 and more than the reference's "
             f"{cp_b} (--ref-mesh {args.ref_mesh!r})")
    kw = dict(overrides)
    for field, val in (("dtype", args.dtype), ("param_dtype", args.param_dtype), ("remat", args.remat)):
        if val is not None:
            kw[field] = val
    cfg = ModelConfig.preset(args.preset, **kw)
    from m1_jax.train.setup import check_batch_layout

    for mesh, flag in ((mesh_a, "--mesh"), (mesh_b, "--ref-mesh")):
        try:
            check_batch_layout(mesh, args.batch, args.seq, batch_field="--batch", seq_field="--seq")
        except Exception as e:
            fail(f"{flag}: {e}")
    loss_tol, grad_tol = TOLERANCES.get(cfg.dtype, TOLERANCES["bfloat16"])
    loss_tol = args.loss_tol if args.loss_tol is not None else loss_tol
    grad_tol = args.grad_tol if args.grad_tol is not None else grad_tol
    B, T = args.batch, args.seq
    print(f"cp_long_check: preset {args.preset} ({cfg.num_params()['total'] / 1e6:.1f}M params, dtype {cfg.dtype}, "
          f"params {cfg.param_dtype}, remat {cfg.remat}), {B} x {T} tokens, {args.documents} document(s); "
          f"{mesh_str} ({n_a} devices) vs {args.ref_mesh} ({n_b}); {n_dev} x {devices[0].device_kind}", flush=True)

    rng = np.random.default_rng(args.seed)
    toks = rng.integers(0, cfg.vocab_size, (B, T + 1), dtype=np.int32)
    cuts = np.sort(rng.choice(np.arange(1, T), size=args.documents - 1, replace=False)) if args.documents > 1 else []
    seg = np.zeros((B, T), np.int32)
    for c in cuts:  # document boundaries at random places: inside and across context shards
        seg[:, c:] += 1
    mask = np.ones((B, T), np.float32)
    mask[:, -1] = 0.0  # a masked position: the loss is a weighted mean
    host = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg, "loss_mask": mask}
    abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(args.seed)))
    graphdef, abs_params = nnx.split(abstract, nnx.Param)

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        h, stats = model.hidden_states(batch["inputs"], segment_ids=batch["segment_ids"])
        ce, _ = chunked_cross_entropy(h, model.lm_head.get_value(), batch["targets"], batch["loss_mask"], z_loss_coef=1e-4,
                                      chunk_size=min(args.loss_chunk_size, T), head_dtype="float32")
        return ce + cfg.router_aux_loss_coef * load_balancing_loss(stats)

    def run(mesh, label):
        p_sh = sharding.state_shardings(abs_params, mesh)
        b_sh = sharding.batch_sharding(mesh, 2, shape=(B, T))
        with jax.set_mesh(mesh):
            params = jax.jit(lambda: nnx.state(MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(args.seed)), nnx.Param),
                             out_shardings=p_sh)()
            batch = {k: jax.device_put(v, b_sh) for k, v in host.items()}
            f = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(p_sh, b_sh), out_shardings=(None, p_sh))
            t0 = time.perf_counter()
            compiled = f.lower(params, batch).compile()
            t1 = time.perf_counter()
            hlo = compiled.as_text()
            collectives = sorted({c for c in COLLECTIVES if c in hlo})
            loss, grads = compiled(params, batch)
            jax.block_until_ready(grads)
            t2 = time.perf_counter()
        print(f"  {label}: compiled in {t1 - t0:.1f} s, loss + gradients in {t2 - t1:.1f} s ({B * T / (t2 - t1):,.0f} "
              f"tokens/s), loss {float(loss):.6f}", flush=True)
        del params, batch
        return float(loss), grads, collectives

    loss_a, grads_a, coll_a = run(mesh_a, mesh_str)
    loss_b, grads_b, _ = run(mesh_b, args.ref_mesh)
    loss_rel = abs(loss_a - loss_b) / max(abs(loss_b), 1e-30)
    worst, worst_name, n_leaves = 0.0, None, 0
    flat_a = jax.tree_util.tree_flatten_with_path(grads_a)[0]
    flat_b = jax.tree.leaves(grads_b)
    for (path, ga), gb in zip(flat_a, flat_b):  # one leaf at a time on the host (1M-token runs: big trees)
        a = np.asarray(jax.device_get(ga), np.float64)
        b = np.asarray(jax.device_get(gb), np.float64)
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            r = float("inf")
        else:
            r = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
        n_leaves += 1
        if r > worst or worst_name is None:
            worst, worst_name = r, jax.tree_util.keystr(path)
    ok = np.isfinite(loss_a) and loss_rel <= loss_tol and worst <= grad_tol
    print(f"  loss: {loss_a:.6f} vs {loss_b:.6f}, relative difference {loss_rel:.3e} (tolerance {loss_tol:g})")
    print(f"  gradients: {n_leaves} leaves, worst max|g - g_ref| / max|g_ref| = {worst:.3e} at {worst_name} "
          f"(tolerance {grad_tol:g}); collectives in the {mesh_str} program: {coll_a}")
    print(f"  {'PASS' if ok else 'FAIL'}", flush=True)
    print(json.dumps({"status": "pass" if ok else "fail", "preset": args.preset, "overrides": overrides,
                      "dtype": cfg.dtype, "batch": B, "seq": T, "documents": args.documents, "mesh": mesh_str,
                      "ref_mesh": args.ref_mesh, "loss": loss_a, "ref_loss": loss_b, "loss_rel": loss_rel,
                      "grad_rel_max": worst, "grad_worst_leaf": worst_name, "grad_leaves": n_leaves, "collectives": coll_a,
                      "loss_tol": loss_tol, "grad_tol": grad_tol, "jax": jax.__version__,
                      "device": f"{n_dev} x {devices[0].device_kind}"}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
