"""benchmarks/scaling.py and scripts/cp_long_check.py on 8 fake CPU devices (subprocesses, tiny model).

No timings are asserted: the scaling benchmark must run every mesh with the real train step, and with the
same data and initialisation (strong scaling) every mesh's first-step loss must match the 1-device one;
the context-parallel check must pass (LASP-2 + context-parallel softmax attention vs one device).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
TINY = ["num_hidden_layers=2", "layer_types=('linear_attention','full_attention')", "block_size=16"]


def _run(args: list[str], timeout: int = 1800, devices: int = 8) -> tuple[int, list[dict], str]:
    # XLA_FLAGS from tests/conftest.py (cheaper compiles) plus the fake device count
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return r.returncode, rows, r.stdout + r.stderr[-4000:]


@pytest.mark.slow
def test_scaling_bench_runs_every_mesh_with_matching_losses(tmp_path):
    configs = ["1:fsdp=1", "2:expert=2", "4:fsdp=2,expert=2", "2:context=2"]
    out = tmp_path / "rows.jsonl"
    rc, rows, log = _run(["benchmarks/scaling.py", "--preset", "tiny", "--override", *TINY, "--scaling", "strong",
                          "--batch", "4", "--seq", "64", "--steps", "1", "--warmup", "1", "--profile",
                          "--configs", *configs, "--out", str(out)])
    assert rc == 0, log
    rows = [r for r in rows if "config" in r]
    assert [r["config"] for r in rows] == configs, log
    assert all("error" not in r and "skipped" not in r for r in rows), log
    assert [json.loads(line) for line in out.read_text().splitlines()][1:] == rows  # --out: info line, then rows
    base = rows[0]
    for r in rows:
        assert r["batch"] == 4 and r["seq"] == 64, r
        assert math.isfinite(r["first_loss"]) and math.isfinite(r["loss"]), r
        # same tokens, same initialisation: the meshes differ only in how the step is split
        assert abs(r["first_loss"] - base["first_loss"]) <= 2e-5 * abs(base["first_loss"]), (r, base)
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["compile_s"] > 0, r
        assert r["mem_plan_gib"] is not None and r["mem_plan_gib"] > 0, r
        assert r["comm_s"] is not None and r["comm_source"].startswith("host"), r
    by = {r["config"]: r for r in rows}
    assert by["1:fsdp=1"]["mesh"] == {} and by["4:fsdp=2,expert=2"]["mesh"] == {"fsdp": 2, "expert": 2}
    # expert meshes run the dropless MoE (ep_capacity without a capacity limit on the CPU)
    assert by["2:expert=2"]["moe_impl"] == "ep_capacity" and by["2:expert=2"]["moe_capacity_factor"] <= 0
    assert by["2:context=2"]["moe_impl"] != "ep_capacity"
    for spec in configs[1:]:  # multi-device steps move data: all-to-alls, all-gathers, reduce-scatters
        assert by[spec]["comm_s"] > 0 and by[spec]["comm_events"] > 0, by[spec]
    assert "| devices | mesh |" in log and "eff. vs 1" in log and "1.00" in log


@pytest.mark.slow
def test_cp_long_check_passes_and_needs_two_devices():
    rc, rows, log = _run(["scripts/cp_long_check.py", "--preset", "tiny", "--set", *TINY, "--seq", "256",
                          "--mesh", "context=4", "--ref-mesh", "context=1", "--documents", "3"])
    assert rc == 0, log
    (r,) = rows
    assert r["status"] == "pass" and r["seq"] == 256 and r["dtype"] == "float32", r
    assert r["loss_rel"] <= 1e-5 and r["grad_rel_max"] <= 1e-4 and r["grad_leaves"] > 10, r
    assert "all-gather" in r["collectives"], r  # the sequence really was split over devices
    # one device: a clear refusal, exit status 2, before any compute
    rc, rows, log = _run(["scripts/cp_long_check.py", "--preset", "tiny", "--seq", "256"],
                         devices=1)
    assert rc == 2 and rows[-1]["status"] == "cannot run" and "needs >= 2 devices" in log, log
