"""The generation engine (chunked prefill, the on-device decode loop, sampling, cache sizes).

The model's own forward does all the work (``model(ids, cache=...)``; layers own their caches, see
``m1_jax.model.cache``); this package only drives it. See docs/inference.md.
"""

from m1_jax.inference.compiled import compile_stats
from m1_jax.inference.engine import Session, StreamChunk, generate, generate_stream
from m1_jax.inference.sampling import SamplingMode, sample_token
from m1_jax.inference.sizes import cache_bytes, default_prefill_chunk, prompt_bucket, slots_bucket

__all__ = ["SamplingMode", "Session", "StreamChunk", "cache_bytes", "compile_stats", "default_prefill_chunk",
           "generate", "generate_stream", "prompt_bucket", "sample_token", "slots_bucket"]
