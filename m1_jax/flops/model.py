"""Analytic FLOPs model: MiniMax (any ``ModelConfig``), its softmax twin, DeepSeek-R1, Qwen3-235B-A22B.

Every count is a forward pass unless the name says otherwise. The model is a list of layers, each
with its projection weights, FFN weights (active experts), router weights and an attention *core*
(the part that is not a weight matmul). Per token at 0-based position ``t`` of a sequence::

    F(t) = fpm * [ sum_layers (attn_proj + ffn + router + core(t)) + lm_head ]

Conventions (``Conventions``; every one is a switch):

* ``flops_per_mac`` (default 2): one multiply-add is 2 FLOPs. Elementwise work (norms, activations,
  softmax exponentials, decay masks) is not counted unless ``elementwise=True`` (approximate).
* ``causal`` (default True): a softmax query at position t multiplies against the t + 1 keys it can
  see ("causal halving": a length-T prefill costs T(T+1)/2 score rows, not T^2). ``causal=False``
  counts every query against all ``seq_len`` keys, as a dense masked ``QK^T`` computes it. The same
  switch covers the intra-block part of chunked lightning attention.
* ``lightning`` (default "recurrent"): generation with a state; per token and head
  ``S <- exp(-lam) S + k^T v`` and ``o = q S`` = 2 dk dv MACs, independent of t. "chunked" is the
  block-parallel prefill form (``pallas_kernels.lightning.reference.lightning_attention_chunked``):
  intra-block ``(QK^T * D) V`` = C (dk + dv) MACs (C = block size), plus ``Q S_in`` and the block
  memory ``K^T V`` = 2 dk dv MACs.
* ``mla`` (DeepSeek only, default "naive"): MLA core with decompressed K/V, per head and context
  token (192 + 128) MACs; "absorbed" (the serving form): (512 + 64) + 512 MACs over the latent.
* ``experts`` (default "active"): top-k experts (+ shared ones). "all" counts every expert for every
  token (what ``moe_impl="dense"`` computes). "all_per_choice" counts every (token, choice) row against
  every expert, i.e. k x all: what ``lax.ragged_dot`` lowers to on the CPU, so what XLA's CPU cost
  analysis reports for ``moe_impl="ragged"`` (an implementation artefact, not the model's cost).
* ``lm_head`` / ``router`` (default True). The input-embedding lookup is a gather: 0 FLOPs.

Generation of L tokens from an empty context is ``sum_{t=0}^{L-1} F(t)`` (``generation_flops``); a
prefill of T tokens is the same sum under ``PREFILL`` conventions (``forward_flops``). The training
step is 3x the forward (backward = 2x: gradients for activations and for weights), 4x with full
rematerialisation (``train_flops_per_token``, ``train_step_flops``; the training loop calls the latter).

The paper's Figure 1 (right) data (``FIGURE_COEFFS``, exact fits F(L) = a L + b L^2) and the
reference architectures live in ``m1_jax.flops.archs``; the table, plot and CLI in
``m1_jax.flops.report`` (``python -m m1_jax.flops``). Every public name is importable from
``m1_jax.flops``.
"""

from __future__ import annotations

import dataclasses
from typing import Union

from m1_jax.config import FULL, LINEAR, ModelConfig

LIGHTNING_MODES = ("recurrent", "chunked")
MLA_MODES = ("naive", "absorbed")
EXPERT_MODES = ("active", "all", "all_per_choice")


@dataclasses.dataclass(frozen=True)
class Conventions:
    flops_per_mac: int = 2
    causal: bool = True
    lightning: str = "recurrent"
    mla: str = "naive"
    experts: str = "active"
    lm_head: bool = True
    router: bool = True
    elementwise: bool = False

    def __post_init__(self):
        if self.lightning not in LIGHTNING_MODES:
            raise ValueError(f"Conventions.lightning = {self.lightning!r}: expected one of {LIGHTNING_MODES}")
        if self.mla not in MLA_MODES:
            raise ValueError(f"Conventions.mla = {self.mla!r}: expected one of {MLA_MODES}")
        if self.experts not in EXPERT_MODES:
            raise ValueError(f"Conventions.experts = {self.experts!r}: expected one of {EXPERT_MODES}")
        if self.flops_per_mac <= 0:
            raise ValueError(f"Conventions.flops_per_mac = {self.flops_per_mac}: expected > 0")

    def replace(self, **kw) -> "Conventions":
        return dataclasses.replace(self, **kw)


