"""Logits of tiny random transformers ``MiniMaxForCausalLM`` models against ours (float32).

transformers' built-in MiniMax rotates the whole head, so these configs leave ``rotary_dim`` unset
(our ``from_hf`` then uses ``rotary_dim = head_dim``); partial rotary is checked in test_rope.py.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from m1_jax import MiniMaxForCausalLM, load_hf_checkpoint  # noqa: E402

L, F = "linear_attention", "full_attention"

CASES = {
    # name: (layer_types, heads, kv_heads, hidden, block, batch, seq, alphas)
    "softmax_first_mha_short": ([F, L, L, L], 4, 4, 64, 8, 2, 5, (1.7, 2.1, 1.3)),
    "softmax_last_gqa2_equal": ([L, L, L, F], 4, 2, 48, 8, 3, 8, (2.5, 1.0, 0.8)),
    "alternating_gqa4_ragged": ([L, F] * 2, 4, 1, 64, 8, 2, 21, (1.7, 1.7, 1.7)),
    "m1_pattern_7_plus_1": ([L] * 7 + [F], 8, 2, 64, 16, 2, 37, (2.0, 2.2, 1.9)),
    "two_m1_blocks_scanned": (([L] * 7 + [F]) * 2, 4, 1, 32, 8, 2, 40, (2.83, 2.83, 2.83)),
}


def build_hf(layer_types, heads, kv, hidden, block, alphas, seed):
    cfg = transformers.MiniMaxConfig(
        vocab_size=101, hidden_size=hidden, intermediate_size=40, num_hidden_layers=len(layer_types),
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, layer_types=layer_types, block_size=block, rope_theta=1000.0,
        full_attn_alpha_factor=alphas[0], linear_attn_alpha_factor=alphas[1], mlp_alpha_factor=alphas[2],
        full_attn_beta_factor=0.9, linear_attn_beta_factor=1.1, mlp_beta_factor=1.0,
        max_position_embeddings=512)
    torch.manual_seed(seed)
    model = transformers.MiniMaxForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at 1 in HF; randomise them so the norm weights are exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_aux_loss_match_transformers(case, tmp_path):
    layer_types, heads, kv, hidden, block, batch, seq, alphas = CASES[case]
    hf = build_hf(layer_types, heads, kv, hidden, block, alphas, seed=len(case))
    hf.save_pretrained(tmp_path)
    config, model = load_hf_checkpoint(str(tmp_path))
    assert config.layer_types == tuple(layer_types) and config.block_size == block
    ids = np.random.default_rng(len(case)).integers(0, 101, (batch, seq))
    with torch.no_grad():
        out = hf(torch.tensor(ids), output_router_logits=True)
    ref = out.logits.numpy().astype(np.float64)
    logits, aux = model(jnp.asarray(ids, jnp.int32), return_aux=True)
    err = np.max(np.abs(np.asarray(logits, np.float64) - ref)) / np.max(np.abs(ref))
    print(f"{case}: max relative logit error {err:.2e}")
    assert logits.dtype == jnp.float32 and logits.shape == (batch, seq, 101)
    assert err < 1e-5
    assert abs(float(aux) - float(out.aux_loss)) < 1e-5 * abs(float(out.aux_loss))


def test_unscanned_remat_and_dense_moe_compute_the_same_function(tmp_path):
    layer_types, heads, kv, hidden, block, batch, seq, alphas = CASES["two_m1_blocks_scanned"]
    build_hf(layer_types, heads, kv, hidden, block, alphas, seed=0).save_pretrained(tmp_path)
    config, model = load_hf_checkpoint(str(tmp_path))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 101, (batch, seq)), jnp.int32)
    base = np.asarray(model(ids))
    params = nnx.state(model)
    for changes in (dict(scan_layers=False), dict(remat="full"), dict(moe_impl="dense")):
        other = nnx.eval_shape(lambda: MiniMaxForCausalLM(config.replace(**changes), rngs=nnx.Rngs(0)))
        nnx.update(other, params)
        np.testing.assert_allclose(np.asarray(other(ids)), base, rtol=1e-5, atol=1e-5)
