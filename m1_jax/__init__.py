"""m1-jax: MiniMax-Text-01 / MiniMax-M1 in JAX and Flax NNX."""

from m1_jax.config import ConfigError, ModelConfig
from m1_jax.inference import cache_bytes, generate, generate_stream
from m1_jax.model import MiniMaxForCausalLM

__all__ = ["ConfigError", "MiniMaxForCausalLM", "ModelConfig", "cache_bytes", "generate", "generate_stream",
           "load_hf_checkpoint", "save_hf_checkpoint"]


def __getattr__(name):
    # Conversion pulls in safetensors; import it only when asked for.
    if name in ("load_hf_checkpoint", "save_hf_checkpoint"):
        from m1_jax import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'm1_jax' has no attribute {name!r}")
