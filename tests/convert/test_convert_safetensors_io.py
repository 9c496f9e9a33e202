"""The streaming safetensors writer and reader against the safetensors library."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open

from m1_jax.convert import CheckpointError
from m1_jax.convert.safetensors_io import SafetensorsFolder, ShardedWriter, TensorReader, parse_size


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("40KB") == 40_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


def test_writer_round_trip_through_safetensors(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5), np.float32),
               "b": rng.standard_normal((7,), np.float32).astype(ml_dtypes.bfloat16),
               "c": rng.standard_normal((4, 4), np.float32).astype(np.float16)}
    entries = [(k, v.shape, {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[v.dtype.name])
               for k, v in tensors.items()]
    (tmp_path / "config.json").write_text("{}")
    w = ShardedWriter(str(tmp_path), entries, max_shard_size=40)  # every tensor in its own file
    with pytest.raises(CheckpointError, match="expected 'a' next"):
        w.write("b", tensors["b"])
    with pytest.raises(CheckpointError, match=r"shape \(5, 3\), expected \(3, 5\)"):
        w.write("a", tensors["a"].T)
    with pytest.raises(CheckpointError, match="dtype F16, expected F32"):
        w.write("a", tensors["a"].astype(np.float16))
    w.write("a", tensors["a"])
    with pytest.raises(CheckpointError, match="only 1 of 3 tensors were written; next missing: 'b'"):
        w.finish()
    w.write("b", tensors["b"])
    w.write("c", tensors["c"])
    w.finish()
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert index["weight_map"] == {"a": "model-00001-of-00003.safetensors", "b": "model-00002-of-00003.safetensors",
                                   "c": "model-00003-of-00003.safetensors"}
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    for key, file in index["weight_map"].items():  # the library reads what we wrote
        with safe_open(os.path.join(tmp_path, file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            got = f.get_tensor(key)
            want = torch.from_numpy(tensors[key].view(np.int16)).view(torch.bfloat16) if key == "b" \
                else torch.from_numpy(tensors[key])
            assert torch.equal(got, want)
    folder = SafetensorsFolder(str(tmp_path))
    with TensorReader(folder) as r:
        for k, v in tensors.items():
            got = r.read(k)
            assert got.dtype == v.dtype and np.array_equal(got.view(np.uint8), v.view(np.uint8))