DECODE = Conventions()  # token-by-token generation with a KV cache / lightning state
PREFILL = Conventions(lightning="chunked")  # a whole sequence in parallel (also the training forward)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One decoder layer. ``attn`` is "softmax", "lightning" or "mla"; params are weight counts."""

    attn: str
    n_heads: int
    d_qk: int
    d_v: int
    attn_params: int  # q/k/v/o (+gate, +LoRA) projection weights: one MAC each per token
    ffn_params: int  # weights one token uses in the FFN (active experts + shared / dense FFN)
    ffn_params_all: int  # every expert (== ffn_params for a dense FFN)
    router_params: int = 0
    top_k: int = 0  # routed experts per token (0: dense FFN)
    hidden: int = 0  # d_model (elementwise estimate only)
    d_ff_active: int = 0  # active intermediate width summed over used experts (elementwise only)
    mla_latent: int = 0  # kv_lora_rank (MLA absorbed form)
    mla_rope: int = 0  # qk_rope_head_dim (MLA absorbed form)


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    layers: tuple[Layer, ...]
    hidden: int
    vocab: int
    block_size: int = 256  # lightning chunk length (chunked convention)
    notes: str = ""

    @property
    def active_params(self) -> int:
        """Weights one token touches: layers' projections, active FFN and router, plus the LM head."""
        return sum(l.attn_params + l.ffn_params + l.router_params for l in self.layers) + self.vocab * self.hidden

    def count(self, attn: str) -> int:
        return sum(l.attn == attn for l in self.layers)


Model = Union[ModelConfig, Arch]


# ---------------------------------------------------------------------------------- architectures
def arch_from_config(cfg: ModelConfig, name: str = "config") -> Arch:
    """The ``Arch`` of a MiniMax ``ModelConfig`` (the same shapes as ``ModelConfig.num_params``)."""
    H, hd, inner = cfg.hidden_size, cfg.head_dim, cfg.attention_inner_dim
    kv = cfg.num_key_value_heads * hd
    expert = 3 * H * cfg.intermediate_size
    layers = []
    for t in cfg.layer_types:
        if t == LINEAR:  # qkv (3 inner), output gate (inner), out_proj; the output norm is elementwise
            attn, proj = "lightning", 3 * H * inner + H * inner + inner * H
        else:  # q, k, v (GQA), o
            attn, proj = "softmax", H * inner + 2 * H * kv + inner * H
        layers.append(Layer(attn=attn, n_heads=cfg.num_attention_heads, d_qk=hd, d_v=hd, attn_params=proj,
                            ffn_params=cfg.num_experts_per_tok * expert,
                            ffn_params_all=cfg.num_local_experts * expert,
                            router_params=H * cfg.num_local_experts, top_k=cfg.num_experts_per_tok, hidden=H,
                            d_ff_active=cfg.num_experts_per_tok * cfg.intermediate_size))
    n_lin = sum(t == LINEAR for t in cfg.layer_types)
    return Arch(name=name, layers=tuple(layers), hidden=H, vocab=cfg.vocab_size, block_size=cfg.block_size,
                notes=f"{n_lin} lightning + {cfg.num_hidden_layers - n_lin} softmax layers")


def softmax_twin(model: Model) -> Model:
    """The same model with every layer softmax attention.

    A ``ModelConfig`` gives a ``ModelConfig`` (buildable: the twin uses the softmax layers' GQA
    projections); an ``Arch`` gives an ``Arch`` whose lightning layers become softmax layers with the
    same head shapes and projection weights.
    """
    if isinstance(model, ModelConfig):
        return model.replace(layer_types=(FULL,) * model.num_hidden_layers)
    layers = tuple(dataclasses.replace(l, attn="softmax") if l.attn == "lightning" else l for l in model.layers)
    return dataclasses.replace(model, name=model.name + " (softmax twin)", layers=layers)


def as_arch(model: Model) -> Arch:
    if isinstance(model, Arch):
        return model
    if isinstance(model, ModelConfig):
        return arch_from_config(model)
    raise TypeError(f"expected a ModelConfig or flops.Arch, got {type(model).__name__}")


