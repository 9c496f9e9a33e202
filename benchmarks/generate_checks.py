"""Correctness of the GPU paths that ``benchmarks/generate.py`` times, checked before it times them: the
Pallas cache-attention kernel and the packed-row flash path against the XLA blockwise path (bf16 and
float32, odd lengths, left padding), the fused decode-expert kernels against their jnp reference, and
cached greedy generation against the full forward. On the CPU the
Pallas kernels run in the interpreter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1_jax import MiniMaxForCausalLM, ModelConfig
from m1_jax.config import FULL, LINEAR


def check_paths(quick: bool, only: set | None = None, log=print) -> list[dict]:
    """Each check in isolation (one failing never hides the others); ``only``: names to run; ``log``: a
    function of one line of text."""
    rows = []
    for name, fn in (("cache_attention", check_cache_attention), ("flash_attention", check_flash_attention),
                     ("moe_decode", check_moe_decode), ("generate", check_generate)):
        if only and not any(o.startswith(name) for o in only):
            continue
        try:
            fn(quick, rows, only, log)
        except Exception as e:  # noqa: BLE001
            rows.append(dict(check=name, error=f"{type(e).__name__}: {str(e)[:500]}", ok=False))
            log(f"check {name} crashed: {rows[-1]['error']}")
    return rows


def check_cache_attention(quick, rows, only, log):
    """The Pallas kernel against the XLA blockwise path (float32 math): decode, a short and a long chunk,
    left padding, the stacked cache read at layer 1. ``only`` holding ``cache_attention_long``: the long
    chunk only."""
    from pallas_kernels.attention import cache_attention

    interpret = jax.default_backend() == "cpu"
    rng = np.random.default_rng(0)
    D, N, K = (16 if quick else 128), 8, 2
    shapes = ((3, 1, 1024), (3, 7, 1280), (2, 300, 2048))
    if quick:
        shapes = shapes[:2]
    elif only and "cache_attention_long" in only:
        shapes = shapes[2:]
    for dtype in (jnp.bfloat16, jnp.float32):
        for B, T, S in shapes:
            row = dict(check="cache_attention", dtype=jnp.dtype(dtype).name, B=B, T=T, S=S)
            try:
                q = jnp.asarray(rng.standard_normal((B, T, N, D)), dtype)
                kc = jnp.asarray(rng.standard_normal((2, B, K, S, D)), dtype)
                vc = jnp.asarray(rng.standard_normal((2, B, K, S, D)), dtype)
                q_start = int(rng.integers(0, S - T))
                kv_start = jnp.asarray(rng.integers(0, q_start + T, B), jnp.int32).at[0].set(0)
                kw = dict(q_start=q_start, kv_start=kv_start, layer=1)
                got = cache_attention(q, kc, vc, backend="pallas_gpu", interpret=interpret, **kw)
                ref = cache_attention(q.astype(jnp.float32), kc.astype(jnp.float32), vc.astype(jnp.float32),
                                      backend="xla", **kw)
                err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
                row.update(rel_err=err, ok=err < (2e-2 if dtype == jnp.bfloat16 else 1e-4))
            except Exception as e:  # noqa: BLE001
                row.update(error=f"{type(e).__name__}: {str(e)[:300]}", ok=False)
            rows.append(row)
            log(f"check {row}")


def check_flash_attention(quick, rows, only, log):
    """Packed rows (training): values and gradients against the XLA blockwise path."""
    from pallas_kernels.attention import flash_attention

    rng = np.random.default_rng(1)
    interpret = jax.default_backend() == "cpu"
    D = 16 if quick else 128
    B, T, N, K = (2, 37, 4, 2) if quick else (2, 1000, 8, 2)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        for cut in np.sort(rng.choice(np.arange(1, T), 3, replace=False)):
            seg[b, cut:] += 1
    seg = jnp.asarray(seg)
    for dtype in (jnp.bfloat16,):
        q = jnp.asarray(rng.standard_normal((B, T, N, D)), dtype)
        k = jnp.asarray(rng.standard_normal((B, T, K, D)), dtype)
        v = jnp.asarray(rng.standard_normal((B, T, K, D)), dtype)
        w = jnp.asarray(rng.standard_normal((B, T, N, D)), jnp.float32)

        def loss(q, k, v, backend):
            o = flash_attention(q, k, v, segment_ids=seg, backend=backend,
                                interpret=interpret and backend == "pallas_gpu")
            return jnp.sum(o.astype(jnp.float32) * w)

        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        got_v, got_g = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, "pallas_gpu")
        ref_v, ref_g = jax.value_and_grad(loss, argnums=(0, 1, 2))(f32(q), f32(k), f32(v), "xla")
        o_got = flash_attention(q, k, v, segment_ids=seg, backend="pallas_gpu", interpret=interpret)
        o_ref = flash_attention(f32(q), f32(k), f32(v), segment_ids=seg, backend="xla")
        err = float(jnp.max(jnp.abs(f32(o_got) - o_ref)) / jnp.max(jnp.abs(o_ref)))
        gerr = max(float(jnp.max(jnp.abs(f32(a) - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got_g, ref_g))
        rows.append(dict(check="flash_attention_packed", dtype=jnp.dtype(dtype).name, B=B, T=T, rel_err=err,
                         grad_rel_err=gerr, ok=err < 2e-2 and gerr < 5e-2))
        log(f"check flash_attention {rows[-1]}")


def check_moe_decode(quick, rows, only, log):
    """The fused decode-expert kernels against their jnp reference (float32 products): batch 1 and 8 tokens,
    the `small` preset's expert shape, bf16 weights."""
    from pallas_kernels.moe.decode_triton import decode_experts, decode_experts_reference

    interpret = jax.default_backend() == "cpu"
    E, H, I = (8, 64, 96) if quick else (32, 1024, 384)
    for N in (1, 8):
        kk = jax.random.split(jax.random.key(N), 6)
        x = jax.random.normal(kk[0], (N, H)).astype(jnp.bfloat16)
        w1, w3 = ((0.05 * jax.random.normal(kk[i], (E, H, I))).astype(jnp.bfloat16) for i in (1, 2))
        w2 = (0.05 * jax.random.normal(kk[3], (E, I, H))).astype(jnp.bfloat16)
        experts = jax.random.randint(kk[4], (N, 2), 0, E, jnp.int32)
        weights = jax.nn.softmax(jax.random.normal(kk[5], (N, 2)), axis=-1)
        got = decode_experts(x, w1, w3, w2, experts, weights, interpret=interpret)
        ref = decode_experts_reference(x, w1, w3, w2, experts, weights)
        err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
        rows.append(dict(check="moe_decode_fused", N=N, E=E, H=H, I=I, rel_err=err, ok=err < 1e-4))
        log(f"check moe_decode {rows[-1]}")


