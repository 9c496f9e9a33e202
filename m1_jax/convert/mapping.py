"""The one table between HF / PyTorch checkpoint keys and this package's parameter tree.

HF keys are the on-disk safetensors names written by the original remote code and by transformers'
``save_pretrained`` (per-expert ``block_sparse_moe.experts.{e}.w1/w2/w3``). transformers >= 5 holds
experts fused in memory (``mlp.gate.weight``, ``mlp.experts.gate_up_proj [E, 2I, H]`` = concat of
``w1_e`` then ``w3_e`` rows, ``mlp.experts.down_proj [E, H, I]`` = stacked ``w2_e``); ``fused_key_map``
says which on-disk key each fused slice is, so a state dict saved under those names reads the same way. PyTorch Linear weights are
``[out, in]``; ours are ``[in, ...out]`` with heads split out. Scanned blocks stack layers: HF layer
``l`` is block ``l // p``, position ``l % p`` in the block (p = ``config.layer_period``), and experts
stack on the next axis.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from m1_jax.config import FULL, ModelConfig

# transformers' built-in model saves these derived per-layer buffers; they are recomputed from the config.
DERIVED_BUFFER_SUFFIXES = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
DERIVED_KEY = re.compile(r"^model\.layers\.\d+\.self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay)$")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one HF tensor lives in our tree: leaf ``path``, ``index`` into its stacked leading axes,
    the transform ``kind``, and the HF shape expected on disk."""

    path: tuple
    index: tuple
    kind: str
    hf_shape: tuple


def hf_key_map(config: ModelConfig) -> dict[str, Target]:
    """Every HF key of a checkpoint of this config, mapped to its place in our parameter tree."""
    c = config
    H, n, d, kv, E, I, V = (c.hidden_size, c.num_attention_heads, c.head_dim, c.num_key_value_heads,
                            c.num_local_experts, c.intermediate_size, c.vocab_size)
    p = c.layer_period
    out: dict[str, Target] = {
        "model.embed_tokens.weight": Target(("embed_tokens",), (), "copy", (V, H)),
        "model.norm.weight": Target(("norm", "weight"), (), "copy", (H,)),
        "lm_head.weight": Target(("lm_head",), (), "transpose", (V, H)),
    }
    for l, t in enumerate(c.layer_types):
        b, j = divmod(l, p)
        base = ("blocks", "layers", j)
        pre = f"model.layers.{l}."
        out[pre + "input_layernorm.weight"] = Target(base + ("input_layernorm", "weight"), (b,), "copy", (H,))
        out[pre + "post_attention_layernorm.weight"] = Target(base + ("post_attention_layernorm", "weight"),
                                                              (b,), "copy", (H,))
        att = base + ("self_attn",)
        if t == FULL:
            out[pre + "self_attn.q_proj.weight"] = Target(att + ("q_proj",), (b,), "heads_in", (n * d, H))
            out[pre + "self_attn.k_proj.weight"] = Target(att + ("k_proj",), (b,), "heads_in", (kv * d, H))
            out[pre + "self_attn.v_proj.weight"] = Target(att + ("v_proj",), (b,), "heads_in", (kv * d, H))
            out[pre + "self_attn.o_proj.weight"] = Target(att + ("o_proj",), (b,), "heads_out", (H, n * d))
        else:
            out[pre + "self_attn.qkv_proj.weight"] = Target(att + ("qkv_proj",), (b,), "qkv", (3 * n * d, H))
            out[pre + "self_attn.output_gate.weight"] = Target(att + ("output_gate",), (b,), "heads_in", (n * d, H))
            out[pre + "self_attn.norm.weight"] = Target(att + ("norm",), (b,), "heads_vec", (n * d,))
            out[pre + "self_attn.out_proj.weight"] = Target(att + ("out_proj",), (b,), "heads_out", (H, n * d))
        moe = base + ("block_sparse_moe",)
        out[pre + "block_sparse_moe.gate.weight"] = Target(moe + ("gate",), (b,), "transpose", (E, H))
        for e in range(E):
            ep = pre + f"block_sparse_moe.experts.{e}."
            out[ep + "w1.weight"] = Target(moe + ("w1",), (b, e), "transpose", (I, H))
            out[ep + "w3.weight"] = Target(moe + ("w3",), (b, e), "transpose", (I, H))
            out[ep + "w2.weight"] = Target(moe + ("w2",), (b, e), "transpose", (H, I))
    return out


