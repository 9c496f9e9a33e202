"""A packed row gives the same per-document logits as each document run alone; the train step's speed
options: gradient accumulation computes the same step, the once-per-step cast keeps float32 where it must."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


def test_microbatches_give_the_plain_step():
    """Gradient accumulation over 2 microbatches with uneven loss masks gives the step of the whole
    batch: the token-weighted mean cross-entropy, the same gradient norm."""
    from m1_jax.train import step as step_lib
    from m1_jax.train.optimizer import OptimizerConfig, make_optimizer

    cfg = ModelConfig.preset("tiny", num_hidden_layers=1, layer_types=("full_attention",), moe_impl="dense")
    tx, sched = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=1), 10)
    rng = np.random.default_rng(1)
    toks = rng.integers(0, cfg.vocab_size, (4, 17)).astype(np.int32)
    mask = (rng.random((4, 16)) < np.array([[0.9], [0.3], [0.6], [1.0]])).astype(np.float32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((4, 16), np.int32),
             "loss_mask": mask}
    graphdef, _ = step_lib.abstract_model(cfg)
    state = step_lib.init_state(cfg, tx, seed=0)

    def run(**kw):
        fn = jax.jit(step_lib.make_train_step(graphdef, tx, sched, aux_loss_coef=0.0, z_loss_coef=1e-4,
                                              loss_chunk_size=16, head_dtype="float32", **kw))
        _, m = fn(state, batch)
        return float(m["loss"]), float(m["tokens"]), float(m["grad_norm"])

    loss, tokens, gnorm = run()
    l2, t2, g2 = run(microbatches=2)
    assert tokens == t2 == mask.sum()
    np.testing.assert_allclose([l2, g2], [loss, gnorm], rtol=1e-5)
    with pytest.raises(ValueError, match="microbatches = 3 must divide the batch size 4"):
        run(microbatches=3)


def test_cast_params_once_keeps_the_router_and_a_float32_head():
    from m1_jax.train import step as step_lib

    cfg = ModelConfig.preset("tiny", num_hidden_layers=1, layer_types=("full_attention",))
    _, params = step_lib.abstract_model(cfg)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    for keep_head in (True, False):
        cast = step_lib.cast_params_once(params, "bfloat16", keep_head=keep_head)
        moe = cast["blocks"]["layers"][0]["block_sparse_moe"]
        assert moe["gate"].value.dtype == jnp.float32 and moe["w1"].value.dtype == jnp.bfloat16
        assert cast["embed_tokens"].value.dtype == jnp.bfloat16
        assert cast["lm_head"].value.dtype == (jnp.float32 if keep_head else jnp.bfloat16)
