"""A packed row gives the same per-document logits as each document run alone; the train step's speed
options (gradient accumulation, casting the parameters once) compute the same step."""

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


def test_microbatches_and_cast_once_give_the_plain_step():
    """The train step's speed options compute the same update: gradient accumulation over 2
    microbatches (uneven loss masks: the token-weighted mean), and the parameter tree cast to bf16 once
    per step instead of at every use."""
    from m1_jax.train import step as step_lib
    from m1_jax.train.optimizer import OptimizerConfig, make_optimizer

    cfg = ModelConfig.preset("tiny", num_hidden_layers=1, layer_types=("full_attention",), dtype="bfloat16")
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
    assert tokens == mask.sum()
    for kw, tol in ((dict(microbatches=2), 1e-4), (dict(cast_params="bfloat16"), 1e-2)):
        l2, t2, g2 = run(**kw)
        assert t2 == tokens and abs(l2 - loss) <= tol * abs(loss), (kw, l2, loss)
        assert abs(g2 - gnorm) <= 10 * tol * gnorm, (kw, g2, gnorm)
    with pytest.raises(ValueError, match="microbatches = 3 must divide the batch size 4"):
        run(microbatches=3)
