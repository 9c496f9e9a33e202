"""HF <-> ours <-> Orbax round trips on a tiny random transformers MiniMax (nothing downloaded)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from convert_helpers import assert_same_tensors, read_all, tiny_hf_model

import m1_jax
from m1_jax.convert import orbax_io

IDS = np.random.RandomState(0).randint(0, 97, (2, 19))


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


@nnx.jit
def _forward(model, ids):
    return model(ids)


def our_logits(model):
    return np.asarray(_forward(model, jnp.asarray(IDS, jnp.int32)))


def test_hf_to_ours_to_hf_float32(tiny_hf, tmp_path):
    from transformers import MiniMaxForCausalLM

    hf, path = tiny_hf
    config, model = m1_jax.load_hf_checkpoint(path)
    assert config.rotary_dim == config.head_dim == 16  # built-in config: full-head rope
    ref = torch_logits(hf)
    np.testing.assert_allclose(our_logits(model), ref, atol=2e-5, rtol=0)
    assert model.blocks.layers[0].block_sparse_moe.gate.get_value().dtype == jnp.float32

    out = str(tmp_path / "out")
    m1_jax.save_hf_checkpoint(model, config, out, max_shard_size="40KB")
    names = sorted(os.listdir(out))
    assert "config.json" in names and "config.original.json" in names and "model.safetensors.index.json" in names
    assert sum(n.endswith(".safetensors") for n in names) > 5  # really sharded
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == {n for n in names if n.endswith(".safetensors")}

    hf2 = MiniMaxForCausalLM.from_pretrained(out).eval()
    sd1, sd2 = hf.state_dict(), hf2.state_dict()
    assert set(sd1) == set(sd2)
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k  # identical, derived buffers recomputed identically
    np.testing.assert_array_equal(torch_logits(hf2), ref)


def test_original_config_is_read_back(tiny_hf, tmp_path):
    """config.original.json (remote-code form) describes the same model as config.json."""
    config, model = m1_jax.load_hf_checkpoint(tiny_hf[1])
    out = str(tmp_path / "out")
    m1_jax.save_hf_checkpoint(model, config, out)
    os.replace(os.path.join(out, "config.original.json"), os.path.join(out, "config.json"))
    config2, _ = m1_jax.load_hf_checkpoint(out)
    assert config2 == config


def test_hf_orbax_hf_bit_exact_float32(tiny_hf, tmp_path, caplog):
    from orbax.checkpoint import type_handlers

    _, path = tiny_hf
    numpy_handler = type_handlers.get_type_handler(np.ndarray)
    with caplog.at_level("WARNING"):
        orbax_io.hf_to_orbax(path, str(tmp_path / "ob"))
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text  # no absl registry noise
    assert type_handlers.get_type_handler(np.ndarray) is numpy_handler  # Orbax's global registry untouched
    orbax_io.orbax_to_hf(str(tmp_path / "ob"), str(tmp_path / "hf"), max_shard_size="100KB")
    assert_same_tensors(read_all(path), read_all(str(tmp_path / "hf")), skip=("_decay", "slope_rate"))
    # and the streamed Orbax checkpoint restores as a model equal to the directly loaded one
    _, direct = m1_jax.load_hf_checkpoint(path)
    _, restored = orbax_io.restore_orbax(str(tmp_path / "ob"))
    np.testing.assert_array_equal(our_logits(restored), our_logits(direct))


def test_bf16_stays_bf16(tmp_path):
    from transformers import MiniMaxForCausalLM

    hf = tiny_hf_model(dtype=torch.bfloat16, seed=1)
    src = str(tmp_path / "src")
    hf.save_pretrained(src)
    source = read_all(src)
    assert source["model.layers.0.block_sparse_moe.gate.weight"].dtype.name == "bfloat16"

    config, model = m1_jax.load_hf_checkpoint(src)
    assert config.param_dtype == "bfloat16"
    moe = model.blocks.layers[0].block_sparse_moe
    assert moe.w1.get_value().dtype == jnp.bfloat16 and moe.gate.get_value().dtype == jnp.float32

    # HF -> Orbax -> HF: bit-exact, the router back in the source's dtype
    orbax_io.hf_to_orbax(src, str(tmp_path / "ob"))
    orbax_io.orbax_to_hf(str(tmp_path / "ob"), str(tmp_path / "hf"))
    assert_same_tensors(source, read_all(str(tmp_path / "hf")), skip=("_decay", "slope_rate"))
    assert json.load(open(tmp_path / "hf" / "config.json"))["torch_dtype"] == "bfloat16"

    # ours -> HF: bf16 weights, float32 router (the released checkpoints' layout) unless asked otherwise
    m1_jax.save_hf_checkpoint(model, config, str(tmp_path / "hf2"))
    out = read_all(str(tmp_path / "hf2"))
    assert out["model.layers.1.self_attn.q_proj.weight"].dtype.name == "bfloat16"
    assert out["model.layers.1.block_sparse_moe.gate.weight"].dtype == np.float32
    hf2 = MiniMaxForCausalLM.from_pretrained(str(tmp_path / "hf2"), dtype=torch.bfloat16).eval()
    sd1, sd2 = hf.state_dict(), hf2.state_dict()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k


def test_transformers5_fused_names(tiny_hf, tmp_path):
    """A state dict saved under transformers-5 in-memory names (mlp.gate, experts.gate_up_proj/down_proj)."""
    from safetensors.torch import save_file

    hf, path = tiny_hf
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd
    src = tmp_path / "fused"
    src.mkdir()
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    _, model = m1_jax.load_hf_checkpoint(str(src))
    _, ref = m1_jax.load_hf_checkpoint(path)
    np.testing.assert_array_equal(our_logits(model), our_logits(ref))


def test_save_restore_orbax_and_dtype_override(tiny_hf, tmp_path):
    config, model = m1_jax.load_hf_checkpoint(tiny_hf[1])
    m1_jax.convert.save_orbax(model, config, str(tmp_path / "ob"))
    config2, model2 = m1_jax.convert.restore_orbax(str(tmp_path / "ob"))
    assert config2 == config
    np.testing.assert_array_equal(our_logits(model2), our_logits(model))
    config3, model3 = m1_jax.convert.restore_orbax(str(tmp_path / "ob"), dtype="bfloat16")
    assert model3.embed_tokens.get_value().dtype == jnp.bfloat16
    assert model3.blocks.layers[0].block_sparse_moe.gate.get_value().dtype == jnp.float32


@pytest.mark.parametrize("rotary_dim", [8])
def test_partial_rotary_dim_survives(tiny_hf, tmp_path, rotary_dim):
    """rotary_dim is ignored by transformers but kept by us: it goes to both config files."""
    config, model = m1_jax.load_hf_checkpoint(tiny_hf[1])
    config = config.replace(rotary_dim=rotary_dim)
    model.config = config
    out = str(tmp_path / "out")
    m1_jax.save_hf_checkpoint(model, config, out)
    assert json.load(open(os.path.join(out, "config.json")))["rotary_dim"] == rotary_dim
    assert json.load(open(os.path.join(out, "config.original.json")))["rotary_dim"] == rotary_dim
    assert m1_jax.load_hf_checkpoint(out)[0].rotary_dim == rotary_dim
