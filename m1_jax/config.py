"""ModelConfig: every architecture field of MiniMax-Text-01 / MiniMax-M1, validated.

Field names follow transformers' built-in ``MiniMaxConfig`` where one exists. ``from_hf`` reads both
the original remote-code config (``attn_type_list``, ``layernorm_*_alpha/beta``, ``rotary_dim``) and the
HF built-in one (``layer_types``, ``*_factor``); ``to_hf`` writes the built-in form and
``to_hf_original`` the remote-code form.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from m1_jax.dtypes import DTYPE_NAMES as DTYPES  # names only; the table is m1_jax.dtypes

LINEAR = "linear_attention"
FULL = "full_attention"
LAYER_TYPES = (LINEAR, FULL)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# MoE implementations (m1_jax.model.moe.layer): "gmm" dropless, pairs sorted by expert, grouped GEMM
# kernels (pallas_kernels.moe); "ragged" the same with XLA's lax.ragged_dot; "dense" every expert on
# every token; "ep_capacity" / "ep_ragged" expert parallel over the mesh's expert axis (capacity-based
# all-to-all, runs everywhere / dropless ragged_all_to_all, GPU and TPU); "auto" gmm, or ep_ragged
# (GPU/TPU) / ep_capacity (CPU) when the mesh has an expert axis > 1.
MOE_IMPLS = ("auto", "gmm", "ragged", "dense", "ep_capacity", "ep_ragged")
# Grouped-GEMM backend of "gmm" / "ep_ragged" (pallas_kernels.moe.BACKENDS; "auto": by platform).
MOE_BACKENDS = ("auto", "mosaic_gpu", "triton", "megablox", "xla")
# Expert products at decode shapes (m1_jax.model.moe.layer.DECODE_PRODUCTS): "batched" gathered weights and
# batched matrix-vector products; "grouped" one-row grouped GEMMs; "fused" two Triton-lowered kernels that
# read the routed weights in place; "fused_gathered" the same kernels on gathered weights (GPU; "batched"
# where the kernels cannot run).
MOE_DECODE = ("batched", "grouped", "fused", "fused_gathered")

# DeepNorm alpha of the real 80-layer model: (2 * 80) ** 0.25.
_M1_ALPHA = 3.5565588200778455


class ConfigError(ValueError):
    """A config field has a value the architecture cannot use."""


def parse_overrides(items, *, flag: str = "--set") -> dict:
    """``["key=value", ...]`` from a command line -> ``{key: value}`` (a Python literal, else the string),
    for ``ModelConfig.preset(name, **overrides)``; an item without ``=`` raises ``ConfigError`` naming
    ``flag``."""
    import ast

    out = {}
    for kv in items:
        k, sep, v = kv.partition("=")
        if not sep:
            raise ConfigError(f"{flag} {kv!r}: expected key=value")
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def require(cond: bool, obj: Any, field: str, expected: str) -> None:
    """The one validator of every config dataclass: raise ``ConfigError`` naming
    ``Class.field``, its value and what was expected, unless ``cond``."""
    if not cond:
        raise ConfigError(f"{type(obj).__name__}.{field} = {getattr(obj, field)!r} is invalid: expected {expected}")


def _pattern(period_types: tuple[str, ...], num_layers: int) -> tuple[str, ...]:
    return tuple(period_types[i % len(period_types)] for i in range(num_layers))


def m1_layer_types(num_layers: int, period: int = 8) -> tuple[str, ...]:
    """MiniMax layout: ``period - 1`` lightning layers then one softmax layer, repeated."""
    return _pattern((LINEAR,) * (period - 1) + (FULL,), num_layers)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Sizes.
    vocab_size: int = 200064
    hidden_size: int = 6144
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    head_dim: int = 128
    num_key_value_heads: int = 8
    intermediate_size: int = 9216
    num_local_experts: int = 32
    num_experts_per_tok: int = 2
    # Positions (softmax layers only).
    rotary_dim: int = 64
    rope_theta: float = 10_000_000.0
    max_position_embeddings: int = 10_240_000
    # Layer pattern: one entry per layer, "linear_attention" or "full_attention".
    layer_types: tuple[str, ...] = dataclasses.field(default_factory=lambda: m1_layer_types(80))
    # DeepNorm residual scales: out = alpha * norm(x) + beta * sublayer(norm(x)).
    full_attn_alpha_factor: float = _M1_ALPHA
    full_attn_beta_factor: float = 1.0
    linear_attn_alpha_factor: float = _M1_ALPHA
    linear_attn_beta_factor: float = 1.0
    mlp_alpha_factor: float = _M1_ALPHA
    mlp_beta_factor: float = 1.0
    # Norms.
    rms_norm_eps: float = 1e-5
    lightning_norm_eps: float = 1e-6  # the lightning output norm uses the RMSNorm class default
    # Lightning attention.
    block_size: int = 256
    lightning_backend: str = "auto"
    # MoE.
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    moe_impl: str = "auto"
    moe_backend: str = "auto"
    moe_decode: str = "batched"
    # Slots per expert per source shard = ceil(factor * tokens * k / E) for moe_impl="ep_capacity";
    # <= 0 sizes the buffers for the worst case (never drops).
    moe_capacity_factor: float = 1.25
    # Init and tokens.
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Numerics and execution.
    dtype: str = "float32"  # activations / matmul operands
    param_dtype: str = "float32"  # parameters (the router is always float32)
    scan_layers: bool = True
    remat: str = "none"

    def __post_init__(self):
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, field: str, expected: str) -> None:
            require(cond, self, field, expected)

        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                  "num_key_value_heads", "intermediate_size", "num_local_experts", "num_experts_per_tok",
                  "block_size", "max_position_embeddings"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, "a positive integer")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"a divisor of num_attention_heads = {self.num_attention_heads}")
        need(self.num_experts_per_tok <= self.num_local_experts, "num_experts_per_tok",
             f"at most num_local_experts = {self.num_local_experts}")
        need(isinstance(self.rotary_dim, int) and 0 <= self.rotary_dim <= self.head_dim
             and self.rotary_dim % 2 == 0, "rotary_dim",
             f"an even integer between 0 and head_dim = {self.head_dim}")
        need(len(self.layer_types) == self.num_hidden_layers, "layer_types",
             f"one entry per layer (num_hidden_layers = {self.num_hidden_layers}), got {len(self.layer_types)}")
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        need(not bad, "layer_types", f"entries from {LAYER_TYPES}, found {bad[:3]}")
        need(self.rope_theta > 0, "rope_theta", "a positive number")
        for f in ("rms_norm_eps", "lightning_norm_eps"):
            need(getattr(self, f) > 0, f, "a positive number")
        for f in ("full_attn_alpha_factor", "full_attn_beta_factor", "linear_attn_alpha_factor",
                  "linear_attn_beta_factor", "mlp_alpha_factor", "mlp_beta_factor"):
            need(math.isfinite(getattr(self, f)), f, "a finite number")
        need(self.router_aux_loss_coef >= 0, "router_aux_loss_coef", "a number >= 0")
        need(self.router_jitter_noise == 0, "router_jitter_noise", "0.0 (router jitter is not implemented; the released checkpoints use 0)")
        need(self.dtype in DTYPES, "dtype", f"one of {DTYPES}")
        need(self.param_dtype in DTYPES, "param_dtype", f"one of {DTYPES}")
        need(self.remat in REMAT_POLICIES, "remat", f"one of {REMAT_POLICIES}")
        need(self.moe_impl in MOE_IMPLS, "moe_impl", f"one of {MOE_IMPLS}")
        need(self.moe_backend in MOE_BACKENDS, "moe_backend", f"one of {MOE_BACKENDS}")
        need(self.moe_decode in MOE_DECODE, "moe_decode", f"one of {MOE_DECODE}")
        need(isinstance(self.moe_capacity_factor, (int, float)) and math.isfinite(self.moe_capacity_factor),
             "moe_capacity_factor", "a finite number (<= 0: no token dropping)")
        need(self.lightning_backend in ("auto", "reference", "pallas_gpu", "pallas_tpu"),
             "lightning_backend", "one of 'auto', 'reference', 'pallas_gpu', 'pallas_tpu'")
        need(not self.tie_word_embeddings, "tie_word_embeddings",
             "False (MiniMax has a separate lm_head)")

    # ------------------------------------------------------------------ derived
    @property
    def attention_inner_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def layer_period(self) -> int:
        """Smallest p such that the layer pattern is pattern[:p] repeated (p = L if it is not periodic).

        The decoder scans over ``num_hidden_layers // layer_period`` identical blocks of p layers.
        """
        L = self.num_hidden_layers
        for p in range(1, L + 1):
            if L % p == 0 and all(self.layer_types[i] == self.layer_types[i % p] for i in range(L)):
                return p
        return L

    @property
    def num_blocks(self) -> int:
        return self.num_hidden_layers // self.layer_period

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> dict[str, int]:
        """Parameter counts from the shapes.

        ``total``: every weight. ``active``: the weights one token touches in its forward, excluding
        the embedding table and the LM head (the convention of the MiniMax reports: 45.9B for M1).
        ``active_with_embeddings`` adds those two back.
        """
        H, hd, inner = self.hidden_size, self.head_dim, self.attention_inner_dim
        kv = self.num_key_value_heads * hd
        lightning = H * 3 * inner + H * inner + inner + inner * H
        softmax = H * inner + 2 * H * kv + inner * H
        expert = 3 * H * self.intermediate_size
        per_layer_common = 2 * H + H * self.num_local_experts  # two norms + router
        n_lin = sum(t == LINEAR for t in self.layer_types)
        n_full = self.num_hidden_layers - n_lin
        embed = self.vocab_size * H
        head = self.vocab_size * H
        attn = n_lin * lightning + n_full * softmax
        experts_all = self.num_hidden_layers * self.num_local_experts * expert
        experts_active = self.num_hidden_layers * self.num_experts_per_tok * expert
        common = self.num_hidden_layers * per_layer_common + H  # + final norm
        total = embed + head + attn + experts_all + common
        active = attn + experts_active + common
        return {"total": total, "active": active, "active_with_embeddings": active + embed + head,
                "embedding": embed + head, "experts": experts_all, "attention": attn}

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in _PRESETS:
            raise ConfigError(f"unknown preset {name!r}: expected one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    @staticmethod
    def preset_names() -> list[str]:
        return sorted(_PRESETS)

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> "ModelConfig":
        """Build from an HF ``config.json`` dict: the original remote-code form or the built-in form."""
        hf = dict(hf)
        if hf.get("postnorm", True) is not True:
            raise ConfigError("config.json has postnorm = false: only the post-norm (DeepNorm) layout "
                              "of MiniMax-Text-01 / M1 is supported")
        if hf.get("shared_intermediate_size", 0) not in (0, None):
            raise ConfigError(f"config.json has shared_intermediate_size = {hf['shared_intermediate_size']}: "
                              "shared experts are not part of MiniMax-Text-01 / M1 (expected 0)")
        if hf.get("tie_word_embeddings", False):
            raise ConfigError("config.json has tie_word_embeddings = true: expected false (untied lm_head)")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
                   if k not in hf]
        if missing:
            raise ConfigError(f"config.json is missing required fields {missing}")
        L = int(hf["num_hidden_layers"])
        heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        if "attn_type_list" in hf:  # original remote code: 0 = lightning, 1 = softmax
            codes = list(hf["attn_type_list"])
            bad = [c for c in codes if c not in (0, 1)]
            if bad:
                raise ConfigError(f"config.json attn_type_list has entries {bad[:3]}: expected 0 or 1")
            layer_types = tuple(FULL if c == 1 else LINEAR for c in codes)
        elif "layer_types" in hf and hf["layer_types"] is not None:
            layer_types = tuple(hf["layer_types"])
        else:  # transformers' default: alternating, full attention first
            layer_types = tuple(FULL if (i + 1) % 2 else LINEAR for i in range(L))

        def pick(original: str, builtin: str, default: float = 1.0) -> float:
            if original in hf:
                return float(hf[original])
            return float(hf.get(builtin, default))

        if "rotary_dim" in hf and hf["rotary_dim"] is not None:
            rotary_dim = int(hf["rotary_dim"])
        elif hf.get("partial_rotary_factor") is not None:
            rotary_dim = int(round(float(hf["partial_rotary_factor"]) * head_dim))
        else:
            rotary_dim = int(head_dim)  # transformers' built-in MiniMax rotates the whole head
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 1e6)
        kwargs = dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            num_hidden_layers=L,
            num_attention_heads=heads,
            head_dim=int(head_dim),
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            intermediate_size=int(hf.get("intermediate_size", 14336)),
            num_local_experts=int(hf.get("num_local_experts", 8)),
            num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
            rotary_dim=rotary_dim,
            rope_theta=float(rope_theta),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096 * 32)),
            layer_types=layer_types,
            full_attn_alpha_factor=pick("layernorm_full_attention_alpha", "full_attn_alpha_factor"),
            full_attn_beta_factor=pick("layernorm_full_attention_beta", "full_attn_beta_factor"),
            linear_attn_alpha_factor=pick("layernorm_linear_attention_alpha", "linear_attn_alpha_factor"),
            linear_attn_beta_factor=pick("layernorm_linear_attention_beta", "linear_attn_beta_factor"),
            mlp_alpha_factor=pick("layernorm_mlp_alpha", "mlp_alpha_factor"),
            mlp_beta_factor=pick("layernorm_mlp_beta", "mlp_beta_factor"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            block_size=int(hf.get("block_size", 256)),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
            router_jitter_noise=float(hf.get("router_jitter_noise", 0.0) or 0.0),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id") if not isinstance(hf.get("eos_token_id"), list)
            else hf["eos_token_id"][0],
        )
        torch_dtype = hf.get("torch_dtype") or hf.get("dtype")
        if torch_dtype in ("bfloat16", "float16", "float32"):
            kwargs["param_dtype"] = torch_dtype
            kwargs["dtype"] = torch_dtype
        kwargs.update(overrides)
        return cls(**kwargs)

    def _hf_common(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "head_dim": self.head_dim,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "hidden_act": "silu",
            "rotary_dim": self.rotary_dim,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "router_jitter_noise": self.router_jitter_noise,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.param_dtype,
            "sliding_window": None,
            "attention_dropout": 0.0,
        }

    def to_hf(self) -> dict[str, Any]:
        """transformers' built-in ``MiniMaxConfig`` form (model_type ``minimax``).

        Note: transformers' MiniMax ignores ``rotary_dim`` and rotates the whole head; a model with
        ``rotary_dim < head_dim`` is exact there only under code that honours ``rotary_dim``.
        """
        d = self._hf_common()
        d.update({
            "architectures": ["MiniMaxForCausalLM"],
            "model_type": "minimax",
            "layer_types": list(self.layer_types),
            "full_attn_alpha_factor": self.full_attn_alpha_factor,
            "full_attn_beta_factor": self.full_attn_beta_factor,
            "linear_attn_alpha_factor": self.linear_attn_alpha_factor,
            "linear_attn_beta_factor": self.linear_attn_beta_factor,
            "mlp_alpha_factor": self.mlp_alpha_factor,
            "mlp_beta_factor": self.mlp_beta_factor,
            "block_size": self.block_size,
        })
        return d

    def to_hf_original(self) -> dict[str, Any]:
        """The original remote-code form (``MiniMaxM1ForCausalLM``, ``attn_type_list``)."""
        d = self._hf_common()
        d.update({
            "architectures": ["MiniMaxM1ForCausalLM"],
            "model_type": "minimax_m1",
            "attn_type_list": [1 if t == FULL else 0 for t in self.layer_types],
            "layernorm_full_attention_alpha": self.full_attn_alpha_factor,
            "layernorm_full_attention_beta": self.full_attn_beta_factor,
            "layernorm_linear_attention_alpha": self.linear_attn_alpha_factor,
            "layernorm_linear_attention_beta": self.linear_attn_beta_factor,
            "layernorm_mlp_alpha": self.mlp_alpha_factor,
            "layernorm_mlp_beta": self.mlp_beta_factor,
            "postnorm": True,
            "block_size": self.block_size,
            "shared_intermediate_size": 0,
            "shared_moe_mode": "sigmoid",
        })
        return d


_M1 = dict()  # the dataclass defaults are the real MiniMax-Text-01 / M1 architecture

_PRESETS: dict[str, dict[str, Any]] = {
    "m1-80k": dict(_M1, param_dtype="bfloat16", dtype="bfloat16"),
    "m1-40k": dict(_M1, param_dtype="bfloat16", dtype="bfloat16"),
    "text-01": dict(_M1, param_dtype="bfloat16", dtype="bfloat16"),
    # CPU tests and the embedded default run: one 7+1 block, byte-level vocabulary.
    "tiny": dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=8, num_attention_heads=4, head_dim=16,
        num_key_value_heads=2, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
        rotary_dim=8, rope_theta=10_000.0, max_position_embeddings=4096,
        layer_types=m1_layer_types(8), full_attn_alpha_factor=2.0, linear_attn_alpha_factor=2.0,
        mlp_alpha_factor=2.0, block_size=32,
    ),
    # M1-shaped (7+1 pattern, 32 experts top-2, head_dim 128, GQA 4, real vocabulary), ~1.1B total,
    # ~0.5B active: fits one GPU for training benchmarks.
    "small": dict(
        vocab_size=200064, hidden_size=1024, num_hidden_layers=16, num_attention_heads=8, head_dim=128,
        num_key_value_heads=2, intermediate_size=384, num_local_experts=32, num_experts_per_tok=2,
        rotary_dim=64, layer_types=m1_layer_types(16), full_attn_alpha_factor=(2 * 16) ** 0.25,
        linear_attn_alpha_factor=(2 * 16) ** 0.25, mlp_alpha_factor=(2 * 16) ** 0.25,
        max_position_embeddings=1 << 20, param_dtype="float32", dtype="bfloat16",
    ),
    # M1's proportions at 1/3 the width: one 7+1 block, head_dim 128, GQA 8:1 (M1's 64:8), 32 experts
    # top-2 each 1.5x the hidden size wide, the real vocabulary; 5.8B total, 0.46B active non-embedding
    # (1.28B with the embedding and the LM head). A training step with AdamW (float32 master weights
    # and moments) fits one H200 at 8K tokens a microbatch (docs/benchmarks/training.md).
    "medium": dict(
        vocab_size=200064, hidden_size=2048, num_hidden_layers=8, num_attention_heads=16, head_dim=128,
        num_key_value_heads=2, intermediate_size=3072, num_local_experts=32, num_experts_per_tok=2,
        rotary_dim=64, layer_types=m1_layer_types(8), full_attn_alpha_factor=(2 * 8) ** 0.25,
        linear_attn_alpha_factor=(2 * 8) ** 0.25, mlp_alpha_factor=(2 * 8) ** 0.25,
        max_position_embeddings=1 << 20, param_dtype="float32", dtype="bfloat16",
    ),
}
