"""Analytic FLOPs model: hand-computed counts, the reference architectures, and XLA's cost analysis.

XLA cross-check tolerance (``docs/flops.md``): the analytic matmul-only count is within 10% of XLA's
``cost_analysis()["flops"]`` for the tiny config (head_dim 16: softmax / SiLU / norm elementwise work
is a visible share) and within 2% for M1-shaped layers (head_dim 128, hidden 1024); adding the
approximate elementwise term brings both within 3% / 1.5%. The model is compiled with
``scan_layers=False`` (HloCostAnalysis counts a while-loop body once, not once per trip),
``causal=False`` (the XLA softmax path and the chunked lightning intra-block computation are dense
masked matmuls) and ``experts="all"`` for ``moe_impl="dense"``.
"""

from __future__ import annotations

import math

import pytest

from m1_jax import flops as F
from m1_jax.config import FULL, ModelConfig
from m1_jax.flops_archs import FIGURE_COEFFS, deepseek_r1, figure_flops, minimax_m1, qwen3_235b_a22b

TINY = ModelConfig.preset("tiny")

# Hand count for the tiny preset (vocab 256, hidden 64, 7 lightning + 1 softmax, 4 heads x 16, 2 kv heads,
# 4 experts top-2 with d_ff 96, block 32), in MACs per token:
LIN_PROJ = 3 * 64 * 64 + 64 * 64 + 64 * 64  # qkv + gate + out = 20480
SM_PROJ = 64 * 64 + 2 * 64 * 32 + 64 * 64  # q + k + v (GQA) + o = 12288
EXPERT = 3 * 64 * 96  # 18432
ROUTER = 64 * 4
HEAD = 256 * 64
WEIGHT_MACS = 7 * LIN_PROJ + SM_PROJ + 8 * (2 * EXPERT + ROUTER) + HEAD  # 468992
LIN_STATE = 4 * 2 * 16 * 16  # recurrent lightning core per layer: 4 heads x (k^T v + q S)
SM_PER_KEY = 4 * (16 + 16)  # softmax core per layer per visible key


def test_hand_count_tiny_decode():
    assert WEIGHT_MACS == 468992
    for t in (0, 1, 17, 999):
        want = 2 * (WEIGHT_MACS + 7 * LIN_STATE + SM_PER_KEY * (t + 1))
        assert F.flops_per_token(TINY, t) == want
    assert F.flops_per_token(TINY, 0) == 966912
    L = 1000
    assert F.generation_flops(TINY, L) == 2 * (WEIGHT_MACS + 7 * LIN_STATE) * L + 2 * SM_PER_KEY * L * (L + 1) // 2
    assert F.generation_flops(TINY, L) == 1_094_784_000
    a, b = F.quadratic_coeffs(TINY)
    assert (a, b) == (966656 + 128, 128)


def test_hand_count_tiny_prefill_and_training():
    # Dense (non-causal) T = 64: lightning intra-block = 32 keys, state terms 2 x 16 x 16; softmax 64 keys.
    conv = F.PREFILL.replace(causal=False)
    lin = 4 * ((16 + 16) * 32 + 2 * 16 * 16)
    assert F.forward_flops(TINY, 64, conv=conv) == 2 * 64 * (WEIGHT_MACS + 7 * lin + SM_PER_KEY * 64) == 66_584_576
    assert F.forward_flops(TINY, 64, batch=3, conv=conv) == 3 * 66_584_576
    # Causal T = 64: mean intra-block keys (32 + 1) / 2, mean softmax keys 65 / 2.
    fwd_tok = 2 * (WEIGHT_MACS + 7 * 4 * (32 * 16.5 + 512) + SM_PER_KEY * 32.5)
    assert fwd_tok == 1_004_544
    assert F.train_flops_per_token(TINY, 64) == 3 * fwd_tok
    assert F.train_flops_per_token(TINY, 64, recompute=True) == 4 * fwd_tok
    assert F.train_step_flops(TINY, 8, 64) == 8 * 64 * 3 * fwd_tok
    # Dense MoE (every expert) and the 1-FLOP-per-MAC convention.
    assert F.flops_per_token(TINY, 0, F.DECODE.replace(experts="all")) - F.flops_per_token(TINY, 0) == 2 * 8 * 2 * EXPERT
    assert F.flops_per_token(TINY, 5, F.DECODE.replace(flops_per_mac=1)) * 2 == F.flops_per_token(TINY, 5)
    no_head = F.DECODE.replace(lm_head=False, router=False)
    assert F.flops_per_token(TINY, 0) - F.flops_per_token(TINY, 0, no_head) == 2 * (HEAD + 8 * ROUTER)


@pytest.mark.parametrize("conv", [F.DECODE, F.PREFILL, F.PREFILL.replace(causal=False),
                                  F.PREFILL.replace(elementwise=True), F.DECODE.replace(experts="all_per_choice")])
def test_closed_form_equals_sum_of_tokens(conv):
    cfg = TINY.replace(block_size=8)
    L = 45  # not a multiple of the block
    per_tok = sum(F.flops_per_token(cfg, t, conv, seq_len=L) for t in range(L))
    assert math.isclose(F.generation_flops(cfg, L, conv), per_tok, rel_tol=1e-12)
    parts = F.generation_breakdown(cfg, L, conv)
    assert math.isclose(sum(v for k, v in parts.items() if k != "total"), parts["total"], rel_tol=1e-12)


