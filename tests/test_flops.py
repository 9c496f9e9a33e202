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
from m1_jax.flops import FIGURE_COEFFS, deepseek_r1, figure_flops, minimax_m1, qwen3_235b_a22b

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


# ------------------------------------------------------ the reference architectures, counted by hand
# From the public config.json files (shared/docs/reference/cispo-and-flops.md 3.4), weight by weight as
# the checkpoints name them; every matmul weight a token uses counts once (2 FLOPs per MAC), the
# input-embedding lookup not at all, the LM head and the router in full.
def r1_weights():
    """DeepSeek-R1 (V3): d 7168, 61 layers, 128 heads, MLA (q_lora 1536, kv_lora 512, nope 128, rope 64,
    v 128), layers 0-2 dense (d_ff 18432), 58 MoE layers: 8 of 256 routed + 1 shared, d_ff 2048."""
    mla = (7168 * 1536  # q_a_proj
           + 1536 * 128 * (128 + 64)  # q_b_proj
           + 7168 * (512 + 64)  # kv_a_proj_with_mqa
           + 512 * 128 * (128 + 128)  # kv_b_proj
           + 128 * 128 * 7168)  # o_proj
    dense = 3 * 7168 * 18432  # gate, up, down
    moe = (8 + 1) * 3 * 7168 * 2048 + 7168 * 256  # routed + shared experts, router
    return 61 * mla + 3 * dense + 58 * moe + 129_280 * 7168  # + lm_head


def qwen3_weights():
    """Qwen3-235B-A22B: d 4096, 94 layers, 64 q / 4 kv heads x 128, 8 of 128 experts, d_ff 1536."""
    attn = 4096 * 64 * 128 + 2 * 4096 * 4 * 128 + 64 * 128 * 4096  # q, k, v, o
    moe = 8 * 3 * 4096 * 1536 + 4096 * 128
    return 94 * (attn + moe) + 151_936 * 4096


def m1_weights():
    """MiniMax-M1: d 6144, 80 layers (70 lightning, 10 softmax), 64 heads x 128, 8 kv heads, 2 of 32
    experts, d_ff 9216, vocab 200064."""
    lightning = 3 * 6144 * 64 * 128 + 6144 * 64 * 128 + 64 * 128 * 6144  # qkv, output_gate, out_proj
    softmax = 6144 * 64 * 128 + 2 * 6144 * 8 * 128 + 64 * 128 * 6144  # q, k, v, o
    moe = 2 * 3 * 6144 * 9216 + 6144 * 32
    return 70 * lightning + 10 * softmax + 80 * moe + 200_064 * 6144


# Per generated token at 0-based position t (t + 1 keys visible): 2 N + c_lin + k (t + 1), so
# F(L) = (2 N + c_lin) L + k L (L + 1) / 2 (cispo-and-flops.md 3.3), with k the softmax cores' FLOPs per
# key: 2 heads (d_qk + d_v) a layer (QK^T and AV), and c_lin the recurrent lightning state update
# k^T v and readout q S: 2 x 2 d^2 FLOPs per head and layer.
K_R1 = 61 * 2 * 128 * (192 + 128)  # naive MLA: decompressed keys (128 nope + 64 rope) and values
K_R1_ABSORBED = 61 * 2 * 128 * ((512 + 64) + 512)  # scores over latent + rope, values in the latent
K_QWEN = 94 * 2 * 64 * (128 + 128)
K_M1 = 10 * 2 * 64 * (128 + 128)
C_LIN_M1 = 70 * 64 * 2 * 2 * 128 * 128


def hand_generation_flops(n_weights, k, c_lin, L):
    return (2 * n_weights + c_lin) * L + k * L * (L + 1) // 2


