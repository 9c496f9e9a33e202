"""Tile choices of the grouped-GEMM kernels, per backend and shape.

``TUNED`` holds configurations measured on a GPU (``benchmarks/moe.py --sweep`` prints the best
per shape); other shapes get the rule in ``mosaic_gmm_tiles`` etc. A configuration that does not
fit the shape (a tile that does not divide K or N) is never returned: ``None`` means the kernel
cannot take the shape and the op uses ``lax.ragged_dot``.
"""

from __future__ import annotations

from pallas_kernels.moe import gpu_mosaic

# (kernel, K, N) -> tiles, measured on one H200 (jax 0.11.2); kernel is "gmm", "gmm_t" (transposed
# rhs: the input gradient) or "tgmm". K and N are the feature sizes of the product
# (gmm: lhs [M, K] @ [K, N]; tgmm: [M, K]^T @ [M, N]).
TUNED: dict[tuple[str, str, int, int], dict] = {
    # small preset, gate+up fused (32768 rows): 0.111 ms = 464 TFLOP/s vs 356 with the rule's tiles
    # (2026-12-01, docs/benchmarks/moe.md)
    ("mosaic_gpu", "gmm", 1024, 768): dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=6,
                                           grid_block_n=8),
}


def _largest_dividing(dim: int, options) -> int | None:
    for t in options:
        if dim % t == 0:
            return t
    return None


def mosaic_gmm_tiles(m: int, k: int, n: int, *, transpose: bool) -> dict | None:
    key = ("mosaic_gpu", "gmm_t" if transpose else "gmm", k, n)
    if key in TUNED:
        return dict(TUNED[key])
    block_k = _largest_dividing(k, (64,))
    block_n = _largest_dividing(n, (128, 64))
    if block_k is None or block_n is None:
        return None
    block_m = 128 if m >= 4096 else 64  # decode shapes: fewer wasted rows per group
    steps = 4
    while steps > 1 and gpu_mosaic.gmm_smem_bytes(block_m, block_n, block_k, steps) > gpu_mosaic.SMEM_BYTES:
        steps -= 1
    return dict(block_m=block_m, block_n=block_n, block_k=block_k, max_concurrent_steps=steps, grid_block_n=1)


def mosaic_tgmm_tiles(m: int, k: int, n: int, out_itemsize: int = 4) -> dict | None:
    key = ("mosaic_gpu", "tgmm", k, n)
    if key in TUNED:
        return dict(TUNED[key])
    block_m = _largest_dividing(k, (128, 64))
    block_n = _largest_dividing(n, (128, 64))
    if block_m is None or block_n is None:
        return None
    steps = 4
    while steps > 1 and gpu_mosaic.tgmm_smem_bytes(block_m, block_n, 64, steps, out_itemsize=out_itemsize) > \
            gpu_mosaic.SMEM_BYTES:
        steps -= 1
    return dict(block_m=block_m, block_n=block_n, block_k=64, max_concurrent_steps=steps, grid_block_n=1)


def triton_gmm_tiles(m: int, k: int, n: int, *, transpose: bool) -> dict | None:
    key = ("triton", "gmm_t" if transpose else "gmm", k, n)
    if key in TUNED:
        return dict(TUNED[key])
    block_k = _largest_dividing(k, (64, 32, 16))
    block_n = _largest_dividing(n, (128, 64, 32, 16))
    if block_k is None or block_n is None:
        return None
    block_m = 128 if m >= 4096 else 64
    return dict(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=8 if block_m * block_n >= 16384 else 4,
                num_stages=3)


def triton_tgmm_tiles(m: int, k: int, n: int) -> dict | None:
    key = ("triton", "tgmm", k, n)
    if key in TUNED:
        return dict(TUNED[key])
    block_m = _largest_dividing(k, (64, 32, 16))
    block_n = _largest_dividing(n, (64, 32, 16))
    if block_m is None or block_n is None:
        return None
    return dict(block_m=block_m, block_n=block_n, block_k=64, num_warps=4, num_stages=3)


__all__ = ["TUNED", "mosaic_gmm_tiles", "mosaic_tgmm_tiles", "triton_gmm_tiles", "triton_tgmm_tiles"]
