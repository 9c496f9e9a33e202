"""The public lightning-attention op: input checks and backend dispatch."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.lightning import common as cm
from pallas_kernels.lightning import reference, vjp
from pallas_kernels.lightning.vjp import KernelConfig

BACKENDS = ("auto", "reference", "pallas_gpu", "pallas_tpu")
DEFAULT_BLOCK_SIZE = 256


def _check_inputs(q, k, v, decay, initial_state, segment_ids):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"lightning_attention: q, k, v must be [B, H, T, D]; got q{q.shape} k{k.shape} v{v.shape}")
    if q.shape != k.shape:
        raise ValueError(f"lightning_attention: q and k must have the same shape [B, H, T, Dk]; got q{q.shape} k{k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"lightning_attention: v must be [B, H, T, Dv] with q's B, H, T = {q.shape[:3]}; got v{v.shape}")
    B, H, T, Dk = q.shape
    if decay.shape != (H,):
        raise ValueError(f"lightning_attention: decay must be [H] = [{H}] (one rate per head); got {decay.shape}")
    if initial_state is not None and initial_state.shape != (B, H, Dk, v.shape[-1]):
        raise ValueError(f"lightning_attention: initial_state must be [B, H, Dk, Dv] = "
                         f"{(B, H, Dk, v.shape[-1])}; got {initial_state.shape}")
    if segment_ids is not None and segment_ids.shape != (B, T):
        raise ValueError(f"lightning_attention: segment_ids must be [B, T] = {(B, T)}; got {segment_ids.shape}")


def resolve_backend(backend: str) -> str:
    """``auto``: ``pallas_gpu`` on NVIDIA GPUs, ``pallas_tpu`` on TPUs, ``reference`` elsewhere (CPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"lightning_attention: backend={backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if platform == "tpu":
        return "pallas_tpu"
    if platform in ("gpu", "cuda"):
        try:
            kind = jax.devices()[0].device_kind.lower()
        except Exception:  # pragma: no cover
            kind = ""
        if "nvidia" in kind or platform == "cuda" or any(s in kind for s in ("h100", "h200", "a100", "b200")):
            return "pallas_gpu"
    return "reference"


def lightning_attention(q, k, v, decay, *, initial_state=None, block_size=None, backend="auto",
                        interpret=False, segment_ids=None):
    """Lightning attention (linear attention with per-head exponential decay).

    Args:
      q, k: ``[B, H, T, Dk]``; v: ``[B, H, T, Dv]`` (bf16 or float32). No scale is applied. float32
        inputs on a GPU run on the reference (``float32_on_reference``).
      decay: ``[H]`` float32 rates lambda; the per-step factor is ``exp(-lambda)``.
      initial_state: optional ``[B, H, Dk, Dv]`` float32 state entering the sequence.
      block_size: the reference backend's chunk length (default 256); it changes rounding only, never
        the result. The Pallas backends ignore it and use their tuned chunks (64/128 on GPU, 256 on
        TPU; see docs/kernels.md); ``lightning_attention_kernel`` takes an explicit kernel chunk.
      backend: ``"reference"``, ``"pallas_gpu"``, ``"pallas_tpu"`` or ``"auto"`` (Pallas on GPU/TPU,
        the reference on CPU).
      interpret: run Pallas backends in interpret mode (on the CPU).
      segment_ids: optional ``[B, T]`` int document ids for packed rows; the state restarts at each
        document start. They run on the Mosaic GPU kernel where it is chosen (Hopper, bf16/f16) and on
        the reference elsewhere (``packed_rows_on_kernel``).

    Returns:
      ``(o, final_state)``: o ``[B, H, T, Dv]`` in q's dtype, final_state ``[B, H, Dk, Dv]`` float32.
    """
    _check_inputs(q, k, v, decay, initial_state, segment_ids)
    if block_size is not None:
        block_size = int(block_size)
        if block_size <= 0:
            raise ValueError(f"lightning_attention: block_size must be positive; got {block_size}")
    backend = resolve_backend(backend)
    decay = decay.astype(jnp.float32)
    if initial_state is not None:
        initial_state = initial_state.astype(jnp.float32)
    if float32_on_reference(backend, q.dtype, interpret):
        backend = "reference"
    cfg = None if backend == "reference" else choose_kernel(backend, q.shape, v.shape[-1], q.dtype, None, interpret)
    if cfg is None or (segment_ids is not None and not packed_rows_on_kernel(cfg, q.dtype)):
        block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        return reference.lightning_attention_chunked(q, k, v, decay, initial_state, block_size, segment_ids)
    # The Pallas backends use their tuned chunks: block_size is the reference's (results do not depend
    # on it beyond rounding). lightning_attention_kernel(..., block_size=) forces a kernel chunk.
    return vjp.lightning_pallas(q, k, v, decay, initial_state, cfg, segment_ids)


def float32_on_reference(backend, dtype, interpret=False) -> bool:
    """Compiled float32 calls on the GPU take the XLA reference (true float32 products). Measured on an
    H200 at (1, 4, 520, 128) (docs/benchmarks/lightning_attention.md): the Triton kernels with plain
    float32 products compiled for over 100 s; with three-pass tf32 products they compile in seconds at
    float32 accuracy (4e-7 from float64) but ran slower than the reference there. They stay available
    through ``lightning_attention_kernel``."""
    return backend == "pallas_gpu" and not interpret and jnp.dtype(dtype) == jnp.float32


# GPU defaults (see docs/kernels.md and docs/benchmarks/lightning_attention.md). Tuning keys prefixed
# ``fwd_``/``bwd_`` apply to one direction only. Explicit float32 calls of the Triton kernels use
# three-pass tf32 products ("tf32x3", error near float32's): plain float32 ("ieee") products compile for
# minutes at these tiles (measured on an H200: the C=128 two-stage backward had not compiled after 100 s).
GPU_FUSED = dict(block_size=64, tuning=(("fwd_BV", 64), ("fwd_num_warps", 4), ("bwd_BK", 64), ("bwd_BV", 64),
                                        ("bwd_num_warps", 4), ("f32_precision", "tf32x3")))
GPU_CHUNKED = dict(block_size=128, tuning=(("BK", 32), ("BV", 32), ("fwd_BV_out", 128), ("fwd_block_size", 64),
                                           ("fwd_L", 32), ("bwd_BK_par", 64), ("bwd_BV_par", 64),
                                           ("f32_precision", "tf32x3")))
# The segment strategy (how a sequence is split across the GPU's SMs) is segments.STRATEGY.
GPU_MOSAIC = dict(block_size=64, tuning=(("BK", 64), ("BV", 64), ("steps", 3)))
GPU_MIN_PROGRAMS = 96  # fused when B * H * (Dv / 64) reaches this many programs (H100: 132 SMs)
TPU_BLOCK = 256


def is_hopper(device=None) -> bool:
    """NVIDIA compute capability 9.x (H100, H200, GH200): the Mosaic GPU kernel's wgmma runs there only
    (Blackwell's tensor cores take tcgen05 instead, so newer GPUs get the Triton kernels)."""
    try:
        dev = device or jax.devices()[0]
        cc = getattr(dev, "compute_capability", None)
        return dev.platform == "gpu" and cc is not None and str(cc).split(".")[0] == "9"
    except Exception:  # pragma: no cover
        return False


def choose_kernel(backend, q_shape, dv, dtype, block_size=None, interpret=False, impl=None, tuning=None):
    """The static kernel choice for a Pallas backend (exposed for benchmarks and tests)."""
    B, H, T, Dk = q_shape
    if backend == "pallas_tpu":
        C = TPU_BLOCK if block_size is None else block_size
        C = min(C, max(16, -(-T // 16) * 16))
        return KernelConfig("tpu", int(C), bool(interpret), tuple(sorted((tuning or {}).items())))
    if backend != "pallas_gpu":
        raise ValueError(f"lightning_attention: backend {backend!r} has no Pallas kernel")
    if impl is None:
        if is_hopper() and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            impl = "mosaic_gpu"  # every shape: it splits long sequences into segments itself
        elif B * H * max(1, dv // 64) >= GPU_MIN_PROGRAMS:
            impl = "triton_fused"
        else:
            impl = "triton_chunked"
    defaults = {"triton_fused": GPU_FUSED, "triton_chunked": GPU_CHUNKED, "mosaic_gpu": GPU_MOSAIC}.get(impl)
    if defaults is None:
        raise ValueError(f"lightning_attention: unknown GPU kernel {impl!r}")
    C = defaults["block_size"] if block_size is None else block_size
    if C & (C - 1):
        raise ValueError(f"lightning_attention: backend 'pallas_gpu' needs a power-of-two block_size; got {C}")
    if impl != "mosaic_gpu":  # short sequences get a smaller chunk; the Mosaic kernel is built for 64
        C = max(16, min(C, cm.pow2_at_least(T)))
    user = dict(tuning or {})
    tun = {**dict(defaults["tuning"]), **user}  # the caller's keys override single defaults
    if block_size is not None:  # an explicit chunk applies to both directions unless tuned per direction
        for key in ("fwd_block_size", "bwd_block_size"):
            if key not in user:
                tun.pop(key, None)
    for key in ("fwd_block_size", "bwd_block_size"):
        if key in tun:
            tun[key] = max(16, min(int(tun[key]), cm.pow2_at_least(T)))
    return KernelConfig(impl, int(C), bool(interpret), tuple(sorted(tun.items())))


def packed_rows_on_kernel(cfg: KernelConfig, dtype) -> bool:
    """The one gate for packed rows (``segment_ids``): they run on a kernel only where it restarts the
    state at document starts, which the Mosaic GPU kernel does (its bf16/f16 form with its 64-token
    chunk; in the interpreter also float32). The Triton and TPU kernels do not: there packed rows take
    the reference (``lightning_attention``) or are refused (``lightning_attention_kernel``)."""
    if cfg.impl != "mosaic_gpu":
        return False
    from pallas_kernels.lightning import gpu_mosaic
    return gpu_mosaic.supported_call(dtype, cfg.block_size, cfg.interpret)


def lightning_attention_kernel(q, k, v, decay, *, initial_state=None, backend="pallas_gpu", block_size=None,
                               interpret=False, impl=None, tuning=None, segment_ids=None):
    """Like :func:`lightning_attention` with an explicit kernel choice (``impl``: ``"triton_fused"``,
    ``"triton_chunked"``, ``"mosaic_gpu"``, ``"tpu"``) and tuning dict. For benchmarks and tests.
    ``segment_ids`` (packed rows) run where ``packed_rows_on_kernel`` allows (``impl="mosaic_gpu"``)."""
    _check_inputs(q, k, v, decay, initial_state, segment_ids)
    cfg = choose_kernel(backend, q.shape, v.shape[-1], q.dtype, block_size, interpret, impl, tuning)
    if segment_ids is not None and not packed_rows_on_kernel(cfg, q.dtype):
        raise ValueError(f"lightning_attention_kernel: packed rows (segment_ids) run on the 'mosaic_gpu' kernel "
                         f"(bf16/f16, chunk 64) or the reference backend; got kernel {cfg.impl!r}, "
                         f"{jnp.dtype(q.dtype).name}, chunk {cfg.block_size}")
    return vjp.lightning_pallas(q, k, v, decay.astype(jnp.float32), initial_state, cfg, segment_ids)
