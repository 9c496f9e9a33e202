"""A synthetic multi-file M1-shaped checkpoint converts both ways holding about one tensor at a time.

What is measured is the converter's own allocations (``tracemalloc``: every Python object and every
numpy buffer it creates) and the bytes of the slices its Orbax reader returned and that are still
referenced (tensorstore allocates those, so tracemalloc cannot see them), not the process's resident
memory: machine load, the allocator and other threads cannot move it. Tensorstore's internal buffers
are bounded by its configuration (the OCDBT node cache, see ``orbax_io._write_context``).
"""

import json
import math
import os
import tracemalloc

import pytest
from convert_helpers import assert_same_tensors, read_all
from convert_synthetic import mid_config, write_synthetic_hf

from m1_jax.config import m1_layer_types
from m1_jax.convert import orbax_io
from m1_jax.convert.hf_export import hf_entries
from m1_jax.convert.hf_import import leaf_entries, plan_import
from m1_jax.model import abstract_model


def traced_peak(fn, *args, **kwargs) -> int:
    """Bytes ``fn`` allocated at its peak, above what was allocated when it started."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_synthetic_checkpoint_streams_both_ways(tmp_path):
    # First a tiny conversion both ways, so that the lazy imports (orbax, tensorstore) and the caches
    # built on first use are not counted as the conversion's memory.
    tiny = mid_config(num_hidden_layers=8, layer_types=m1_layer_types(8), vocab_size=64, hidden_size=32,
                      intermediate_size=32, num_attention_heads=2, head_dim=16, rotary_dim=8)
    write_synthetic_hf(tiny, str(tmp_path / "tiny"))
    orbax_io.hf_to_orbax(str(tmp_path / "tiny"), str(tmp_path / "tiny_ob"))
    orbax_io.orbax_to_hf(str(tmp_path / "tiny_ob"), str(tmp_path / "tiny_back"))

    # 16 layers (two scanned blocks: a stacked expert leaf holds 16 HF tensors), bf16, 8 MB files.
    config = mid_config(num_hidden_layers=16, layer_types=m1_layer_types(16), vocab_size=512, hidden_size=256,
                        intermediate_size=512)
    src, ob, dst = str(tmp_path / "hf"), str(tmp_path / "ob"), str(tmp_path / "back")
    size = write_synthetic_hf(config, src, max_shard_size="8MB")
    n_files = sum(f.endswith(".safetensors") for f in os.listdir(src))
    entries = hf_entries(config, "bfloat16", "float32")
    largest = max(math.prod(shape) * (4 if st == "F32" else 2) for _, shape, st in entries)  # 0.4 MB: qkv_proj
    stacked_leaf = 2 * 2 * config.num_local_experts * config.hidden_size * config.intermediate_size  # 4.2 MB
    assert size > 100e6 and n_files >= 12

    # The bookkeeping every conversion of this checkpoint needs (parsed headers, the key table, the
    # abstract model): a few KB a tensor, however large the tensors are. Once untraced first: tracing
    # caches (eval_shape of this config) are filled on first use and would count for whoever comes first.
    def bookkeep():
        plan = plan_import(src)
        return abstract_model(plan.config), leaf_entries(plan)

    bookkeep()
    bookkeeping = traced_peak(bookkeep)
    readers = []  # orbax-to-hf's reader: tensorstore allocates what it reads, so the reader counts it

    class CountedReader(orbax_io.OrbaxLeafReader):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            readers.append(self)

    peaks = {"hf-to-orbax": traced_peak(orbax_io.hf_to_orbax, src, ob)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(orbax_io, "OrbaxLeafReader", CountedReader)
        peaks["orbax-to-hf"] = traced_peak(orbax_io.orbax_to_hf, ob, dst, max_shard_size="8MB")
    (reader,) = readers
    assert 0 < reader.peak_live_bytes <= 2 * largest, (reader.peak_live_bytes, largest)  # one tensor (+ the last)
    assert reader.live_bytes == 0
    print(f"\ncheckpoint {size / 1e6:.0f} MB in {n_files} files, largest tensor {largest / 1e6:.2f} MB, "
          f"bookkeeping {bookkeeping / 1e6:.2f} MB, converter peak: "
          + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in peaks.items())
          + f", orbax-to-hf reads held at most {reader.peak_live_bytes / 1e6:.2f} MB")
    # Beyond that, hf-to-orbax holds up to orbax_io._WRITES_IN_FLIGHT (4) slices in flight plus the one
    # being read; orbax-to-hf one tensor and its converted copy. Neither may hold a whole stacked leaf,
    # let alone the checkpoint.
    limit = (4 + 2) * largest
    assert limit < stacked_leaf < 0.05 * size
    for name, peak in peaks.items():
        assert peak - bookkeeping < limit, (name, peak, bookkeeping, limit)
    assert_same_tensors(read_all(src), read_all(dst))
    assert json.load(open(os.path.join(dst, "config.json")))["torch_dtype"] == "bfloat16"
