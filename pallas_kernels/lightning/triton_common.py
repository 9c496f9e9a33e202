"""Pallas-Triton plumbing shared by the Triton-lowered lightning kernels (``gpu_triton``,
``gpu_triton_split``): compiler parameters, the ``pallas_call`` wrapper, the rate BlockSpec, chunk
slices and the matmul precision for float32 inputs."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Full-precision float32 products on the GPU: "ieee" (plain FMA products, exact float32) or "tf32x3"
# (three tf32 tensor-core products; error near float32's, see docs/kernels.md).
F32_PRECISIONS = ("ieee", "tf32x3")


def compiler_params(num_warps, num_stages):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def call(kernel, out_shape, grid, in_specs, out_specs, *, num_warps, num_stages, interpret, name):
    """``pl.pallas_call`` with the Triton compiler parameters."""
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          compiler_params=compiler_params(num_warps, num_stages), interpret=interpret, name=name)


def lam_spec(ndim_grid):
    """The head's rate ``decay[h]`` as a one-element block (h is the second grid axis)."""
    if ndim_grid == 3:
        return pl.BlockSpec((1,), lambda b, h, j: (h,))
    if ndim_grid == 4:
        return pl.BlockSpec((1,), lambda b, h, n, j: (h,))
    return pl.BlockSpec((1,), lambda b, h, i, j, p: (h,))


def chunk_slice(n, C):
    """Rows of chunk ``n`` (chunk length C) inside a whole-sequence block."""
    return pl.ds(pl.multiple_of(n * C, C), C)


def precision(dtype, f32_precision="ieee", interpret=False):
    """The ``dot_general`` precision of the kernels' products for inputs of ``dtype``: None (bf16/f16
    operands, float32 accumulation), or for float32 inputs ``HIGHEST`` ("ieee") or the three-pass
    tf32 algorithm ("tf32x3", compiled only: the interpreter runs it as ``HIGHEST``)."""
    if jnp.dtype(dtype) != jnp.float32:
        return None
    if f32_precision not in F32_PRECISIONS:
        raise ValueError(f"lightning_attention: f32_precision={f32_precision!r}; expected one of {F32_PRECISIONS}")
    if f32_precision == "tf32x3" and not interpret:
        return lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    return lax.Precision.HIGHEST