def test_reference_architectures_option_b_and_c():
    r1, qw, m1 = deepseek_r1(), qwen3_235b_a22b(), minimax_m1()
    # our hand counts agree with the reference's computed parameter counts and k, c_lin (3.4, 3.5) ...
    assert math.isclose(r1_weights(), 36.63e9, rel_tol=1e-3) and math.isclose(K_R1, 4.997e6, rel_tol=1e-3)
    assert math.isclose(qwen3_weights(), 21.57e9, rel_tol=1e-3) and math.isclose(K_QWEN, 3.080e6, rel_tol=1e-3)
    assert math.isclose(m1_weights(), 47.17e9, rel_tol=1e-3) and math.isclose(K_M1, 3.277e5, rel_tol=1e-3)
    assert math.isclose(C_LIN_M1, 2.94e8, rel_tol=1e-2) and math.isclose(K_R1_ABSORBED, 1.699e7, rel_tol=1e-3)
    # ... and the code's architectures give exactly the hand counts
    assert (r1.active_params, qw.active_params, m1.active_params) == (r1_weights(), qwen3_weights(), m1_weights())
    absorbed = F.DECODE.replace(mla="absorbed")
    want = {"R1": (r1_weights(), K_R1, 0), "R1 absorbed": (r1_weights(), K_R1_ABSORBED, 0),
            "Qwen3": (qwen3_weights(), K_QWEN, 0), "M1": (m1_weights(), K_M1, C_LIN_M1)}
    got = {"R1": (r1, F.DECODE), "R1 absorbed": (r1, absorbed), "Qwen3": (qw, F.DECODE), "M1": (m1, F.DECODE)}
    for L in (1, 8192, 65536, 100_000, 131072):
        for name, (n, k, c) in want.items():
            arch, conv = got[name]
            assert math.isclose(F.generation_flops(arch, L, conv), hand_generation_flops(n, k, c, L),
                                rel_tol=1e-12), (name, L)
    for name, (n, k, c) in want.items():  # F(L) = a L + b L^2 with b = k / 2
        arch, conv = got[name]
        a, b = F.quadratic_coeffs(arch, conv)
        assert math.isclose(a, 2 * n + c + k / 2, rel_tol=1e-12) and b == k / 2, name
    # Option B and C tables of the reference (3.5; 3 significant digits)
    hand = lambda name, L: hand_generation_flops(*want[name], L)
    table_b = {8192: (7.68e14, 4.57e14, 7.86e14), 65536: (1.553e16, 9.44e15, 6.91e15),
               100_000: (3.23e16, 1.97e16, 1.11e16), 131072: (5.25e16, 3.21e16, 1.52e16)}
    for L, (r1_f, qw_f, m1_f) in table_b.items():
        for name, v in (("R1", r1_f), ("Qwen3", qw_f), ("M1", m1_f)):
            assert math.isclose(hand(name, L), v, rel_tol=5e-3), (name, L)
    ratio = lambda L, r="R1": F.generation_flops(m1, L) / F.generation_flops(r1, L, absorbed if "abs" in r else F.DECODE)
    assert round(ratio(65536), 3) == round(hand("M1", 65536) / hand("R1", 65536), 3) == 0.445
    assert round(ratio(100_000), 3) == round(hand("M1", 100_000) / hand("R1", 100_000), 3) == 0.344
    for L, v in ((8192, 0.67), (32768, 0.28), (65536, 0.167), (100_000, 0.120), (131072, 0.098)):  # option C
        assert math.isclose(ratio(L, "R1 absorbed"), v, abs_tol=0.006), L
        assert math.isclose(hand("M1", L) / hand("R1 absorbed", L), ratio(L, "R1 absorbed"), rel_tol=1e-12)


def test_figure_data():
    # cispo-and-flops.md 3.2: the figure's exact fits, typed from the reference (b decoded by hand)
    fits = {"DeepSeek-R1": (7.54145e10, 61 * 128 * 448), "Qwen3-235B-A22B": (4.30367e10, 94 * 64 * 384),
            "MiniMax-M1": (1.04531e11, 8 * 64 * 384)}
    assert set(FIGURE_COEFFS) == set(fits)
    for name, (a, b) in fits.items():
        assert math.isclose(FIGURE_COEFFS[name][0], a, rel_tol=1e-9) and FIGURE_COEFFS[name][1] == b, name
        for L in (1024, 8192, 100_000, 131072):
            assert math.isclose(figure_flops(name, L), a * L + b * L * L, rel_tol=1e-12), (name, L)
    # the values read off the figure (3.2's table, 3-4 significant digits)
    table = {8192: (8.53e14, 5.08e14, 8.70e14), 32768: (6.23e15, 3.89e15, 3.64e15),
             65536: (1.997e16, 1.274e16, 7.70e15), 100_000: (4.25e16, 2.74e16, 1.24e16),
             131072: (7.00e16, 4.53e16, 1.71e16)}
    for L, vals in table.items():
        for name, v in zip(("DeepSeek-R1", "Qwen3-235B-A22B", "MiniMax-M1"), vals):
            assert math.isclose(figure_flops(name, L), v, rel_tol=5e-3), (name, L)
    r = lambda L: figure_flops("MiniMax-M1", L) / figure_flops("DeepSeek-R1", L)
    assert round(r(65536), 3) == 0.385 and round(r(100_000), 3) == 0.292 and round(r(131072), 3) == 0.244


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
