"""FLOPs: the analytic model (``model``), the reference architectures and the paper's Figure 1 data
(``archs``), the table, plot and CLI (``report``; ``python -m m1_jax.flops`` / ``m1-jax flops``).

Every public name of the three is importable from here, e.g. ``m1_jax.flops.generation_flops``,
``m1_jax.flops.deepseek_r1``, ``m1_jax.flops.FIGURE_COEFFS``. See docs/flops.md.
"""

from m1_jax.flops.archs import (APPROX_REL_TOL, CLAIMS, FIGURE_COEFFS, deepseek_r1, figure_flops, minimax_m1,
                                qwen3_235b_a22b)
from m1_jax.flops.model import (DECODE, EXPERT_MODES, LIGHTNING_MODES, MLA_MODES, PREFILL, Arch, Conventions, Layer,
                                Model, arch_from_config, as_arch, crossover, flops_breakdown_per_token,
                                flops_per_token, forward_flops, generation_breakdown, generation_flops, mfu,
                                quadratic_coeffs, softmax_twin, train_flops_per_token, train_step_flops)
from m1_jax.flops.report import compute, format_report, main, plot

__all__ = [
    "APPROX_REL_TOL", "CLAIMS", "DECODE", "EXPERT_MODES", "FIGURE_COEFFS", "LIGHTNING_MODES", "MLA_MODES", "PREFILL",
    "Arch", "Conventions", "Layer", "Model", "arch_from_config", "as_arch", "compute", "crossover", "deepseek_r1",
    "figure_flops", "flops_breakdown_per_token", "flops_per_token", "format_report", "forward_flops",
    "generation_breakdown", "generation_flops", "main", "mfu", "minimax_m1", "plot", "quadratic_coeffs",
    "qwen3_235b_a22b", "softmax_twin", "train_flops_per_token", "train_step_flops",
]
