"""``grouped_matmul``: the grouped GEMM of the dropless MoE with its own VJP, on every platform.

    out = grouped_matmul(lhs [M, K], rhs [G, K, N], group_sizes [G])     # [M, N], lhs's dtype

Rows ``[s_g, s_g + n_g)`` of ``lhs`` go through ``rhs[g]``; rows past ``sum(group_sizes)`` give
zeros. The VJP is three grouped products: the forward ``gmm``, the input gradient
``gmm(dout, rhs, transpose_rhs=True)`` and the weight gradient ``tgmm(lhs, dout)``; each runs on
the backend picked for it:

=============  ==============================================================================
``backend``    kernels
=============  ==============================================================================
``"auto"``     Hopper GPU, 16-bit operands: ``HOPPER_AUTO`` (Mosaic GPU, measured on an H200);
               another GPU: the Triton kernels for 16-bit operands; TPU: megablox; otherwise
               (CPU, float32 on GPU) ``lax.ragged_dot``. A shape a kernel cannot take (feature
               sizes that are not multiples of its tiles) falls back to ``lax.ragged_dot``.
``"mosaic_gpu"`` ``gpu_mosaic`` (Hopper; wgmma, TMA), adapted from jax's ragged-dot kernels
``"triton"``   ``gpu_triton`` (any CUDA GPU)
``"megablox"`` jax's megablox TPU kernels
``"xla"``      ``lax.ragged_dot`` / ``lax.ragged_dot_general``
``"reference"`` one masked dense product per group (tests)
=============  ==============================================================================

``interpret=True`` runs the Pallas backends on the CPU (Mosaic GPU interpreter, Pallas
interpreter). ``rhs`` may have another dtype than ``lhs`` (float32 master weights): it is cast to
``lhs``'s dtype for the products and its gradient comes back in its own dtype, accumulated in
float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.moe import gpu_mosaic, gpu_triton, reference, tpu, tuning

BACKENDS = ("auto", "xla", "mosaic_gpu", "triton", "megablox", "reference")
KINDS = ("gmm", "gmm_t", "tgmm")  # forward, input gradient (transposed rhs), weight gradient
# What "auto" runs on a Hopper GPU with 16-bit operands, per product.
HOPPER_AUTO = {"gmm": "mosaic_gpu", "gmm_t": "mosaic_gpu", "tgmm": "mosaic_gpu"}
_16BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _is_hopper() -> bool:
    d = jax.devices()[0]
    cc = getattr(d, "compute_capability", None)
    return d.platform == "gpu" and cc is not None and str(cc).split(".")[0] == "9"


def _tiles(name: str, kind: str, m: int, k: int, n: int):
    if name == "mosaic_gpu":
        if kind == "tgmm":
            return tuning.mosaic_tgmm_tiles(m, k, n)
        return tuning.mosaic_gmm_tiles(m, k, n, transpose=kind == "gmm_t")
    if name == "triton":
        if kind == "tgmm":
            return tuning.triton_tgmm_tiles(m, k, n)
        return tuning.triton_gmm_tiles(m, k, n, transpose=kind == "gmm_t")
    return {}


def resolve_backend(kind: str, backend: str, m: int, k: int, n: int, dtype, interpret: bool = False) -> str:
    """The backend that runs product ``kind`` (``"gmm"``, ``"gmm_t"``, ``"tgmm"``) of feature sizes
    ``k``, ``n`` over ``m`` rows (``tgmm``: ``[m, k]^T @ [m, n]``)."""
    if backend not in BACKENDS:
        raise ValueError(f"grouped_matmul: backend = {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        if backend in ("mosaic_gpu", "triton") and _tiles(backend, kind, m, k, n) is None:
            raise ValueError(f"grouped_matmul: backend {backend!r} cannot take {kind} with feature sizes K={k}, "
                             f"N={n} (they must be multiples of its tiles: 64 for mosaic_gpu, 16 for triton)")
        if backend == "mosaic_gpu" and not interpret and jnp.dtype(dtype) not in _16BIT:
            raise ValueError(f"grouped_matmul: backend 'mosaic_gpu' takes bfloat16/float16 operands, got {dtype} "
                             "(use 'xla' or 'triton' for float32)")
        return backend
    platform = jax.default_backend()
    name = "xla"
    if platform == "gpu" and jnp.dtype(dtype) in _16BIT:
        name = HOPPER_AUTO[kind] if _is_hopper() else "triton"
    elif platform == "tpu":
        name = "megablox"
    if name in ("mosaic_gpu", "triton") and _tiles(name, kind, m, k, n) is None:
        name = "xla"
    return name


def _pad_rows(x, multiple: int):
    pad = (-x.shape[0]) % multiple
    return (jnp.pad(x, ((0, pad), (0, 0))), pad) if pad else (x, 0)


def _gmm(name, lhs, rhs, group_sizes, transpose, interpret):
    m, k = lhs.shape
    n = rhs.shape[1] if transpose else rhs.shape[2]
    rhs = rhs.astype(lhs.dtype)
    gs = group_sizes.astype(jnp.int32)
    if name == "xla":
        return reference.gmm_xla(lhs, rhs, gs, transpose_rhs=transpose)
    if name == "reference":
        return reference.gmm_reference(lhs, rhs, gs, transpose_rhs=transpose)
    if name == "megablox":
        x, _ = _pad_rows(lhs, tpu.row_tile(m))
        return tpu.gmm(x, rhs, gs, transpose_rhs=transpose, interpret=interpret)[:m]
    tiles = _tiles(name, "gmm_t" if transpose else "gmm", m, k, n)
    if name == "mosaic_gpu":
        return gpu_mosaic.gmm(lhs, rhs, gs, transpose_rhs=transpose, interpret=interpret, **tiles)
    x, _ = _pad_rows(lhs, tiles["block_m"])
    return gpu_triton.gmm(x, rhs, gs, transpose_rhs=transpose, interpret=interpret, **tiles)[:m]


def _tgmm(name, lhs, rhs, group_sizes, out_dtype, interpret):
    m, k = lhs.shape
    n = rhs.shape[1]
    gs = group_sizes.astype(jnp.int32)
    if name == "xla":
        return reference.tgmm_xla(lhs, rhs, gs, out_dtype=out_dtype)
    if name == "reference":
        return reference.tgmm_reference(lhs, rhs, gs, out_dtype=out_dtype)
    if name == "megablox":
        x, _ = _pad_rows(lhs, tpu.row_tile(m))
        y, _ = _pad_rows(rhs, tpu.row_tile(m))
        return tpu.tgmm(x, y, gs, out_dtype=out_dtype, interpret=interpret)
    tiles = _tiles(name, "tgmm", m, k, n)
    if name == "mosaic_gpu":
        return gpu_mosaic.tgmm(lhs, rhs, gs, out_dtype=out_dtype, interpret=interpret, **tiles)
    x, _ = _pad_rows(lhs, tiles["block_k"])
    y, _ = _pad_rows(rhs, tiles["block_k"])
    return gpu_triton.tgmm(x, y, gs, out_dtype=out_dtype, interpret=interpret, **tiles)


def _check(lhs, rhs, group_sizes, transpose_rhs=False):
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"grouped_matmul: expected lhs [M, K] and rhs [G, K, N], got shapes {lhs.shape} and "
                         f"{rhs.shape}")
    k = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k:
        raise ValueError(f"grouped_matmul: lhs {lhs.shape} and rhs {rhs.shape} disagree on K "
                         f"(transpose_rhs={transpose_rhs})")
    if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"grouped_matmul: group_sizes must be an integer array of shape ({rhs.shape[0]},) "
                         f"(one size per group of rhs), got {group_sizes.dtype}{list(group_sizes.shape)}")


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, backend="auto", interpret=False):
    """The forward product alone (no VJP): ``[M, N]`` in lhs's dtype."""
    _check(lhs, rhs, group_sizes, transpose_rhs)
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    name = resolve_backend("gmm_t" if transpose_rhs else "gmm", backend, m, k, n, lhs.dtype, interpret)
    return _gmm(name, lhs, rhs, group_sizes, transpose_rhs, interpret)


