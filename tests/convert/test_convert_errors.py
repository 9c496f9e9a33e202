"""Every way a checkpoint can be wrong gives an error that names the file and tensor."""

import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import m1_jax
from convert_helpers import assert_same_tensors, read_all
from m1_jax.convert import CheckpointError, orbax_io, plan_import
from m1_jax.convert.hf_export import write_hf_folder
from m1_jax.convert.safetensors_io import read_header

EXPERT = "model.layers.1.block_sparse_moe.experts.2.w1.weight"


def rewrite(folder, fn):
    """Apply ``fn(tensors) -> tensors`` to the single model.safetensors of ``folder``."""
    file = os.path.join(folder, "model.safetensors")
    tensors = fn(load_file(file))
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def edit_config(folder, **changes):
    p = os.path.join(folder, "config.json")
    cfg = json.load(open(p))
    cfg.update(changes)
    json.dump(cfg, open(p, "w"))


def expect(folder, *fragments):
    with pytest.raises(CheckpointError) as e:
        plan_import(folder)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, msg
    return msg


def test_missing_tensor(hf_copy):
    rewrite(hf_copy, lambda t: {k: v for k, v in t.items() if k != EXPERT})
    expect(hf_copy, "missing tensor", repr(EXPERT))


def test_unexpected_tensor(hf_copy):
    rewrite(hf_copy, lambda t: {**t, "model.layers.0.mystery.weight": np.zeros(3, np.float32)})
    expect(hf_copy, "model.safetensors", "unexpected tensor 'model.layers.0.mystery.weight'")


def test_wrong_shape(hf_copy):
    rewrite(hf_copy, lambda t: {**t, EXPERT: np.zeros((31, 64), np.float32)})
    expect(hf_copy, repr(EXPERT), "has shape (31, 64); expected (32, 64)", "intermediate_size=32")


def test_wrong_dtype(hf_copy):
    rewrite(hf_copy, lambda t: {**t, EXPERT: t[EXPERT].astype(np.float16)})
    expect(hf_copy, repr(EXPERT), "has dtype F16; expected F32", "torch_dtype = float32")


def test_non_float_dtype(hf_copy):
    rewrite(hf_copy, lambda t: {**t, EXPERT: t[EXPERT].astype(np.int32)})
    expect(hf_copy, repr(EXPERT), "has dtype I32; expected a float dtype")


def test_config_contradicts_layer_types(hf_copy):
    edit_config(hf_copy, layer_types=["full_attention", "linear_attention"] * 2)
    expect(hf_copy, "config.json contradicts the weights", "layer 0 is 'full_attention'",
           "but the checkpoint has 'model.layers.0.self_attn.", "a 'linear_attention' (lightning) tensor")


def test_config_contradicts_num_layers(hf_copy):
    edit_config(hf_copy, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    expect(hf_copy, "config.json contradicts the weights", "num_hidden_layers = 2", "of layer 2")


def test_config_contradicts_experts(hf_copy):
    edit_config(hf_copy, num_local_experts=2)
    expect(hf_copy, "config.json contradicts the weights", "num_local_experts = 2", "of expert 2")


def test_config_contradicts_hidden_size(hf_copy):
    edit_config(hf_copy, hidden_size=32)
    expect(hf_copy, "config.json contradicts the weights", "vocab_size=97, hidden_size=32",
           "'model.embed_tokens.weight' of shape (97, 32), but it has shape (97, 64)")


def test_bad_config_value(hf_copy):
    edit_config(hf_copy, postnorm=False)
    expect(hf_copy, "config.json", "postnorm = false")


def test_truncated_file(hf_copy):
    file = os.path.join(hf_copy, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 100)
    msg = expect(hf_copy, "model.safetensors", "truncated safetensors file", "tensor ")
    assert "'lm_head.weight'" in msg or "'model." in msg


def test_truncated_header(hf_copy):
    file = os.path.join(hf_copy, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(50)
    expect(hf_copy, "model.safetensors", "truncated or corrupt safetensors file")


def test_corrupt_header(hf_copy):
    file = os.path.join(hf_copy, "model.safetensors")
    with open(file, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n // 2)
        f.write(b"\x00garbage{{")
    expect(hf_copy, "model.safetensors", "corrupt safetensors header")


def test_corrupt_offsets(hf_copy):
    file = os.path.join(hf_copy, "model.safetensors")
    infos, meta, start = read_header(file)
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        rest = f.read()
    header["lm_head.weight"]["data_offsets"][1] -= 4
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + rest)
    expect(hf_copy, "corrupt safetensors header", "'lm_head.weight'", "data_offsets")


def test_index_names_missing_file(tiny_hf, tmp_path):
    config, model = m1_jax.load_hf_checkpoint(tiny_hf[1])
    out = str(tmp_path / "sharded")
    m1_jax.save_hf_checkpoint(model, config, out, max_shard_size="100KB")
    os.remove(os.path.join(out, "model-00002-of-00008.safetensors"))
    expect(out, "1 weight file named in model.safetensors.index.json does not exist",
           "model-00002-of-00008.safetensors")


def test_index_disagrees_with_file(tiny_hf, tmp_path):
    config, model = m1_jax.load_hf_checkpoint(tiny_hf[1])
    out = str(tmp_path / "sharded")
    m1_jax.save_hf_checkpoint(model, config, out, max_shard_size="100KB")
    p = os.path.join(out, "model.safetensors.index.json")
    idx = json.load(open(p))
    idx["weight_map"]["lm_head.weight"] = "model-00001-of-00008.safetensors"
    json.dump(idx, open(p, "w"))
    expect(out, "'lm_head.weight'", "not listed for this file")


def test_no_config(hf_copy):
    os.remove(os.path.join(hf_copy, "config.json"))
    expect(hf_copy, "no config.json")


def test_failed_export_leaves_nothing(tiny_hf, tmp_path):
    config, model = m1_jax.load_hf_checkpoint(tiny_hf[1])
    calls = []

    def get(key):
        calls.append(key)
        if len(calls) == 20:
            raise CheckpointError(f"simulated failure at {key!r}")
        return np.zeros(config and m1_jax.convert.hf_key_map(config)[key].hf_shape, np.float32)

    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match="simulated failure"):
        write_hf_folder(config, get, str(dst), dtype="float32", max_shard_size="20KB")
    assert not dst.exists()
    assert os.listdir(tmp_path) == []  # no temporary folder left behind


def test_failed_hf_to_orbax_leaves_nothing(hf_copy, tmp_path):
    from m1_jax.convert import orbax_io

    rewrite(hf_copy, lambda t: {**t, EXPERT: np.zeros((31, 64), np.float32)})
    dst = tmp_path / "ob"
    with pytest.raises(CheckpointError, match="has shape"):
        orbax_io.hf_to_orbax(hf_copy, str(dst))
    assert not dst.exists()


def test_existing_destination_is_refused(tiny_hf, tmp_path):
    config, model = m1_jax.load_hf_checkpoint(tiny_hf[1])
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="already exists"):
        m1_jax.save_hf_checkpoint(model, config, str(dst))
    assert (dst / "keep.txt").exists()
    m1_jax.save_hf_checkpoint(model, config, str(dst), overwrite=True)
    assert (dst / "keep.txt").read_text() == "x" and (dst / "config.json").exists()
    (tmp_path / "a_file").write_text("y")
    with pytest.raises(CheckpointError, match="a_file: exists and is not a folder"):
        m1_jax.save_hf_checkpoint(model, config, str(tmp_path / "a_file"), overwrite=True)
    assert (tmp_path / "a_file").read_text() == "y"


