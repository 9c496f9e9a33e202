"""Training-step throughput of a preset on 1, 2, 4, ... GPUs with expert and context parallelism.

One process drives all local devices; each configuration runs on the first ``n`` devices with its own
mesh. Weak scaling: every device holds ``--batch-per-device x --seq`` tokens (a context-parallel
mesh multiplies the sequence length by the context size instead of the batch). The step is
forward + backward + AdamW (``optax``) on next-token cross-entropy + router aux loss, jitted with the
shardings from ``sharding.state_shardings`` / ``batch_sharding``.

    python benchmarks/scaling.py --preset small --configs "1:fsdp=1" "2:expert=2" "2:context=2" \
        "4:expert=4" "4:expert=2,context=2" --out results.jsonl

Prints one JSON line per configuration and a markdown table (tokens/s per device, scaling efficiency
= tokens/s per device over the 1-device figure). ``--check-ragged`` also compares the dropless
``ep_ragged`` MoE (ragged_all_to_all) loss against ``ep_capacity`` with unlimited capacity.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import numpy as np


def parse_config(s: str):
    n, _, rest = s.partition(":")
    mesh, _, impl = rest.partition(":")
    return int(n), mesh, impl or None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--configs", nargs="+", default=["1:fsdp=1", "2:expert=2", "2:context=2", "4:expert=4",
                                                     "4:expert=2,context=2", "4:fsdp=4"])
    ap.add_argument("--moe-impl", default="ep_capacity")
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--batch-per-device", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--remat", default="none")
    ap.add_argument("--time-budget", type=float, default=480.0, help="seconds; later configs are skipped")
    ap.add_argument("--check-ragged", nargs="*", default=[], help="meshes (n:mesh) for the ep_ragged check")
    ap.add_argument("--out", default=None)
    ap.add_argument("--override", nargs="*", default=[], help="ModelConfig overrides key=value (CPU dry runs)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from m1_jax import ModelConfig, MiniMaxForCausalLM
    from sharding import MeshConfig, batch_sharding, make_mesh, state_shardings

    t_start = time.time()
    overrides = {}
    for kv in args.override:
        k, v = kv.split("=", 1)
        overrides[k] = type(getattr(ModelConfig.preset(args.preset), k))(v) if not v.startswith("(") else eval(v)
    devices = jax.devices()
    info = {"jax": jax.__version__, "device": devices[0].device_kind, "num_devices": len(devices),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import flax
        info["flax"] = flax.__version__
    except Exception:  # pragma: no cover
        pass
    out_f = open(args.out, "a") if args.out else None

    def emit(rec):
        line = json.dumps(rec)
        print(line, flush=True)
        if out_f:
            out_f.write(line + "\n")
            out_f.flush()

    emit({"info": info})

    def build(n, mesh_str, impl, cf):
        cfg = ModelConfig.preset(args.preset, moe_impl=impl, moe_capacity_factor=cf, remat=state["remat"], **overrides)
        mesh = make_mesh(MeshConfig.from_string(mesh_str), devices=devices[:n])
        cp = mesh.shape["context"]
        B = args.batch_per_device * n // cp
        T = args.seq * cp
        abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)))
        graphdef, abs_params = nnx.split(abstract, nnx.Param)
        p_sh = state_shardings(abs_params, mesh)
        tx = optax.adamw(1e-4, weight_decay=0.1)

        def init_fn():
            return nnx.state(MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)

        init = jax.jit(init_fn, out_shardings=p_sh)
        with jax.set_mesh(mesh):
            params = init()
            o_abs = jax.eval_shape(tx.init, params)
            o_sh = state_shardings(o_abs, mesh)
            opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)

        def loss_fn(p, ids):
            model = nnx.merge(graphdef, p)
            h, stats = model.hidden_states(ids[:, :-1])
            logits = model.logits(h)
            logp = jax.nn.log_softmax(logits)
            nll = -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))
            from m1_jax.model.moe import load_balancing_loss
            aux = load_balancing_loss(stats)
            return nll + cfg.router_aux_loss_coef * aux, (nll, jnp.mean(stats.dropped_fraction))

        def step(p, o, ids):
            (loss, (nll, dropped)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, ids)
            upd, o = tx.update(g, o, p)
            return optax.apply_updates(p, upd), o, {"loss": loss, "nll": nll, "dropped": dropped}

        b_sh = batch_sharding(mesh, shape=(B, T + 1))
        # T + 1 tokens so inputs are T long; shard the batch only (T + 1 is not divisible by context)
        from jax.sharding import NamedSharding, PartitionSpec as P
        b_sh = NamedSharding(mesh, P(b_sh.spec[0] if len(b_sh.spec) else None))
        train = jax.jit(step, in_shardings=(p_sh, o_sh, b_sh), out_shardings=(p_sh, o_sh, None),
                        donate_argnums=(0, 1))
        rng = np.random.default_rng(0)
        ids = jax.device_put(rng.integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32), b_sh)
        return cfg, mesh, params, opt_state, train, ids, B, T, loss_fn, p_sh, b_sh

    results = []
    state = {"remat": args.remat}
    queue = list(args.configs)
    while queue:
        spec = queue.pop(0)
        if time.time() - t_start > args.time_budget:
            emit({"config": spec, "skipped": "time budget"})
            continue
        n, mesh_str, impl = parse_config(spec)
        impl = impl or args.moe_impl
        if n > len(devices):
            emit({"config": spec, "skipped": f"needs {n} devices"})
            continue
        try:
            cfg, mesh, params, opt_state, train, ids, B, T, *_ = build(n, mesh_str, impl, args.capacity_factor)
            t0 = time.time()
            with jax.set_mesh(mesh):
                params, opt_state, m = train(params, opt_state, ids)
                jax.block_until_ready(m)
                compile_s = time.time() - t0
                t1 = time.time()
                for _ in range(args.steps):
                    params, opt_state, m = train(params, opt_state, ids)
                jax.block_until_ready((params, m))
                dt = (time.time() - t1) / args.steps
            tokens = B * T
            mem = None
            try:
                stats = devices[0].memory_stats()
                mem = round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)
            except Exception:
                pass
            rec = {"config": spec, "remat": state["remat"], "n": n, "mesh": dict(mesh.shape), "moe_impl": impl, "batch": B, "seq": T,
                   "step_s": round(dt, 4), "compile_s": round(compile_s, 1), "tokens_per_s": round(tokens / dt, 1),
                   "tokens_per_s_per_device": round(tokens / dt / n, 1), "loss": float(m["loss"]),
                   "dropped_fraction": float(m["dropped"]), "peak_gib_dev0_so_far": mem}
            results.append(rec)
            emit(rec)
            del params, opt_state, train, ids
            import gc
            gc.collect()
            jax.clear_caches()
        except Exception as e:  # keep going: one failing config must not lose the others
            msg = f"{type(e).__name__}: {str(e)[:1500]}"
            emit({"config": spec, "remat": state["remat"], "error": msg})
            traceback.print_exc()
            if ("RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()) and state["remat"] != "full" \
                    and not results:
                state["remat"] = "full"  # the first config did not fit: all configs with full remat
                emit({"note": "switching to remat=full for all configurations"})
                queue.insert(0, spec)

    for spec in args.check_ragged:
        if time.time() - t_start > args.time_budget:
            emit({"check_ragged": spec, "skipped": "time budget"})
            continue
        n, mesh_str, _ = parse_config(spec)
        try:
            losses = {}
            for impl in ("ep_capacity", "ep_ragged"):
                cfg, mesh, params, opt_state, train, ids, B, T, loss_fn, p_sh, b_sh = build(n, mesh_str, impl, -1.0)
                with jax.set_mesh(mesh):
                    f = jax.jit(jax.value_and_grad(lambda p, i: loss_fn(p, i)[0]), in_shardings=(p_sh, b_sh))
                    t0 = time.time()
                    loss, g = f(params, ids)
                    gn = float(optax.global_norm(g))
                    losses[impl] = (float(loss), gn, round(time.time() - t0, 1))
            emit({"check_ragged": spec, "ep_capacity_dropless": losses["ep_capacity"], "ep_ragged": losses["ep_ragged"],
                  "loss_abs_diff": abs(losses["ep_capacity"][0] - losses["ep_ragged"][0]),
                  "grad_norm_rel_diff": abs(losses["ep_capacity"][1] - losses["ep_ragged"][1]) / losses["ep_capacity"][1]})
        except Exception as e:
            emit({"check_ragged": spec, "error": f"{type(e).__name__}: {str(e)[:1500]}"})
            traceback.print_exc()

    base = next((r["tokens_per_s_per_device"] for r in results if r["n"] == 1), None)
    print()
    print(f"{info['device']} x{info['num_devices']}, jax {info['jax']}, preset {args.preset}, "
          f"{args.batch_per_device} x {args.seq} tokens per device, {args.moe_impl} (capacity factor "
          f"{args.capacity_factor}), remat {state['remat']}, AdamW, {info['date']}")
    print()
    print("| GPUs | mesh | batch x seq | step (s) | tokens/s | tokens/s/GPU | scaling eff. | dropped | compile (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "single"
        eff = f"{r['tokens_per_s_per_device'] / base:.2f}" if base else "-"
        print(f"| {r['n']} | {mesh} | {r['batch']} x {r['seq']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s_per_device']:.0f} | {eff} | {r['dropped_fraction']:.3f} | {r['compile_s']:.0f} |")
    if out_f:
        out_f.close()


if __name__ == "__main__":
    main()
