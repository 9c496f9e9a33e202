"""A synthetic multi-file M1-shaped checkpoint converts both ways with bounded host memory."""

import json
import os
import subprocess
import sys

import pytest
from convert_helpers import assert_same_tensors, read_all
from convert_synthetic import mid_config, write_synthetic_hf

from m1_jax.config import m1_layer_types

HERE = os.path.dirname(os.path.abspath(__file__))

# Runs one conversion in a fresh process and prints its resident-memory high-water mark before (after
# the imports) and after the conversion. It reads VmHWM from /proc rather than ru_maxrss: Linux carries
# ru_maxrss across fork + exec, so a child's ru_maxrss starts at its parent's (the pytest process).
# Writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS, so the peak is the conversion's.
PROBE = r"""
import json, sys
from m1_jax.convert import orbax_io
direction, src, dst = sys.argv[1:4]

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

import jax.numpy as jnp, tensorstore
jnp.zeros(1).block_until_ready()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmHWM")
if direction == "hf-to-orbax":
    orbax_io.hf_to_orbax(src, dst)
else:
    orbax_io.orbax_to_hf(src, dst, max_shard_size="24MB")
print(json.dumps({"base": base, "peak": status("VmHWM")}))
"""


def convert(direction, src, dst):
    out = subprocess.run([sys.executable, "-c", PROBE, direction, src, dst], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_synthetic_checkpoint_streams_both_ways(tmp_path):
    config = mid_config(num_hidden_layers=24, layer_types=m1_layer_types(24))
    src, ob, dst = str(tmp_path / "hf"), str(tmp_path / "ob"), str(tmp_path / "back")
    size = write_synthetic_hf(config, src, max_shard_size="24MB")
    n_files = sum(f.endswith(".safetensors") for f in os.listdir(src))
    largest = 2 * config.vocab_size * config.hidden_size  # the bf16 embedding / lm_head
    assert size > 300e6 and n_files >= 12

    to_orbax = convert("hf-to-orbax", src, ob)
    to_hf = convert("orbax-to-hf", ob, dst)
    report = {name: {"peak_MB": r["peak"] / 1e6, "conversion_MB": (r["peak"] - r["base"]) / 1e6}
              for name, r in (("hf-to-orbax", to_orbax), ("orbax-to-hf", to_hf))}
    print(f"\ncheckpoint {size / 1e6:.0f} MB in {n_files} files, largest tensor {largest / 1e6:.1f} MB: {report}")
    for r in (to_orbax, to_hf):
        grown = r["peak"] - r["base"]
        # the conversion's own memory: a few tensors, tensorstore's 100 MB OCDBT node cache and the
        # abstract model; never the checkpoint
        assert grown < 0.25 * size, report
    assert_same_tensors(read_all(src), read_all(dst))
    assert json.load(open(os.path.join(dst, "config.json")))["torch_dtype"] == "bfloat16"