def test_overwrite_replaces_only_the_converters_files(tiny_hf, tmp_path):
    """--overwrite replaces the checkpoint files and keeps every other file (a user's notes, a tokenizer)."""
    from m1_jax.convert import cli

    def user_files(dst):
        (dst / "notes.txt").write_text("my notes")
        (dst / "tokenizer").mkdir()
        (dst / "tokenizer" / "tokenizer.json").write_text("{}")
        (dst / "model-00009-of-00009.safetensors").write_bytes(b"stale shard of an older export")

    def kept(dst):
        assert (dst / "notes.txt").read_text() == "my notes"
        assert (dst / "tokenizer" / "tokenizer.json").read_text() == "{}"

    ob, hf = tmp_path / "ob", tmp_path / "hf"
    assert cli.main(["hf-to-orbax", tiny_hf[1], str(ob), "--quiet"]) == 0
    assert cli.main(["orbax-to-hf", str(ob), str(hf), "--quiet", "--max-shard-size", "100KB"]) == 0
    ref = read_all(str(hf))
    user_files(hf)
    (ob / "notes.txt").write_text("my notes")
    assert cli.main(["orbax-to-hf", str(ob), str(hf), "--quiet", "--max-shard-size", "100KB"]) == 1  # no --overwrite
    assert cli.main(["orbax-to-hf", str(ob), str(hf), "--quiet", "--overwrite"]) == 0
    kept(hf)
    assert not (hf / "model-00009-of-00009.safetensors").exists()  # the converter's own (stale) file is replaced
    assert_same_tensors(ref, read_all(str(hf)))
    assert cli.main(["hf-to-orbax", tiny_hf[1], str(ob), "--quiet", "--overwrite"]) == 0
    assert (ob / "notes.txt").read_text() == "my notes"
    assert orbax_io.check_orbax(str(ob))[0] == m1_jax.load_hf_checkpoint(tiny_hf[1])[0]
    assert sorted(os.listdir(tmp_path)) == ["hf", "ob"]  # no temporary folder left behind


def test_orbax_checkpoint_errors(tiny_hf, tmp_path):
    from m1_jax.convert import orbax_io

    with pytest.raises(CheckpointError, match="not an Orbax checkpoint"):
        orbax_io.restore_orbax(str(tmp_path))
    config, model = m1_jax.load_hf_checkpoint(tiny_hf[1])
    orbax_io.save_orbax(model, config, str(tmp_path / "ob"))
    meta_file = tmp_path / "ob" / "_METADATA"
    meta = json.loads(meta_file.read_text())
    meta["custom_metadata"]["m1_jax"]["config"]["num_local_experts"] = 8
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"parameter 'blocks\.layers\.\d\.block_sparse_moe\.\w+' has shape "
                                              r"\(2, [46][^)]*\); expected \(2, [68][^)]*\)"):
        orbax_io.orbax_to_hf(str(tmp_path / "ob"), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_error_during_streamed_write_leaves_nothing(tiny_hf, tmp_path, monkeypatch):
    """A read failure in the middle of hf_to_orbax's background writes propagates and cleans up."""
    from m1_jax.convert import hf_import, orbax_io

    orig = hf_import.SourceReader.hf
    count = [0]

    def failing(self, key):
        count[0] += 1
        if count[0] == 30:
            raise CheckpointError(f"simulated read failure at {key!r}")
        return orig(self, key)

    monkeypatch.setattr(hf_import.SourceReader, "hf", failing)
    with pytest.raises(CheckpointError, match="simulated read failure at 'model.layers"):
        orbax_io.hf_to_orbax(tiny_hf[1], str(tmp_path / "ob"))
    assert os.listdir(tmp_path) == []
