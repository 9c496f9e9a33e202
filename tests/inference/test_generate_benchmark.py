"""benchmarks/generate.py on its CPU smoke setting (tiny models): every row it reports is there, the floor's
bytes follow their formula, and the table names caches that do not fit instead of calling them failures.
It checks no timing: a broken benchmark wastes a GPU session, a slow CPU proves nothing."""

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, os.path.abspath(BENCH))

import generate as bench  # noqa: E402

from m1_jax import cache_bytes  # noqa: E402
from m1_jax.config import LINEAR  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    code = bench.main(["--quick", "--no-check", "--models", "hybrid,twin", "--batches", "1,2", "--contexts", "64",
                       "--breakdown", "--twin-cache-gib", "1e-9", "--moe-impl", "gmm", "--out", str(out)])
    assert code == 0
    with open(out / "generate.json") as f:
        return json.load(f), out


def test_rows_of_every_kind(result):
    data, out = result
    rows = data["rows"]
    hybrid = [r for r in rows if r["kind"] == "decode" and r["model"] == "hybrid"]
    assert {r["batch"] for r in hybrid} == {1, 2}
    for r in hybrid:
        assert r["ms_per_token"] > 0 and r["floor_ms"] > 0 and len(r["times_ms"]) >= 2
    prefill = [r for r in rows if r["kind"] == "prefill" and r["model"] == "hybrid"]
    assert prefill and all(r["tokens_per_s"] > 0 for r in prefill)
    # batch 1 is a decode shape of the MoE: both expert products are timed beside the model's own call
    b1 = next(r for r in rows if r["kind"] == "breakdown" and r["batch"] == 1)
    for key in ("moe_all_layers_ms", "moe_all_layers_grouped_ms", "moe_all_layers_batched_ms", "moe_all_layers_dense_ms",
                "moe_all_layers_concat_ms", "moe_all_layers_dense_concat_ms", "moe_all_layers_fused_ms",
                "moe_all_layers_fused_gathered_ms", "norm_lm_head_argmax_ms"):
        assert isinstance(b1[key], float) and b1[key] > 0, (key, b1)
    b2 = next(r for r in rows if r["kind"] == "breakdown" and r["batch"] == 2)  # not a decode shape: no products
    assert "moe_all_layers_dense_ms" in b2 and "moe_all_layers_batched_ms" not in b2
    assert data["meta"]["command"].endswith("--out " + str(out)) and data["meta"]["moe_impl"] == "gmm"
    # the twin's cache is above --twin-cache-gib: reported as not run, and the table says so
    twin = [r for r in rows if r["kind"] == "decode" and r["model"] == "twin"]
    assert twin and all(r["error"].startswith("not run: KV cache") for r in twin)
    table = bench.table(rows)
    assert "not run: KV cache" in table and "fails" not in table
    assert os.path.exists(out / "generate.png")


def test_floor_bytes_follow_their_formula():
    """The floor's KV-cache and state bytes against ``m1_jax.cache_bytes`` (the cache the engine allocates:
    the states are read and written once per step, the KV cache read once)."""
    c = bench.configs(True)["hybrid"]
    B, S = 3, 1000
    fb = bench.floor_bytes(c, B, S)
    n_lin = sum(t == LINEAR for t in c.layer_types)
    states = n_lin * B * c.num_attention_heads * c.head_dim * c.head_dim * 4
    assert fb["states"] == 2 * states
    assert fb["kv_cache"] == cache_bytes(c, S, B) - states
    assert fb["total"] == pytest.approx(sum(v for k, v in fb.items() if k != "total"))
    assert bench.floor_bytes(c, B, 2 * S)["total"] - fb["total"] == pytest.approx(cache_bytes(c, S, B) - states)


def test_floor_reads_cast_weights_in_the_compute_dtype():
    """float32 parameters with bfloat16 compute: the engine casts the weights once (the floor reads them in
    bfloat16) except the float32 LM head; without the cast every weight is read in float32."""
    c = bench.configs(True, param_dtype="float32")["hybrid"].replace(dtype="bfloat16")
    cast, plain = bench.floor_bytes(c, 2, 100), bench.floor_bytes(c, 2, 100, cast_weights=False)
    assert cast["experts"] * 2 == plain["experts"] and cast["attention_weights"] * 2 == plain["attention_weights"]
    assert cast["lm_head"] == plain["lm_head"] == c.vocab_size * c.hidden_size * 4
