#!/usr/bin/env python
"""CISPO against DAPO and GRPO: the same budget, the same task, the same start, several seeds.

    python benchmarks/rl_compare.py                         # configs/cispo_tiny.gin, cispo/dapo/grpo x seeds 0,1,2
    python benchmarks/rl_compare.py --steps 60 --seeds 0    # a quicker look
    python benchmarks/rl_compare.py --throughput runs/cispo_small   # rollout / update tokens/s of one run

Every run starts from one supervised warm-up (run once, in ``OUT/warmup``, then given as
``RLConfig.init_checkpoint``) and differs from the others only in ``RLConfig.loss`` and ``TrainConfig.seed``
(rollout sampling and prompt order; the held-out prompts are fixed by ``RLConfig.eval_seed``). Runs are
sequential, in this one process. Prints a table (start and final held-out reward per loss, mean and std
over seeds; the first step at which each loss's seed-mean curve reaches DAPO's final seed-mean reward) and
writes ``OUT/rl_compare.png`` (held-out reward against step) and ``OUT/rl_compare.json`` (every curve).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def throughput(run_dir: str) -> None:
    """Median rollout and update tokens/s of a run's steps (the first step, which compiles, left out)."""
    lines = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [l for l in lines if l.get("step", 0) > 1 and "perf/rollout_tokens_per_s" in l]
    if not steps:
        raise SystemExit(f"{run_dir}/metrics.jsonl: no RL steps past the first")
    print(f"{'metric':<40} {'median':>12} {'min':>12} {'max':>12}  ({len(steps)} steps)")
    for key, what in (("perf/rollout_tokens_per_s", "rollout tokens/s (generated)"),
                      ("perf/update_tokens_per_s", "update tokens/s (rows x length)"),
                      ("perf/update_response_tokens_per_s", "update response tokens/s"),
                      ("perf/step_s", "seconds per RL step")):
        vals = [l[key] for l in steps if key in l and (l[key] > 0 or key == "perf/step_s")]
        if vals:
            print(f"{what:<40} {statistics.median(vals):>12.1f} {min(vals):>12.1f} {max(vals):>12.1f}")


def steps_to_reach(curve: dict[int, float], target: float) -> int | None:
    for step in sorted(curve):
        if curve[step] >= target - 1e-12:
            return step
    return None


