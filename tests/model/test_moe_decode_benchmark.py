"""benchmarks/moe_decode.py on its CPU smoke setting: every form runs on both weight placements and the
table names them. No timing is checked."""

import json
import os
import sys

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, os.path.abspath(BENCH))

import moe_decode as bench  # noqa: E402


def test_every_form_runs_flat_and_scanned(tmp_path, capsys):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "moe_decode.json") as f:
        rows = json.load(f)["rows"]
    for n in (1, 2):
        names = {name for name, _ in bench.forms(n, 2, 4)}
        assert {(r["form"], r["placement"]) for r in rows if r["tokens"] == n} == \
            {(f, p) for f in names for p in ("flat", "scanned")}
    assert all("us_per_layer" in r and r["us_per_layer"] > 0 for r in rows), [r for r in rows if "error" in r]
    assert {"fused", "fused_gathered", "batched"} <= {r["form"] for r in rows if r["tokens"] == 1}
    assert "| 1 | fused |" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "moe_decode.png")
