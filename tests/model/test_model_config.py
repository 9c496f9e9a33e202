import pytest

from m1_jax import ConfigError, ModelConfig
from m1_jax.config import FULL, LINEAR, m1_layer_types


def test_m1_80k_parameter_counts():
    n = ModelConfig.preset("m1-80k").num_params()
    assert n["total"] == 456_089_655_296  # shapes of the released checkpoint (8,243 tensors)
    assert abs(n["active"] / 1e9 - 45.9) < 0.05


def test_presets_share_the_m1_architecture():
    a, b, c = (ModelConfig.preset(n) for n in ("m1-80k", "m1-40k", "text-01"))
    assert a == b == c
    assert a.layer_period == 8 and a.num_blocks == 10
    assert [i for i, t in enumerate(a.layer_types) if t == FULL] == list(range(7, 80, 8))
    small = ModelConfig.preset("small")
    assert 0.3e9 < small.num_params()["total"] < 1.2e9
    assert ModelConfig.preset("tiny").layer_period == 8


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'm1-100k'.*m1-80k"):
        ModelConfig.preset("m1-100k")


@pytest.mark.parametrize("changes, field, expected", [
    (dict(num_key_value_heads=3), "num_key_value_heads", "divisor of num_attention_heads"),
    (dict(num_hidden_layers=6), "layer_types", "one entry per layer"),
    (dict(rotary_dim=7), "rotary_dim", "even integer"),
    (dict(rotary_dim=18), "rotary_dim", "head_dim = 16"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok", "at most num_local_experts"),
    (dict(dtype="float8"), "dtype", "one of"),
    (dict(hidden_size=0), "hidden_size", "positive integer"),
    (dict(layer_types=(LINEAR,) * 7 + ("mamba",)), "layer_types", "entries from"),
    (dict(remat="sometimes"), "remat", "one of"),
    (dict(moe_decode="loop"), "moe_decode", "one of"),
])
def test_bad_configs_name_field_and_expectation(changes, field, expected):
    with pytest.raises(ConfigError) as e:
        ModelConfig.preset("tiny", **changes)
    assert f"ModelConfig.{field}" in str(e.value) and expected in str(e.value)


def test_period_detection():
    base = ModelConfig.preset("tiny")
    assert base.replace(layer_types=(FULL, LINEAR) * 4).layer_period == 2
    assert base.replace(layer_types=(FULL,) + (LINEAR,) * 7).layer_period == 8
    irregular = (LINEAR, FULL, FULL, LINEAR, LINEAR, LINEAR, FULL, LINEAR)
    assert base.replace(layer_types=irregular).layer_period == 8
    c = base.replace(num_hidden_layers=16, layer_types=m1_layer_types(16))
    assert (c.layer_period, c.num_blocks) == (8, 2)


def _original_config():
    return {
        "architectures": ["MiniMaxM1ForCausalLM"], "model_type": "minimax_m1",
        "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 8, "num_attention_heads": 4,
        "head_dim": 16, "num_key_value_heads": 2, "intermediate_size": 32, "num_local_experts": 4,
        "num_experts_per_tok": 2, "rotary_dim": 8, "rope_theta": 10000000, "postnorm": True,
        "attn_type_list": [0, 0, 0, 0, 0, 0, 0, 1], "shared_intermediate_size": 0,
        "layernorm_full_attention_alpha": 3.5, "layernorm_full_attention_beta": 1.0,
        "layernorm_linear_attention_alpha": 3.4, "layernorm_linear_attention_beta": 0.9,
        "layernorm_mlp_alpha": 3.3, "layernorm_mlp_beta": 0.8, "rms_norm_eps": 1e-5,
    }


def test_from_hf_original_remote_code_config():
    c = ModelConfig.from_hf(_original_config())
    assert c.layer_types == m1_layer_types(8)
    assert (c.full_attn_alpha_factor, c.linear_attn_alpha_factor, c.mlp_alpha_factor) == (3.5, 3.4, 3.3)
    assert (c.linear_attn_beta_factor, c.mlp_beta_factor) == (0.9, 0.8)
    assert c.rotary_dim == 8 and c.rope_theta == 1e7
    assert ModelConfig.from_hf(c.to_hf_original()) == c
    assert ModelConfig.from_hf(c.to_hf()) == c


def test_from_hf_builtin_config_and_transformers_agree():
    transformers = pytest.importorskip("transformers")
    hf = transformers.MiniMaxConfig(
        vocab_size=97, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, layer_types=[LINEAR, FULL] * 2,
        full_attn_alpha_factor=1.7, linear_attn_alpha_factor=1.6, mlp_alpha_factor=1.5)
    c = ModelConfig.from_hf(hf.to_dict())
    assert c.layer_types == (LINEAR, FULL) * 2
    assert (c.full_attn_alpha_factor, c.linear_attn_alpha_factor, c.mlp_alpha_factor) == (1.7, 1.6, 1.5)
    assert c.rotary_dim == 16  # transformers rotates the whole head
    back = transformers.MiniMaxConfig(**c.to_hf())
    assert list(back.layer_types) == list(c.layer_types) and back.mlp_alpha_factor == 1.5


@pytest.mark.parametrize("key, value, message", [
    ("postnorm", False, "postnorm = false"),
    ("shared_intermediate_size", 128, "shared_intermediate_size = 128"),
    ("attn_type_list", [0, 2, 0, 0, 0, 0, 0, 1], "attn_type_list has entries"),
])
def test_from_hf_rejects_what_it_cannot_represent(key, value, message):
    cfg = _original_config()
    cfg[key] = value
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(cfg)


def test_from_hf_missing_fields():
    cfg = _original_config()
    del cfg["hidden_size"]
    with pytest.raises(ConfigError, match="missing required fields.*hidden_size"):
        ModelConfig.from_hf(cfg)
