"""Reference architectures for the FLOPs comparison and the data of the paper's Figure 1 (right).

Configs are the public Hugging Face ``config.json`` values of DeepSeek-V3/R1 (``deepseek-ai/DeepSeek-R1``)
and Qwen3-235B-A22B (``Qwen/Qwen3-235B-A22B``); docs/flops.md lists them with the derivation.
"""

from __future__ import annotations

from m1_jax.config import ModelConfig
from m1_jax.flops.model import Arch, Layer, arch_from_config

# Figure 1 (right) of arXiv 2506.13585, read from the PDF's vector data: F(L) = a L + b L^2 fits every
# marker (L = 1024 + 8192 k) to a relative residual below 1e-8.
FIGURE_COEFFS: dict[str, tuple[float, float]] = {
    "DeepSeek-R1": (7.54145e10, 3_497_984.0),
    "Qwen3-235B-A22B": (4.30367e10, 2_310_144.0),
    "MiniMax-M1": (1.04531e11, 196_608.0),
}

# The paper's two claims: M1 / R1 FLOPs ratio bound at a generation length.
CLAIMS = (
    ("< 50% of DeepSeek-R1 at 64K", 65536, "lt", 0.50),
    ("~25% of DeepSeek-R1 at 100K", 100_000, "approx", 0.25),
)
APPROX_REL_TOL = 0.10  # "approximately 25%" is read as within 10% relative (0.225 .. 0.275)


def figure_flops(name: str, L: float) -> float:
    """FLOPs to generate L tokens according to the paper's figure (exact fit of its plotted points)."""
    a, b = FIGURE_COEFFS[name]
    return a * L + b * L * L


def deepseek_r1() -> Arch:
    """DeepSeek-R1 (= V3 architecture): 61 layers, MLA, 3 dense + 58 MoE layers (256 routed top-8 + 1
    shared). The MTP module is not part of inference and is not counted."""
    d, heads = 7168, 128
    q_lora, kv_lora, nope, rope, v = 1536, 512, 128, 64, 128
    attn = (d * q_lora + q_lora * heads * (nope + rope)  # q_a, q_b
            + d * (kv_lora + rope) + kv_lora * heads * (nope + v)  # kv_a (with the rope key), kv_b
            + heads * v * d)  # o_proj
    dense_ffn = 3 * d * 18432
    expert = 3 * d * 2048
    layers = []
    for i in range(61):
        moe = i >= 3
        layers.append(Layer(
            attn="mla", n_heads=heads, d_qk=nope + rope, d_v=v, attn_params=attn,
            ffn_params=9 * expert if moe else dense_ffn, ffn_params_all=257 * expert if moe else dense_ffn,
            router_params=d * 256 if moe else 0, top_k=8 if moe else 0, hidden=d, d_ff_active=9 * 2048 if moe else 18432,
            mla_latent=kv_lora, mla_rope=rope))
    return Arch(name="DeepSeek-R1", layers=tuple(layers), hidden=d, vocab=129_280,
                notes="MLA q_lora 1536, kv_lora 512, qk 128+64, v 128; 3 dense + 58 MoE (8 of 256 + 1 shared)")


def qwen3_235b_a22b() -> Arch:
    """Qwen3-235B-A22B: 94 layers, GQA 64 q / 4 kv heads x 128, MoE 128 experts top-8, d_ff 1536."""
    d, heads, kv_heads, hd = 4096, 64, 4, 128
    attn = d * heads * hd + 2 * d * kv_heads * hd + heads * hd * d
    expert = 3 * d * 1536
    layer = Layer(attn="softmax", n_heads=heads, d_qk=hd, d_v=hd, attn_params=attn, ffn_params=8 * expert,
                  ffn_params_all=128 * expert, router_params=d * 128, top_k=8, hidden=d, d_ff_active=8 * 1536)
    return Arch(name="Qwen3-235B-A22B", layers=(layer,) * 94, hidden=d, vocab=151_936,
                notes="GQA 64/4 x 128; MoE 8 of 128, d_ff 1536")


def minimax_m1() -> Arch:
    """MiniMax-M1 (80k / 40k / Text-01 share the architecture): 70 lightning + 10 softmax layers."""
    return arch_from_config(ModelConfig.preset("m1-80k"), name="MiniMax-M1")
