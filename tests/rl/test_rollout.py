"""Rollout rows: the trainer's float32 log-probabilities of the update rows equal the sampler's (the rows
put every token where the sampler saw it); the masks cover exactly the response (and the warm-up's answer);
prompt and stop-token errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1_jax import MiniMaxForCausalLM, ModelConfig
from m1_jax.config import ConfigError
from m1_jax.data.tokenizer import ByteTokenizer
from m1_jax.rl.logprobs import policy_logprobs
from m1_jax.rl.rollout import encode_prompts, rollout, stop_token_ids, supervised_rows, update_rows
from m1_jax.rl.tasks import Example, Task


def _jit_model(cfg, seed):
    """The model built under jit (eager construction is slow on a loaded CPU)."""
    from m1_jax.model import abstract_model

    graphdef, _ = abstract_model(cfg, seed)
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(seed)), nnx.Param))())


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.preset("tiny", num_hidden_layers=2, layer_types=("linear_attention", "full_attention"),
                             block_size=4, moe_impl="dense")
    return _jit_model(cfg, 0)


def test_update_rows_reproduce_the_sampler_logprobs(model):
    tok = ByteTokenizer()
    examples = [Example("1+2=", "3"), Example("count 4:14434=", "3"), Example("99*9=", "891")]
    r = rollout(model, tok, examples, group_size=2, max_prompt_len=14, max_response_len=9, temperature=1.0, seed=4,
                stop_tokens=stop_token_ids(tok, "\n"))
    assert r.tokens.shape == (6, 9) and [ex.prompt for ex in r.examples][:2] == ["1+2=", "1+2="]
    assert (r.lengths >= 1).all() and (r.lengths <= 9).all()
    rows = update_rows(r, 14 + 9)
    logp, _, _ = policy_logprobs(model, jnp.asarray(rows["inputs"]), jnp.asarray(rows["targets"]), chunk_size=16)
    m = rows["mask"] > 0
    assert m.sum() == r.lengths.sum()
    np.testing.assert_allclose(np.asarray(logp)[m], rows["old_logp"][m], atol=2e-5)
    assert np.all(rows["old_logp"][~m] == 0)
    for i in range(6):  # the masked targets are the response tokens, in order
        np.testing.assert_array_equal(rows["targets"][i][m[i]], r.tokens[i, :r.lengths[i]])
        assert r.responses[i] == tok.decode(r.tokens[i, :r.lengths[i] - int(r.stopped[i])])


def test_supervised_rows_mask_the_answer_and_stop():
    tok = ByteTokenizer()
    b = supervised_rows(tok, [Example("12+5=", "17"), Example("copy 3=", "3")], 10, 12)
    assert b["inputs"].shape == (2, 12)
    for i, (p, a) in enumerate((("12+5=", "17"), ("copy 3=", "3"))):
        sel = b["loss_mask"][i] > 0
        assert bytes(b["targets"][i][sel].tolist()) == (a + "\n").encode()
        np.testing.assert_array_equal(b["inputs"][i][:len(p)], tok.encode(p))
        assert b["segment_ids"][i].sum() == len(p) + len(a)
    with pytest.raises(ValueError, match="more than RLConfig.max_prompt_len"):
        supervised_rows(tok, [Example("1234567890+1=", "1234567891")], 10, 12)


def test_prompt_and_stop_errors():
    tok = ByteTokenizer()
    ids, lengths = encode_prompts(tok, ["ab", "abcd"], 5)
    np.testing.assert_array_equal(ids, [[0, 0, 0, 97, 98], [0, 97, 98, 99, 100]])
    assert list(lengths) == [2, 4]
    with pytest.raises(ValueError, match="RLConfig.max_prompt_len = 3"):
        encode_prompts(tok, ["abcd"], 3)
    assert stop_token_ids(tok, "\n") == (10,)
    with pytest.raises(ConfigError, match="RLConfig.stop_text"):
        stop_token_ids(tok, "END")
    held, _ = Task("copying", 2).split(4, 0)
    assert len(held) == 4
