"""The fused dk/dv walk of the Mosaic GPU lightning backward: one reverse walk that reads q, k, v and dO once
and writes dk and dv, where the separate dk and dv walks (``gpu_mosaic._walk``) read six tensors.

Both walks carry the same state, the cotangent ``dS [Dk, Dv]`` of the state leaving a chunk (the dk walk
carries its transpose). One program per (batch, head, segment) has three warpgroups: a memory warpgroup
streams the chunks (``plgpu.emit_pipeline_warp_specialized``, last chunk first) and two compute warpgroups
each hold one 64-column piece of the state, kept transposed, ``T_w = dS[:, piece w]^T [64, Dk]``. Per chunk
of C rows (``common.py``: a, b, g, and M = D^T for a reverse walk):

    both:  SMEM dS^T[piece w] = bf16(T_w),   T_w' = g T_w + (a * dO_w)^T Q
    wg 0:  dV = b * (K dS) + ((K Q^T) * M) dO          (dS read as the transpose of the shared dS^T)
    wg 1:  dK = b * (V dS^T) + ((V dO^T) * M) Q

The warpgroups meet at two barriers per chunk: ``ready`` (both pieces of bf16(dS^T) written) and ``done``
(both have read it, so the next chunk may overwrite it). Per warpgroup the registers hold the state piece
(64 floats per thread at Dk = 128), one [C, C] and one [C, 128] product and the decay mask.

Shared memory (Dk = Dv = 128, two stages): the stages take 128 KiB (q, k, v, dO chunks), bf16(dS^T) and
the two output slots 64 KiB, aliased (``plgpu.RefUnion``) with the float32 buffer that loads and stores
the state pieces at the start and the end; the a-scaled dO pieces 16 KiB. One program per SM.

Requirements: Dv = Dk = 128 (compiled and timed on an H200; Dk = 64 runs in the interpreter but has not been
compiled on a GPU), the rest as ``gpu_mosaic`` (bf16/f16, C = 64). Other head dims keep the two walks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.lightning import mosaic_common as mc
from pallas_kernels.lightning.segments import LAM_PAD

F32 = jnp.float32
PIECE = 64  # state columns per compute warpgroup
COMPUTE_WGS = 2


def supported(Dk, Dv, interpret=False) -> bool:
    """Dv = 128 and Dk = 128: the head dims compiled and timed on the H200 (MiniMax's). The kernel is
    written for Dk = 64 too, which the interpreter runs (the tests' small cases), but that configuration has
    not been compiled on a GPU, so compiled calls with it keep the separate walks."""
    return Dv == PIECE * COMPUTE_WGS and Dk in ((64, 128) if interpret else (128,))


def smem_bytes(Dk, steps, C=64, itemsize=2):
    """Shared memory of one program: the pipeline's stages (q, k, v, dO chunks), bf16(dS^T) with the output
    slots (aliased with the float32 state buffer), the a-scaled dO pieces, and ~2 KiB of rates and barriers."""
    Dv = PIECE * COMPUTE_WGS
    stage = C * (2 * Dk + 2 * Dv) * itemsize
    shared = max((Dv * Dk + C * Dv + C * Dk) * itemsize, Dv * Dk * 4)
    return steps * stage + shared + COMPUTE_WGS * C * PIECE * itemsize + 2048


def pipeline_steps(Dk, requested, smem_limit=227 * 1024):
    """The most pipeline stages, up to ``requested``, whose shared memory fits (Dk = 128: 2; Dk = 64: 3)."""
    steps = max(1, int(requested))
    while steps > 1 and smem_bytes(Dk, steps) > smem_limit:
        steps -= 1
    return steps


def _kernel(*refs, T, C, L, Dk, dtype, steps, docs, interp, union):
    refs = list(refs)
    first_ref, last_ref = (refs.pop(0), refs.pop(0)) if docs else (None, None)
    q_ref, k_ref, v_ref, do_ref, s0_ref, lam_ref, dk_ref, dv_ref, st_ref, bufs, zr_smem, lam_smem, bars, \
        ready, done = refs
    if union:
        (s16, out_dv, out_dk), (stage,) = bufs
    else:  # the interpreter: the same buffers without aliasing
        s16, out_dv, out_dk, stage = bufs
    bi, hi, si = (lax.axis_index(a) for a in ("b", "h", "s"))
    wg = lax.axis_index("wg")
    regs = mc.Regs(interp)
    chunk = lambda i: si * L + L - 1 - i  # noqa: E731  (last chunk first)
    piece = lambda w: pl.ds(w * PIECE, PIECE)  # noqa: E731

    def sync(bar):
        plgpu.barrier_arrive(bar)
        plgpu.barrier_wait(bar)

    def step(idx, *bufs):
        if docs:
            first_smem, last_smem, *bufs = bufs
        q_smem, k_smem, v0, v1, do0, do1, (S, M) = bufs
        v_pieces, do_pieces = (v0, v1), (do0, do1)
        n = chunk(idx[0])
        m = jnp.clip(T - n * C, 0, C).astype(F32)
        rows = regs.iota((C,), 0).astype(F32)

        def role(w):
            """Warpgroup w's step, traced with w static: w = 0 writes dv, w = 1 writes dk."""
            lam_w = lam_smem[w, 0]
            M_chunk = M
            if docs:
                a, b, g, first, last = mc.chunk_decays_of_docs(regs, lam_w, rows, m, C, first_smem, last_smem)
                M_chunk = mc.doc_mask(regs, M, regs.iota((C, C), 1), first, last, C, reverse=True)
            else:
                a, b, g = mc.chunk_decays(regs, lam_w, rows, m, C)
            plgpu.barrier_wait(done)  # both warpgroups have read the previous chunk's bf16(dS^T)
            s16.at[piece(w)][...] = S.astype(dtype)
            zr = zr_smem.at[w]
            zr[...] = (regs.load(do_pieces[w]).astype(F32) * mc.bcast(a, C, PIECE)).astype(dtype)
            plgpu.commit_smem()
            sync(ready)
            out_pieces = do_pieces if w == 0 else (q_smem,)  # what P multiplies: dv's pieces, or all of dk
            if interp:
                S_new = S * g + regs.dot(zr[...], q_smem[...], ((0,), (0,)))
                if w == 0:
                    s = regs.dot(k_smem[...], q_smem[...], ((1,), (1,)))
                    xs = [regs.dot(k_smem[...], s16.at[piece(j)][...], ((1,), (1,))) for j in range(2)]
                else:
                    s = sum(regs.dot(v_pieces[j][...], do_pieces[j][...], ((1,), (1,))) for j in range(2))
                    xs = [sum(regs.dot(v_pieces[j][...], s16.at[piece(j)][...], ((1,), (0,))) for j in range(2))]
            else:
                T_ = lambda r: plgpu.transpose_ref(r, (1, 0))  # noqa: E731
                n_xs = 2 if w == 0 else 1
                xs_width = PIECE if w == 0 else Dk

                def issue(accs):  # every product that does not need P in flight, one wait
                    s_acc, st_acc, *xs_accs = accs
                    if w == 0:
                        plgpu.wgmma(s_acc, k_smem, T_(q_smem))
                        for j in range(2):
                            plgpu.wgmma(xs_accs[j], k_smem, T_(s16.at[piece(j)]))
                    else:
                        for j in range(2):
                            plgpu.wgmma(s_acc, v_pieces[j], T_(do_pieces[j]))
                            plgpu.wgmma(xs_accs[0], v_pieces[j], s16.at[piece(j)])
                    plgpu.wgmma(st_acc, T_(zr), q_smem)
                s, S_new, *xs = pl.run_state(issue)(
                    (plgpu.ACC.init(regs.zeros((C, C))), plgpu.ACC.init(S * g))
                    + tuple(plgpu.ACC.init(regs.zeros((C, xs_width))) for _ in range(n_xs)))
            plgpu.barrier_arrive(done)
            p16 = (s * M_chunk).astype(dtype)
            outs = []
            for j, z in enumerate(out_pieces):
                o_inter = xs[j] * mc.bcast(b, C, xs[j].shape[1])
                if interp:
                    outs.append(o_inter + regs.dot(p16, z[...], ((1,), (0,))))
                else:
                    outs.append(pl.run_state(lambda acc, z=z: plgpu.wgmma(acc, p16, z))(plgpu.ACC.init(o_inter)))
            # one output slot per warpgroup: the previous chunk's store must have read it
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            rows_n = pl.ds(n * C, C)
            if w == 0:
                for j in range(2):
                    out_dv.at[j][...] = outs[j].astype(dtype)
                plgpu.commit_smem()
                for j in range(2):
                    plgpu.copy_smem_to_gmem(out_dv.at[j], dv_ref.at[bi, hi, rows_n, piece(j)])
            else:
                out_dk[...] = outs[0].astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_dk, dk_ref.at[bi, hi, rows_n])
            return S_new

        return lax.cond(wg == 0, lambda: role(0), lambda: role(1)), M

    def compute(pipeline):
        plgpu.copy_gmem_to_smem(lam_ref.at[hi], lam_smem.at[wg], bars.at[COMPUTE_WGS + wg])
        plgpu.copy_gmem_to_smem(s0_ref.at[bi, hi, si, piece(wg)], stage.at[wg], bars.at[wg])
        plgpu.barrier_wait(bars.at[COMPUTE_WGS + wg])
        plgpu.barrier_wait(bars.at[wg])
        S0 = regs.load(stage.at[wg])
        M, _ = mc.decay_mask(regs, lam_smem[wg, 0], C, reverse=True)
        plgpu.barrier_arrive(done)  # the state is in registers: the stage buffer may be overwritten
        S, _ = pipeline((S0, M))
        plgpu.barrier_wait(done)
        plgpu.wait_smem_to_gmem(0)  # this warpgroup's output stores have read their slots
        sync(ready)  # and the other's: the stage buffer aliases them
        stage.at[wg][...] = S
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(stage.at[wg], st_ref.at[bi, hi, si, piece(wg)])
        plgpu.wait_smem_to_gmem(0)

    spec = lambda width, j: plgpu.BlockSpec(  # noqa: E731
        block_shape=(C, width), index_map=lambda n: (chunk(n), j), transforms=mc.transforms(dtype))
    specs = [spec(Dk, 0), spec(Dk, 0), spec(PIECE, 0), spec(PIECE, 1), spec(PIECE, 0), spec(PIECE, 1)]
    srcs = [q_ref.at[bi, hi], k_ref.at[bi, hi], v_ref.at[bi, hi], v_ref.at[bi, hi], do_ref.at[bi, hi],
            do_ref.at[bi, hi]]
    mc.run_warp_specialized(step, compute, specs, srcs, L=L, steps=steps, C=C, chunk=chunk, compute_wgs=COMPUTE_WGS,
                            doc_rows=(first_ref.at[bi], last_ref.at[bi]) if docs else None)


@functools.lru_cache(maxsize=None)
def _launcher(B, H, Tp, Dk, P, dtype, *, T, C, L, steps, docs, interpret):
    Dv = PIECE * COMPUTE_WGS
    smem16 = lambda shape: mc.smem(shape, dtype)  # noqa: E731
    shared = (smem16((Dv, Dk)), smem16((COMPUTE_WGS, C, PIECE)), smem16((C, Dk)))
    stage = mc.smem((COMPUTE_WGS, PIECE, Dk), F32)
    # The interpreter does not model aliased buffers: there they are separate (same lifetimes).
    union = not interpret
    bufs = plgpu.RefUnion(shared, (stage,)) if union else (*shared, stage)
    scratch = [bufs, smem16((COMPUTE_WGS, C, PIECE)), plgpu.SMEM((COMPUTE_WGS, LAM_PAD), F32),
               plgpu.Barrier(num_barriers=2 * COMPUTE_WGS), plgpu.Barrier(num_arrivals=COMPUTE_WGS),
               plgpu.Barrier(num_arrivals=COMPUTE_WGS)]
    out_type = (jax.ShapeDtypeStruct((B, H, Tp, Dk), dtype), jax.ShapeDtypeStruct((B, H, Tp, Dv), dtype),
                jax.ShapeDtypeStruct((B, H, P, Dv, Dk), F32))
    kern = functools.partial(_kernel, T=T, C=C, L=L, Dk=Dk, dtype=dtype, steps=steps, docs=docs,
                             interp=interpret, union=union)
    kw = {"interpret": mc.interpret_params()} if interpret else {}
    return jax.jit(plgpu.kernel(kern, out_type=out_type, scratch_types=scratch, grid=(B, H, P),
                                grid_names=("b", "h", "s"), num_threads=COMPUTE_WGS + 1, thread_name="wg",
                                compiler_params=mc.compiler_params(), **kw))


def dkdv_walk(q, k, v, do, lam, s_in, *, T, C, steps=2, docs=None, interpret=False):
    """dk [B, H, Tp, Dk], dv [B, H, Tp, Dv] and the state cotangent leaving each segment's first chunk
    ``[B, H, P, Dk, Dv]`` float32 (segment 0's is d(h0)), from ``s_in [B, H, P, Dk, Dv]``: the cotangent
    entering each segment from the right (dht for the last). ``docs``: ``gpu_mosaic.doc_bounds`` or None."""
    B, H, Tp, Dk = q.shape
    Dv = v.shape[-1]
    if not supported(Dk, Dv, interpret):
        raise ValueError(f"fused dk/dv walk: head dims Dk={Dk}, Dv={Dv}; expected Dv={PIECE * COMPUTE_WGS} "
                         f"and Dk = 128 (or 64 in the interpreter)")
    P = s_in.shape[2]
    N = Tp // C
    if N % P:
        raise ValueError(f"fused dk/dv walk: {N} chunks do not split into {P} segments")
    L = N // P
    lam_rows = jnp.broadcast_to(lam.astype(F32)[:, None], (H, LAM_PAD))
    s0T = jnp.swapaxes(s_in.astype(F32), -1, -2)  # [B, H, P, Dv, Dk]: the warpgroups hold dS^T pieces
    args = (q, k, v, do.astype(q.dtype), s0T, lam_rows)
    if docs is not None:
        args = (docs.first, docs.last) + args
    launch = _launcher(B, H, Tp, Dk, P, jnp.dtype(q.dtype), T=T, C=C, L=L, steps=min(pipeline_steps(Dk, steps), L),
                       docs=docs is not None, interpret=bool(interpret))
    dk, dv, stT = launch(*args)
    return dk, dv, jnp.swapaxes(stT, -1, -2)
