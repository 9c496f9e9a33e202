"""--dry-run: config + index (+ headers when present) against the key table, nothing read or allocated."""

import json
import math
import os

from m1_jax.config import ModelConfig
from m1_jax.convert.cli import main
from m1_jax.convert.hf_export import hf_entries
from m1_jax.convert.safetensors_io import ST_TO_NP


def fake_index(config: ModelConfig, folder, *, files: int = 413, extra: dict | None = None):
    """config.json (remote-code form) + model.safetensors.index.json naming ``files`` absent files."""
    os.makedirs(folder, exist_ok=True)
    entries = hf_entries(config, "bfloat16", "float32")
    names = [f"model-{i:05d}-of-{files:05d}.safetensors" for i in range(files)]  # released: 0-based
    per = -(-len(entries) // files)
    weight_map = {k: names[i // per] for i, (k, _, _) in enumerate(entries)}
    weight_map.update(extra or {})
    total = sum(math.prod(s) * ST_TO_NP[d].itemsize for _, s, d in entries)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        cfg = config.to_hf_original()
        cfg.pop("torch_dtype")  # as the released config.json: no torch_dtype
        json.dump(cfg, f)
    return total


def test_dry_run_m1_80k(tmp_path, capsys):
    config = ModelConfig.preset("m1-80k")
    total = fake_index(config, tmp_path)
    assert total == 912_210_767_872  # the released index's total_size
    assert main(["hf-to-orbax", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8,243 tensors map onto" in out
    assert "456,089,655,296 parameters (456.1B)" in out
    assert "80 layers (70 lightning, 10 softmax)" in out
    assert "rotary_dim 64" in out and "ignores rotary_dim" in out
    assert "index keys only" in out


def test_dry_run_reports_unexpected_key(tmp_path, capsys):
    config = ModelConfig.preset("m1-80k")
    fake_index(config, tmp_path, extra={"model.layers.80.input_layernorm.weight": "model-00412-of-00413.safetensors"})
    assert main(["hf-to-orbax", str(tmp_path), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "num_hidden_layers = 80" in err and "'model.layers.80.input_layernorm.weight'" in err


def test_dry_run_with_files_checks_headers(tiny_hf, tmp_path, capsys):
    assert main(["hf-to-orbax", tiny_hf[1], "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "79 tensors map onto 23 parameters" in out and "checked from the safetensors headers" in out
    assert "8 derived HF decay buffers will be dropped" in out


def test_cli_round_trip(tiny_hf, tmp_path, capsys):
    from convert_helpers import assert_same_tensors, read_all

    ob, hf = str(tmp_path / "ob"), str(tmp_path / "hf")
    assert main(["hf-to-orbax", tiny_hf[1], ob]) == 0
    assert main(["orbax-to-hf", ob, "--dry-run"]) == 0
    assert "79 tensors map onto 23 parameters" in capsys.readouterr().out
    assert main(["orbax-to-hf", ob, hf, "--max-shard-size", "100KB", "--quiet"]) == 0
    assert_same_tensors(read_all(tiny_hf[1]), read_all(hf), skip=("_decay", "slope_rate"))
    assert main(["orbax-to-hf", ob, hf, "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_dry_run_some_files_missing(tiny_hf, tmp_path, capsys):
    import m1_jax

    config, model = m1_jax.load_hf_checkpoint(tiny_hf[1])
    out = str(tmp_path / "sharded")
    m1_jax.save_hf_checkpoint(model, config, out, max_shard_size="100KB")
    os.remove(os.path.join(out, "model-00003-of-00008.safetensors"))
    assert main(["hf-to-orbax", out, "--dry-run"]) == 1
    assert "1 of the 8 weight files named in the index does not exist" in capsys.readouterr().err