def test_softmax_twin():
    twin = F.softmax_twin(TINY)
    assert isinstance(twin, ModelConfig) and twin.layer_types == (FULL,) * 8
    assert F.flops_per_token(twin, 9) == 2 * (8 * SM_PROJ + 8 * (2 * EXPERT + ROUTER) + HEAD + 8 * SM_PER_KEY * 10)
    arch_twin = F.softmax_twin(F.as_arch(TINY))  # an Arch twin keeps the lightning projections
    assert arch_twin.count("softmax") == 8 and arch_twin.active_params == F.as_arch(TINY).active_params
    # The hybrid wins at long contexts, the twin at short ones (it has the lighter GQA projections).
    assert F.generation_flops(TINY, 16) > F.generation_flops(twin, 16)
    assert F.generation_flops(TINY, 4096) < F.generation_flops(twin, 4096)


def test_active_params_match_config_and_references():
    for cfg in (TINY, ModelConfig.preset("small"), ModelConfig.preset("m1-80k")):
        n = cfg.num_params()
        n_lin = sum(t != FULL for t in cfg.layer_types)  # + the lightning output norm (heads x head_dim)
        norms = 2 * cfg.hidden_size * cfg.num_hidden_layers + cfg.hidden_size + n_lin * cfg.attention_inner_dim
        assert F.as_arch(cfg).active_params == n["active"] - norms + cfg.vocab_size * cfg.hidden_size
    # Reference values (cispo-and-flops.md 3.4): active incl. LM head.
    for arch, want in ((minimax_m1(), 47.17e9), (deepseek_r1(), 36.63e9), (qwen3_235b_a22b(), 21.57e9)):
        assert math.isclose(arch.active_params, want, rel_tol=1e-3), arch.name
    head = 129_280 * 7168  # R1 without the LM head: 35.70B
    assert math.isclose(deepseek_r1().active_params - head, 35.70e9, rel_tol=1e-3)


def test_reference_architectures_option_b_and_c():
    r1, qw, m1 = deepseek_r1(), qwen3_235b_a22b(), minimax_m1()
    assert F.quadratic_coeffs(r1)[1] == 61 * 128 * (192 + 128)  # k/2, naive MLA
    assert F.quadratic_coeffs(qw)[1] == 94 * 64 * 256
    assert F.quadratic_coeffs(m1)[1] == 10 * 64 * 256
    assert F.quadratic_coeffs(r1, F.DECODE.replace(mla="absorbed"))[1] == 61 * 128 * (576 + 512)
    ratio = lambda L, c=F.DECODE: F.generation_flops(m1, L) / F.generation_flops(r1, L, c)
    assert round(ratio(65536), 3) == 0.445 and round(ratio(100_000), 3) == 0.344
    ab = F.DECODE.replace(mla="absorbed")
    assert round(ratio(65536, ab), 3) == 0.167 and round(ratio(100_000, ab), 2) == 0.12
    assert math.isclose(F.generation_flops(r1, 8192), 7.68e14, rel_tol=1e-3)
    assert math.isclose(F.generation_flops(qw, 131072), 3.21e16, rel_tol=1e-3)


def test_figure_data():
    assert set(FIGURE_COEFFS) == {"DeepSeek-R1", "Qwen3-235B-A22B", "MiniMax-M1"}
    r = lambda L: figure_flops("MiniMax-M1", L) / figure_flops("DeepSeek-R1", L)
    assert round(r(65536), 3) == 0.385 and round(r(100_000), 3) == 0.292
    assert math.isclose(figure_flops("DeepSeek-R1", 65536), 1.997e16, rel_tol=1e-3)


def test_report_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "f.png"
    assert F.main(["--plot", str(png), "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "< 50% of DeepSeek-R1 at 64K" in out and "0.385" in out and "0.445" in out
    assert png.stat().st_size > 10_000


# ---------------------------------------------------------------------------------- XLA cross-check
def _xla_flops(cfg: ModelConfig, T: int) -> float:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from flax import nnx

    from m1_jax.model import MiniMaxForCausalLM

    model = nnx.eval_shape(lambda: MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)))
    graph, state = nnx.split(model)
    fwd = lambda s, ids: nnx.merge(graph, s)(ids)
    compiled = jax.jit(fwd).lower(state, jax.ShapeDtypeStruct((1, T), jnp.int32)).compile()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca["flops"])


XLA_CONV = F.PREFILL.replace(causal=False, experts="all")
SMALL8 = ModelConfig.preset("small", num_hidden_layers=8, layer_types=ModelConfig.preset("tiny").layer_types,
                            dtype="float32")


@pytest.mark.parametrize("name,cfg,T,tol,tol_elem", [
    ("tiny", TINY, 1024, 0.10, 0.03),
    ("tiny twin", F.softmax_twin(TINY), 1024, 0.10, 0.03),
    ("small x8 layers", SMALL8, 512, 0.01, 0.005),
    ("small x8 layers", SMALL8, 2048, 0.01, 0.005),
    ("small x8 twin", F.softmax_twin(SMALL8), 2048, 0.01, 0.005),
])
def test_xla_cost_analysis_agrees(name, cfg, T, tol, tol_elem):
    cfg = cfg.replace(moe_impl="dense", scan_layers=False)
    xla = _xla_flops(cfg, T)
    ours = F.forward_flops(cfg, T, conv=XLA_CONV)
    ours_e = F.forward_flops(cfg, T, conv=XLA_CONV.replace(elementwise=True))
    assert abs(xla / ours - 1) <= tol, (name, T, xla, ours)
    assert abs(xla / ours_e - 1) <= tol_elem, (name, T, xla, ours_e)


def test_xla_ragged_moe_on_cpu_counts_every_expert_per_choice():
    # lax.ragged_dot lowers to a dense per-group computation on the CPU: k x E expert passes per token.
    cfg = TINY.replace(moe_impl="ragged", scan_layers=False)
    xla = _xla_flops(cfg, 128)
    ours = F.forward_flops(cfg, 128, conv=XLA_CONV.replace(experts="all_per_choice", elementwise=True))
    assert abs(xla / ours - 1) <= 0.03