def check_generate(quick, rows, only, log):
    """The engine on this platform: cached greedy = full forward (float32 tiny model, reference lightning)."""
    rng = np.random.default_rng(2)
    c = ModelConfig.preset("tiny", num_hidden_layers=4, layer_types=(LINEAR, FULL) * 2, vocab_size=97,
                           lightning_backend="reference", moe_impl="dense")
    model = MiniMaxForCausalLM(c, rngs=nnx.Rngs(1))
    lens = [13, 6, 1]
    ids = np.zeros((3, 13), np.int32)
    for r, n in enumerate(lens):
        ids[r, 13 - n:] = rng.integers(0, 97, n)
    from m1_jax import generate

    toks, lps = generate(model, ids, max_new_tokens=9, lengths=lens)
    toks2, _ = generate(model, ids, max_new_tokens=9, lengths=lens, prefill_chunk=5)
    worst, same = 0.0, bool(np.array_equal(np.asarray(toks), np.asarray(toks2)))
    for r, n in enumerate(lens):
        seq = jnp.asarray([list(ids[r, 13 - n:]) + list(np.asarray(toks[r]))], jnp.int32)
        logits = model(seq)[0, n - 1:-1]
        same &= list(np.asarray(jnp.argmax(logits, -1))) == list(np.asarray(toks[r]))
        ref = jax.nn.log_softmax(logits)[jnp.arange(9), jnp.asarray(toks[r])]
        worst = max(worst, float(jnp.max(jnp.abs(ref - lps[r]))))
    rows.append(dict(check="generate_vs_full_forward_f32", tokens_equal=same, logprob_abs_err=worst,
                     ok=same and worst < 1e-4))
    log(f"check generate {rows[-1]}")


# ------------------------------------------------------------------------------------- timing
