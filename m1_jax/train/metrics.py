"""Training metrics: console progress bar (rate + ETA), TensorBoard event files, ``metrics.jsonl``,
throughput and MFU.

TFLOP/s per device and MFU use the analytic FLOPs model (``m1_jax.flops.train_step_flops``: forward x 3,
MaxText conventions: causal-halved softmax attention, chunked lightning attention, the k active experts
and the router, the LM head). MFU divides by the per-device peak (``TrainConfig.peak_tflops``, else a
table of dense bf16 peaks by device kind; unknown devices such as CPUs report no MFU).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax

# Dense (non-sparse) bf16 peak TFLOP/s per device.
PEAK_TFLOPS = {
    "h100": 989.0, "h200": 989.0, "h800": 989.0, "gh200": 989.0, "b200": 2250.0, "a100": 312.0,
    "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v5": 459.0,
    "tpu v6": 918.0, "tpu7x": 2307.0,
}


def device_peak_tflops(device=None) -> float | None:
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "").lower()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in kind:
            return PEAK_TFLOPS[key]
    return None


def step_flops(model_config, batch_size: int, seq_len: int) -> float:
    from m1_jax import flops

    return float(flops.train_step_flops(model_config, batch_size, seq_len))


class MetricsLogger:
    """Writes each logged step to the progress bar, TensorBoard and ``run_dir/metrics.jsonl``."""

    def __init__(self, run_dir: str, *, total_steps: int, start_step: int, flops_per_step: float,
                 tokens_per_step: int, peak_tflops: float | None, progress_bar: bool = True,
                 tensorboard: bool = True, is_main: bool = True, console: bool = True):
        self.is_main = is_main
        self.flops_per_step = flops_per_step
        self.tokens_per_step = tokens_per_step
        self.peak = peak_tflops
        self.n_dev = jax.device_count()
        self.jsonl = None
        self.tb = None
        self.bar = None
        self.console = console and is_main
        self.total_steps = total_steps
        self._t = time.perf_counter()
        self._last_step = start_step
        if not is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stdout, mininterval=0.5, smoothing=0.1)

    def reset_timer(self, step: int) -> None:
        """Restart the throughput clock (after compilation, so the first window is not skewed)."""
        self._t = time.perf_counter()
        self._last_step = step

    def log(self, step: int, values: dict[str, Any], *, timing: bool = True) -> dict[str, float]:
        """Record ``values`` at ``step``; ``timing=False`` leaves out throughput (e.g. a window that
        includes compilation)."""
        now = time.perf_counter()
        steps = step - self._last_step
        dt = now - self._t
        out = {k: float(v) for k, v in values.items()}
        if timing and steps > 0 and dt > 0:
            sps = steps / dt
            out["perf/steps_per_s"] = sps
            out["perf/tokens_per_s"] = sps * self.tokens_per_step
            out["perf/tokens_per_s_per_device"] = out["perf/tokens_per_s"] / self.n_dev
            tflops = sps * self.flops_per_step / self.n_dev / 1e12
            out["perf/tflops_per_device"] = tflops
            if self.peak:
                out["perf/mfu"] = tflops / self.peak
        self._t, self._last_step = now, step
        if not self.is_main:
            return out
        self.jsonl.write(json.dumps({"step": step, **out}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in out.items():
                if math.isfinite(v):
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
        if self.bar is not None:
            post = {"loss": f"{out.get('loss', float('nan')):.4f}", "lr": f"{out.get('lr', 0):.2e}",
                    "gnorm": f"{out.get('grad_norm', float('nan')):.2f}"}
            if "perf/tokens_per_s" in out:
                post["tok/s"] = f"{out['perf/tokens_per_s']:.0f}"
            if "perf/mfu" in out:
                post["mfu"] = f"{100 * out['perf/mfu']:.1f}%"
            if out.get("nonfinite_total", 0):
                post["skipped"] = int(out["nonfinite_total"])
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.console:  # no bar (e.g. logs of batch jobs): one line per logged step
            perf = (f", {out['perf/tokens_per_s']:.0f} tok/s" if "perf/tokens_per_s" in out else "") + (
                f", MFU {100 * out['perf/mfu']:.1f}%" if "perf/mfu" in out else "")
            print(f"step {step}/{self.total_steps}: loss {out.get('loss', float('nan')):.4f}, lr "
                  f"{out.get('lr', 0):.2e}, grad norm {out.get('grad_norm', float('nan')):.2f}{perf}", flush=True)
        return out

    def write(self, msg: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def add_text(self, tag: str, text: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
