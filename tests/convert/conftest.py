import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def tiny_hf_config(**overrides):
    from transformers import MiniMaxConfig

    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
              layer_types=["linear_attention", "full_attention"] * 2, block_size=8, max_position_embeddings=512,
              full_attn_alpha_factor=1.7, linear_attn_alpha_factor=1.7, mlp_alpha_factor=1.7)
    kw.update(overrides)
    return MiniMaxConfig(**kw)


def tiny_hf_model(dtype=None, seed=0, **overrides):
    import torch
    from transformers import MiniMaxForCausalLM

    torch.manual_seed(seed)
    model = MiniMaxForCausalLM(tiny_hf_config(**overrides)).eval()
    with torch.no_grad():  # norms are ones at init: make them random so a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    return model


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """``(torch model, folder)`` of a tiny random float32 transformers MiniMax saved with save_pretrained."""
    model = tiny_hf_model()
    path = str(tmp_path_factory.mktemp("tiny_hf") / "ckpt")
    model.save_pretrained(path)
    return model, path


@pytest.fixture
def hf_copy(tiny_hf, tmp_path):
    """A private copy of the tiny checkpoint folder, free to break."""
    import shutil

    dst = str(tmp_path / "hf")
    shutil.copytree(tiny_hf[1], dst)
    return dst