def mean_curve(curves: list[dict[int, float]]) -> dict[int, float]:
    common = sorted(set.intersection(*(set(c) for c in curves)))
    return {s: statistics.fmean(c[s] for c in curves) for s in common}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gin_file", default="configs/cispo_tiny.gin")
    ap.add_argument("--losses", default="cispo,dapo,grpo")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the gin file's)")
    ap.add_argument("--eval_every", type=int, default=None)
    ap.add_argument("--out", default="runs/rl_compare")
    ap.add_argument("--gin_bindings", action="append", default=[], help="extra bindings for every run")
    ap.add_argument("--throughput", metavar="RUN_DIR", help="only summarise the tokens/s of RUN_DIR and exit")
    args = ap.parse_args(argv)
    if args.throughput:
        throughput(args.throughput)
        return 0

    from m1_jax.rl.loop import train_rl
    from m1_jax.train.config import load_config

    losses = [s for s in args.losses.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    extra = list(args.gin_bindings)
    if args.steps is not None:
        extra.append(f"TrainConfig.steps = {args.steps}")
    if args.eval_every is not None:
        extra.append(f"RLConfig.eval_every = {args.eval_every}")

    def config(name, *bindings):
        return load_config([args.gin_file], extra + [f"TrainConfig.run_dir = '{out}/{name}'", "TrainConfig.resume = 'never'",
                                                     "TrainConfig.tensorboard = False", *bindings])

    base = config("probe")
    steps = base.train.steps
    rc = base.rl
    # The shared start: the warm-up, run once (a one-step RL run whose warm-up is all we keep).
    warm = os.path.join(out, "warmup")
    if not os.path.isdir(os.path.join(warm, "warmup", "checkpoints")):
        t = time.perf_counter()
        print(f"warm-up ({rc.warmup_steps} supervised steps) -> {warm}/warmup", flush=True)
        train_rl(config("warmup", "TrainConfig.steps = 1"), verbose=False)
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    init = f"RLConfig.init_checkpoint = '{warm}/warmup'"

    curves: dict[str, list[dict[int, float]]] = {loss: [] for loss in losses}
    greedy: dict[str, list[dict[int, float]]] = {loss: [] for loss in losses}
    seconds: dict[str, list[float]] = {loss: [] for loss in losses}
    total = len(losses) * len(seeds)
    t_all = time.perf_counter()
    for i, (seed, loss) in enumerate((s, l) for s in seeds for l in losses):
        t = time.perf_counter()
        res = train_rl(config(f"{loss}_seed{seed}", init, f"RLConfig.loss = '{loss}'", f"TrainConfig.seed = {seed}",
                              f"TrainConfig.checkpoint_every = {steps}"), verbose=False)
        dt = time.perf_counter() - t
        curve = res.history["eval/reward_mean"]
        curves[loss].append(curve)
        greedy[loss].append(res.history["eval/greedy_reward_mean"])
        seconds[loss].append(dt)
        elapsed = time.perf_counter() - t_all
        eta = elapsed / (i + 1) * (total - i - 1)
        print(f"[{i + 1}/{total}] {loss:>5} seed {seed}: held-out reward {curve[min(curve)]:.3f} -> "
              f"{curve[max(curve)]:.3f} (greedy {greedy[loss][-1][max(curve)]:.3f}), {dt:.0f} s; ETA {eta / 60:.1f} min",
              flush=True)

    mean = {loss: mean_curve(curves[loss]) for loss in losses}
    ref_loss = "dapo" if "dapo" in losses else losses[0]
    target = mean[ref_loss][max(mean[ref_loss])]
    rows = []
    for loss in losses:
        finals = [c[max(c)] for c in curves[loss]]
        finals_g = [c[max(c)] for c in greedy[loss]]
        reach = steps_to_reach(mean[loss], target)
        rows.append({"loss": loss, "start": mean[loss][min(mean[loss])], "final_mean": statistics.fmean(finals),
                     "final_std": statistics.pstdev(finals), "greedy_final_mean": statistics.fmean(finals_g),
                     "steps_to_ref_final": reach, "seconds_per_run": statistics.fmean(seconds[loss]),
                     "finals": finals})
    print(f"\nheld-out reward (mean of {rc.eval_samples} samples per prompt at temperature {rc.temperature} on "
          f"{rc.eval_prompts} prompts), {len(seeds)} seeds, {steps} RL steps, task {rc.task!r} size {rc.task_size}")
    print(f"{'loss':<6} {'start':>7} {'final (mean +- std)':>21} {'greedy final':>13} "
          f"{'steps to ' + ref_loss + ' final':>20} {'s/run':>7}")
    for r in rows:
        reach = "-" if r["steps_to_ref_final"] is None else str(r["steps_to_ref_final"])
        print(f"{r['loss']:<6} {r['start']:>7.3f} {r['final_mean']:>12.3f} +- {r['final_std']:.3f} "
              f"{r['greedy_final_mean']:>13.3f} {reach:>20} {r['seconds_per_run']:>7.0f}")
    print(f"({ref_loss}'s final seed-mean reward: {target:.3f}; a step count is the first evaluation at or above it)")
    with open(os.path.join(out, "rl_compare.json"), "w") as f:
        json.dump({"gin_file": args.gin_file, "bindings": extra, "steps": steps, "seeds": seeds, "table": rows,
                   "target": target, "reference": ref_loss,
                   "curves": {l: [{str(k): v for k, v in c.items()} for c in curves[l]] for l in losses},
                   "greedy": {l: [{str(k): v for k, v in c.items()} for c in greedy[l]] for l in losses}}, f, indent=1)
    plot(curves, mean, target, ref_loss, os.path.join(out, "rl_compare.png"),
         title=f"{rc.task} (size {rc.task_size}), {len(seeds)} seeds: held-out reward")
    print(f"wrote {out}/rl_compare.png and rl_compare.json")
    return 0


def plot(curves, mean, target, ref_loss, path, *, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for loss, color in zip(curves, ("tab:red", "tab:blue", "tab:green", "tab:purple")):
        steps = sorted(mean[loss])
        lo = [min(c[s] for c in curves[loss]) for s in steps]
        hi = [max(c[s] for c in curves[loss]) for s in steps]
        ax.plot(steps, [mean[loss][s] for s in steps], color=color, label=f"{loss} (mean of {len(curves[loss])})")
        ax.fill_between(steps, lo, hi, color=color, alpha=0.15, linewidth=0)
    ax.axhline(target, color="gray", linestyle=":", linewidth=1, label=f"{ref_loss} final")
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out reward")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
