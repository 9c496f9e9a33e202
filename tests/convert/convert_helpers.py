import glob
import os

import numpy as np

from m1_jax.convert.safetensors_io import SafetensorsFolder, TensorReader


def read_all(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors folder (tests only: small folders)."""
    folder = SafetensorsFolder(path)
    with TensorReader(folder) as r:
        return {k: r.read(k) for k in folder.tensors}


def assert_same_tensors(a: dict, b: dict, skip=()):
    ka = {k for k in a if not any(s in k for s in skip)}
    kb = {k for k in b if not any(s in k for s in skip)}
    assert ka == kb, (sorted(ka - kb)[:3], sorted(kb - ka)[:3])
    for k in ka:
        assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        assert np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), k


def files(path: str) -> list[str]:
    return sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "*")))


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
