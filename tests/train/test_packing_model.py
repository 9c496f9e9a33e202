"""A packed row gives the same per-document logits as each document run alone."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1_jax import MiniMaxForCausalLM, ModelConfig


def test_packed_row_matches_documents_alone():
    # 3 lightning + 1 softmax layers; block_size 8 so documents start mid-block and span blocks.
    cfg = ModelConfig.preset("tiny", block_size=8, moe_impl="dense", num_hidden_layers=4,
                             layer_types=("linear_attention",) * 3 + ("full_attention",))
    model = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    lengths = [13, 5, 22, 8]  # 48 tokens in one row
    docs = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in lengths]
    row = np.concatenate(docs)[None]
    seg = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)])[None]
    fwd = jax.jit(lambda x, s=None: model(x, segment_ids=s))
    packed = fwd(row, seg)
    off = 0
    for d in docs:
        alone = fwd(jnp.asarray(d[None]))
        np.testing.assert_allclose(np.asarray(packed[0, off:off + len(d)]), np.asarray(alone[0]),
                                   rtol=2e-4, atol=2e-4)
        off += len(d)
    # Without segment ids the later documents see the earlier ones (the test can tell the difference).
    plain = fwd(jnp.asarray(row))
    assert not np.allclose(np.asarray(plain[0, 13:18]), np.asarray(packed[0, 13:18]), atol=1e-3)