def to_ours(kind: str, w: np.ndarray, config: ModelConfig) -> np.ndarray:
    """HF tensor -> our layout (one slice of a stacked leaf)."""
    n, d = config.num_attention_heads, config.head_dim
    if kind == "copy":
        return w
    if kind == "transpose":
        return w.T
    if kind == "qkv":  # rows are [head][q|k|v][d]: per-head interleaved
        return w.T.reshape(w.shape[1], n, 3, d)
    if kind == "heads_in":
        return w.T.reshape(w.shape[1], w.shape[0] // d, d)
    if kind == "heads_out":
        return w.T.reshape(w.shape[1] // d, d, w.shape[0])
    if kind == "heads_vec":
        return w.reshape(n, d)
    raise ValueError(f"unknown tensor kind {kind!r}")


def to_hf(kind: str, w: np.ndarray) -> np.ndarray:
    """Our slice -> the HF tensor (inverse of ``to_ours``)."""
    if kind == "copy":
        return w
    if kind == "transpose":
        return w.T
    if kind == "qkv":
        return w.reshape(w.shape[0], -1).T
    if kind == "heads_in":
        return w.reshape(w.shape[0], -1).T
    if kind == "heads_out":
        return w.reshape(-1, w.shape[-1]).T
    if kind == "heads_vec":
        return w.reshape(-1)
    raise ValueError(f"unknown tensor kind {kind!r}")


# ------------------------------------------------------------------ transformers 5 in-memory fused names
@dataclasses.dataclass(frozen=True)
class FusedPart:
    """On-disk key ``key`` is ``fused[expert]`` (``half`` None), or its first (``"gate"``, w1) or second
    (``"up"``, w3) half of rows."""

    key: str
    expert: int | None
    half: str | None


def fused_key_map(config: ModelConfig) -> dict[str, tuple[tuple, list[FusedPart]]]:
    """transformers-5 in-memory key -> (its shape, the on-disk keys it holds)."""
    c = config
    H, E, I = c.hidden_size, c.num_local_experts, c.intermediate_size
    out: dict[str, tuple[tuple, list[FusedPart]]] = {}
    for l in range(c.num_hidden_layers):
        pre, moe = f"model.layers.{l}.mlp.", f"model.layers.{l}.block_sparse_moe."
        out[pre + "gate.weight"] = ((E, H), [FusedPart(moe + "gate.weight", None, None)])
        out[pre + "experts.gate_up_proj"] = ((E, 2 * I, H), [
            FusedPart(moe + f"experts.{e}.{w}.weight", e, half)
            for e in range(E) for w, half in (("w1", "gate"), ("w3", "up"))])
        out[pre + "experts.down_proj"] = ((E, H, I), [FusedPart(moe + f"experts.{e}.w2.weight", e, None)
                                                      for e in range(E)])
    return out


def take_fused(part: FusedPart, w: np.ndarray) -> np.ndarray:
    """The on-disk tensor ``part.key`` out of its fused tensor ``w`` (a view)."""
    if part.expert is None:
        return w
    w = w[part.expert]
    if part.half is None:
        return w
    half = w.shape[0] // 2
    return w[:half] if part.half == "gate" else w[half:]


def leaf_sources(key_map: dict[str, Target]) -> dict[tuple, list[tuple[tuple, str]]]:
    """Inverse of the table: our leaf path -> ``[(index into its stacked axes, HF key), ...]``."""
    out: dict[tuple, list[tuple[tuple, str]]] = {}
    for key, t in key_map.items():
        out.setdefault(t.path, []).append((t.index, key))
    for v in out.values():
        v.sort()
    return out


def is_router(key: str) -> bool:
    return key.endswith("block_sparse_moe.gate.weight")