# ---------------------------------------------------------------------------------- per layer
def _core_macs(layer: Layer, ctx: float, intra: float, conv: Conventions) -> float:
    """Attention-core MACs for one token. ``ctx``: keys a softmax query sees; ``intra``: keys inside
    the token's lightning block (chunked convention)."""
    h, dk, dv = layer.n_heads, layer.d_qk, layer.d_v
    if layer.attn == "softmax":
        return h * (dk + dv) * ctx
    if layer.attn == "mla":
        if conv.mla == "absorbed":  # scores over [latent, rope], values in the latent
            return h * (layer.mla_latent + layer.mla_rope + layer.mla_latent) * ctx
        return h * (dk + dv) * ctx
    if layer.attn == "lightning":
        if conv.lightning == "recurrent":
            return h * 2 * dk * dv
        return h * ((dk + dv) * intra + 2 * dk * dv)
    raise ValueError(f"Layer.attn = {layer.attn!r}: expected 'softmax', 'lightning' or 'mla'")


def _elementwise(layer: Layer, ctx: float, intra: float, conv: Conventions) -> float:
    """Rough elementwise FLOPs per token (norms, residual scales, SwiGLU, softmax, decay masks)."""
    H = layer.hidden
    f = 2 * 5 * H + 2 * 2 * H  # two RMSNorms (~5/elem), two scaled residuals (~2/elem)
    f += 4 * layer.d_ff_active  # SiLU and gate product
    h = layer.n_heads
    if layer.attn in ("softmax", "mla"):
        f += 5 * h * ctx  # scale, mask, max, exp-sub, sum, divide: ~5 per score
    elif layer.attn == "lightning":
        f += 4 * h * layer.d_qk + 6 * h * layer.d_v  # SiLU(q, k, v), norm, sigmoid gate
        f += h * (intra + layer.d_qk * layer.d_v) if conv.lightning == "chunked" else h * layer.d_qk * layer.d_v
    return f


def _ffn_params(layer: Layer, conv: Conventions) -> float:
    if conv.experts == "all":
        return layer.ffn_params_all
    if conv.experts == "all_per_choice":
        return layer.ffn_params_all * layer.top_k if layer.top_k else layer.ffn_params
    return layer.ffn_params


def _contexts(t: float, seq_len: int | None, block: int, conv: Conventions) -> tuple[float, float]:
    if conv.causal:
        return t + 1, (t % block) + 1
    if seq_len is None:
        raise ValueError("causal=False needs seq_len (every query attends to all seq_len keys)")
    return seq_len, min(block, seq_len)


def flops_breakdown_per_token(model: Model, t: int, conv: Conventions = DECODE,
                              seq_len: int | None = None) -> dict[str, float]:
    """Forward FLOPs of the token at 0-based position ``t``, by component."""
    arch = as_arch(model)
    ctx, intra = _contexts(t, seq_len, arch.block_size, conv)
    fpm = conv.flops_per_mac
    out = {"attn_proj": 0.0, "ffn": 0.0, "router": 0.0, "softmax_core": 0.0, "lightning_core": 0.0,
           "lm_head": 0.0, "elementwise": 0.0}
    for l in arch.layers:
        out["attn_proj"] += fpm * l.attn_params
        out["ffn"] += fpm * _ffn_params(l, conv)
        out["router"] += fpm * l.router_params if conv.router else 0.0
        key = "lightning_core" if l.attn == "lightning" else "softmax_core"
        out[key] += fpm * _core_macs(l, ctx, intra, conv)
        if conv.elementwise:
            out["elementwise"] += _elementwise(l, ctx, intra, conv)
    if conv.lm_head:
        out["lm_head"] = fpm * arch.vocab * arch.hidden
    out["total"] = sum(out.values())
    return out


def flops_per_token(model: Model, t: int, conv: Conventions = DECODE, seq_len: int | None = None) -> float:
    """Forward FLOPs of the token at 0-based position ``t`` (it attends to t + 1 keys when causal)."""
    return flops_breakdown_per_token(model, t, conv, seq_len)["total"]


# ---------------------------------------------------------------------------------- cumulative
def _sum_ctx(L: int, conv: Conventions, seq_len: int) -> float:
    return L * (L + 1) / 2 if conv.causal else float(L) * seq_len


def _sum_intra(L: int, block: int, conv: Conventions, seq_len: int) -> float:
    if not conv.causal:
        return float(L) * min(block, seq_len)
    n, r = divmod(L, block)
    return n * block * (block + 1) / 2 + r * (r + 1) / 2