def tgmm(lhs, rhs, group_sizes, *, out_dtype=jnp.float32, backend="auto", interpret=False):
    """``lhs[rows of g]^T @ rhs[rows of g]`` per group: ``lhs [M, K]``, ``rhs [M, N]`` -> ``[G, K, N]``."""
    if lhs.ndim != 2 or rhs.ndim != 2 or lhs.shape[0] != rhs.shape[0]:
        raise ValueError(f"tgmm: expected lhs [M, K] and rhs [M, N], got {lhs.shape} and {rhs.shape}")
    m, k = lhs.shape
    name = resolve_backend("tgmm", backend, m, k, rhs.shape[1], lhs.dtype, interpret)
    return _tgmm(name, lhs, rhs.astype(lhs.dtype), group_sizes, out_dtype, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped(lhs, rhs, group_sizes, backend, interpret):
    return gmm(lhs, rhs, group_sizes, backend=backend, interpret=interpret)


def _grouped_fwd(lhs, rhs, group_sizes, backend, interpret):
    return _grouped(lhs, rhs, group_sizes, backend, interpret), (lhs, rhs, group_sizes)


def _grouped_bwd(backend, interpret, res, dout):
    lhs, rhs, group_sizes = res
    dout = dout.astype(lhs.dtype)
    dlhs = gmm(dout, rhs, group_sizes, transpose_rhs=True, backend=backend, interpret=interpret)
    drhs = tgmm(lhs, dout, group_sizes, out_dtype=rhs.dtype, backend=backend, interpret=interpret)
    return dlhs, drhs, np.zeros(group_sizes.shape, jax.dtypes.float0)


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def grouped_matmul(lhs, rhs, group_sizes, *, backend: str = "auto", interpret: bool = False):
    """Differentiable grouped GEMM (see the module docstring): ``lhs [M, K]``, ``rhs [G, K, N]``,
    ``group_sizes`` int ``[G]`` -> ``[M, N]`` in lhs's dtype."""
    _check(lhs, rhs, group_sizes)
    if backend not in BACKENDS:
        raise ValueError(f"grouped_matmul: backend = {backend!r}; expected one of {BACKENDS}")
    return _grouped(lhs, rhs, group_sizes, backend, bool(interpret))


__all__ = ["grouped_matmul", "gmm", "tgmm", "resolve_backend", "BACKENDS", "HOPPER_AUTO"]