def generation_breakdown(model: Model, L: int, conv: Conventions = DECODE) -> dict[str, float]:
    """``sum_{t=0}^{L-1}`` of ``flops_breakdown_per_token`` in closed form (exact)."""
    arch = as_arch(model)
    L = int(L)
    if L < 0:
        raise ValueError(f"L = {L}: expected >= 0")
    fpm = conv.flops_per_mac
    S_ctx = _sum_ctx(L, conv, L)
    S_intra = _sum_intra(L, arch.block_size, conv, L)
    # Every per-token term is affine in (ctx, intra): evaluate it at unit vectors and combine.
    base = flops_breakdown_per_token(arch, 0, conv.replace(causal=False), seq_len=0) if L else None
    if base is None:
        return {k: 0.0 for k in ("attn_proj", "ffn", "router", "softmax_core", "lightning_core", "lm_head",
                                 "elementwise", "total")}
    out = {}
    d_ctx = {"softmax_core": 0.0, "elementwise": 0.0}
    d_intra = {"lightning_core": 0.0, "elementwise": 0.0}
    for l in arch.layers:
        c0 = _core_macs(l, 0, 0, conv)
        cc = _core_macs(l, 1, 0, conv) - c0
        ci = _core_macs(l, 0, 1, conv) - c0
        key = "lightning_core" if l.attn == "lightning" else "softmax_core"
        d_ctx[key] = d_ctx.get(key, 0.0) + fpm * cc
        d_intra[key] = d_intra.get(key, 0.0) + fpm * ci
        if conv.elementwise:
            e0 = _elementwise(l, 0, 0, conv)
            d_ctx["elementwise"] += _elementwise(l, 1, 0, conv) - e0
            d_intra["elementwise"] += _elementwise(l, 0, 1, conv) - e0
    for k, v in base.items():
        if k == "total":
            continue
        out[k] = L * v + d_ctx.get(k, 0.0) * S_ctx + d_intra.get(k, 0.0) * S_intra
    out["total"] = sum(out.values())
    return out


def generation_flops(model: Model, L: int, conv: Conventions = DECODE) -> float:
    """Forward FLOPs to generate L tokens from an empty context (decode with caches by default)."""
    return generation_breakdown(model, L, conv)["total"]


def forward_flops(model: Model, seq_len: int, batch: int = 1, conv: Conventions = PREFILL) -> float:
    """Forward FLOPs of one prefill / training forward over ``batch`` sequences of ``seq_len``."""
    return batch * generation_flops(model, seq_len, conv)


def quadratic_coeffs(model: Model, conv: Conventions = DECODE) -> tuple[float, float]:
    """(a, b) with ``generation_flops(L) = a L + b L^2`` (exact for causal recurrent/decode conventions)."""
    f1, f2 = generation_flops(model, 1, conv), generation_flops(model, 2, conv)
    b = (f2 - 2 * f1) / 2
    return f1 - b, b


def crossover(f, g, lo: int = 1, hi: int = 1 << 24) -> int | None:
    """Smallest L in [lo, hi] with f(L) <= g(L) (f, g increasing in the gap), or None."""
    if f(hi) > g(hi):
        return None
    if f(lo) <= g(lo):
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if f(mid) <= g(mid) else (mid, hi)
    return hi


# ---------------------------------------------------------------------------------- training / MFU
def train_flops_per_token(config: Model, seq_len: int, *, recompute: bool = False,
                          conv: Conventions = PREFILL) -> float:
    """Training FLOPs per token at ``seq_len``: forward (averaged over the sequence) x 3, x 4 with full
    rematerialisation (``recompute=True``; MFU conventionally uses False, HFU True)."""
    fwd = forward_flops(config, seq_len, 1, conv) / seq_len
    return (4.0 if recompute else 3.0) * fwd


def train_step_flops(config: Model, batch_size: int, seq_len: int, *, recompute: bool = False,
                     conv: Conventions = PREFILL) -> float:
    """FLOPs of one optimiser step over ``batch_size`` sequences of ``seq_len`` tokens (for MFU:
    ``mfu = train_step_flops(cfg, B, T) / step_seconds / (n_chips * peak_flops_per_chip)``)."""
    return batch_size * seq_len * train_flops_per_token(config, seq_len, recompute=recompute, conv=conv)


def mfu(config: Model, batch_size: int, seq_len: int, step_seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of one step; ``peak_flops`` is the whole job's peak (chips x per-chip)."""
    return train_step_flops(config, batch_size, seq_len) / step_seconds / peak_flops
