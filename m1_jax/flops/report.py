"""The FLOPs table, the paper-claim check and the Figure 1 (right) plot (``python -m m1_jax.flops``)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

import m1_jax.flops.model as F
from m1_jax.config import ModelConfig
from m1_jax.flops.archs import (APPROX_REL_TOL, CLAIMS, FIGURE_COEFFS, deepseek_r1, figure_flops, minimax_m1,
                                qwen3_235b_a22b)

DEFAULT_LENGTHS = (8192, 32768, 65536, 100_000, 131072)
NAMES = ("DeepSeek-R1", "Qwen3-235B-A22B", "MiniMax-M1")


def _ours(conv: F.Conventions) -> dict[str, F.Arch]:
    return {"DeepSeek-R1": deepseek_r1(), "Qwen3-235B-A22B": qwen3_235b_a22b(), "MiniMax-M1": minimax_m1()}


def compute(lengths: Sequence[int] = DEFAULT_LENGTHS, conv: F.Conventions = F.DECODE,
            extra: dict[str, F.Model] | None = None) -> dict:
    """Every number the report prints, as a dict (also the ``--json`` output)."""
    archs = _ours(conv)
    archs["MiniMax-M1 softmax twin"] = F.softmax_twin(F.arch_from_config(ModelConfig.preset("m1-80k"), "M1"))
    for k, v in (extra or {}).items():
        archs[k] = F.as_arch(v)
    absorbed = conv.replace(mla="absorbed")
    rows = []
    for L in lengths:
        row = {"L": L}
        for n in NAMES:
            row[f"figure/{n}"] = figure_flops(n, L)
        for n, a in archs.items():
            row[f"ours/{n}"] = F.generation_flops(a, L, conv)
        row["ours/DeepSeek-R1 (absorbed MLA)"] = F.generation_flops(archs["DeepSeek-R1"], L, absorbed)
        row["ratio/figure"] = row["figure/MiniMax-M1"] / row["figure/DeepSeek-R1"]
        row["ratio/ours"] = row["ours/MiniMax-M1"] / row["ours/DeepSeek-R1"]
        row["ratio/ours absorbed"] = row["ours/MiniMax-M1"] / row["ours/DeepSeek-R1 (absorbed MLA)"]
        rows.append(row)
    coeffs = {f"ours/{n}": F.quadratic_coeffs(a, conv) for n, a in archs.items()}
    coeffs["ours/DeepSeek-R1 (absorbed MLA)"] = F.quadratic_coeffs(archs["DeepSeek-R1"], absorbed)
    coeffs.update({f"figure/{n}": ab for n, ab in FIGURE_COEFFS.items()})
    claims = []
    for text, L, kind, target in CLAIMS:
        vals = {
            "figure": figure_flops("MiniMax-M1", L) / figure_flops("DeepSeek-R1", L),
            "ours (naive MLA)": F.generation_flops(archs["MiniMax-M1"], L, conv)
            / F.generation_flops(archs["DeepSeek-R1"], L, conv),
            "ours (absorbed MLA)": F.generation_flops(archs["MiniMax-M1"], L, conv)
            / F.generation_flops(archs["DeepSeek-R1"], L, absorbed),
        }
        ok = {k: (v < target) if kind == "lt" else abs(v - target) <= APPROX_REL_TOL * target for k, v in vals.items()}
        claims.append({"claim": text, "L": L, "ratios": vals, "holds": ok})
    m1, r1 = archs["MiniMax-M1"], archs["DeepSeek-R1"]
    cross = {
        "figure M1 = R1": _cross_fig(1.0), "figure M1 = 0.5 R1": _cross_fig(0.5), "figure M1 = 0.25 R1": _cross_fig(0.25),
        "ours M1 = R1": F.crossover(lambda L: F.generation_flops(m1, L, conv), lambda L: F.generation_flops(r1, L, conv)),
        "ours M1 = 0.5 R1": F.crossover(lambda L: F.generation_flops(m1, L, conv),
                                        lambda L: 0.5 * F.generation_flops(r1, L, conv)),
        "ours M1 = 0.25 R1": F.crossover(lambda L: F.generation_flops(m1, L, conv),
                                         lambda L: 0.25 * F.generation_flops(r1, L, conv)),
    }
    return {"conventions": dict(vars(conv)), "rows": rows,
            "coeffs": coeffs, "claims": claims, "crossovers": cross,
            "active_params": {n: a.active_params for n, a in archs.items()}}


def _cross_fig(frac: float) -> int | None:
    return F.crossover(lambda L: figure_flops("MiniMax-M1", L), lambda L: frac * figure_flops("DeepSeek-R1", L))


def _k(L: int) -> str:
    return f"{L // 1024}K" if L % 1024 == 0 else f"{L:,}"


def _table(hdr: list[str], lines: list[list[str]]) -> list[str]:
    w = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(hdr)]
    return ["  ".join(h.rjust(w[i]) for i, h in enumerate(hdr))] + [
        "  ".join(c.rjust(w[i]) for i, c in enumerate(l)) for l in lines]


def format_report(res: dict) -> str:
    fpm = res["conventions"].get("flops_per_mac", 2) if isinstance(res["conventions"], dict) else 2
    out = [f"FLOPs to generate L tokens from an empty context (forward only, {fpm} FLOPs/MAC, causal, "
           "KV cache / lightning state; 'figure' = the paper's Figure 1 (right) data, exact fit; "
           "R1 abs.MLA = DeepSeek-R1 with weight-absorbed MLA)", ""]
    main_cols = ["ours/DeepSeek-R1", "ours/DeepSeek-R1 (absorbed MLA)", "ours/Qwen3-235B-A22B", "ours/MiniMax-M1"]
    hdr = ["L", "fig R1", "fig Qwen3", "fig M1", "fig M1/R1", "R1", "R1 abs.MLA", "Qwen3", "M1", "M1/R1",
           "M1/R1 abs."]
    lines = [[_k(r["L"]), *(f"{r['figure/' + n]:.3e}" for n in NAMES), f"{r['ratio/figure']:.3f}",
              *(f"{r[k]:.3e}" for k in main_cols), f"{r['ratio/ours']:.3f}", f"{r['ratio/ours absorbed']:.3f}"]
             for r in res["rows"]]
    out += _table(hdr, lines)
    others = ["MiniMax-M1"] + [k[5:] for k in res["rows"][0] if k.startswith("ours/") and k not in main_cols
                               and not k.endswith("softmax twin")]
    out += ["", "Hybrid vs its softmax twin (every layer softmax), ours:"]
    hdr = ["L"] + [h for n in others for h in (n, "twin", "ratio")]
    lines = [[_k(r["L"])] + [c for n in others for c in (f"{r['ours/' + n]:.3e}", f"{r['ours/' + n + ' softmax twin']:.3e}",
                                                           f"{r['ours/' + n] / r['ours/' + n + ' softmax twin']:.3f}")]
             for r in res["rows"]]
    out += _table(hdr, lines)
    out += ["", "F(L) = a L + b L^2:"]
    for k, (a, b) in res["coeffs"].items():
        out.append(f"  {k:40s} a = {a:.5e} FLOPs/token (= 2 x {a / 2e9:.2f}B)   b = {b:,.0f}")
    out += ["", "Paper claims (M1 FLOPs / DeepSeek-R1 FLOPs):"]
    for c in res["claims"]:
        tol = "" if "<" in c["claim"] else f" (holds = within {APPROX_REL_TOL:.0%} relative)"
        out.append(f"  '{c['claim']}'{tol}, L = {c['L']:,}:")
        for k, v in c["ratios"].items():
            out.append(f"    {k:22s} {v:.3f}  {'holds' if c['holds'][k] else 'DOES NOT hold'}")
    out += ["", "Crossovers (L, tokens): " + ", ".join(f"{k}: {v:,} ({v / 1024:.1f}K)" if v else f"{k}: none"
                                                     for k, v in res["crossovers"].items())]
    return "\n".join(out)


def plot(res: dict, path: str, conv: F.Conventions = F.DECODE) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    archs = _ours(conv)
    Ls = np.arange(1024, 131072 + 1, 1024)
    marks = np.arange(1024, 131072 + 1, 8192)
    colors = {"DeepSeek-R1": "tab:blue", "Qwen3-235B-A22B": "tab:green", "MiniMax-M1": "tab:red"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for n in NAMES:
        ax.plot(Ls / 1024, figure_flops(n, Ls) / 1e16, "-", color=colors[n], label=f"{n} (paper figure data)")
        ax.plot(marks / 1024, figure_flops(n, marks) / 1e16, "o", color=colors[n], ms=4)
        ours = np.array([F.generation_flops(archs[n], int(L), conv) for L in Ls])
        ax.plot(Ls / 1024, ours / 1e16, "--", color=colors[n], label=f"{n} (ours, first principles)")
    absd = np.array([F.generation_flops(archs["DeepSeek-R1"], int(L), conv.replace(mla="absorbed")) for L in Ls])
    ax.plot(Ls / 1024, absd / 1e16, ":", color=colors["DeepSeek-R1"], label="DeepSeek-R1 (ours, absorbed MLA)")
    ax.set_xlabel("generation length (# tokens, K = 1024)")
    ax.set_ylabel("FLOPs (x 1e16)")
    ax.set_title("Theoretical inference FLOPs vs generation length")
    ax.set_xlim(0, 130)
    ax.set_ylim(0, 8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    m1 = np.array([F.generation_flops(archs["MiniMax-M1"], int(L), conv) for L in Ls])
    r1 = np.array([F.generation_flops(archs["DeepSeek-R1"], int(L), conv) for L in Ls])
    ax2.plot(Ls / 1024, figure_flops("MiniMax-M1", Ls) / figure_flops("DeepSeek-R1", Ls), "k-", label="paper figure")
    ax2.plot(Ls / 1024, m1 / r1, "r--", label="ours (naive MLA)")
    ax2.plot(Ls / 1024, m1 / absd, "r:", label="ours (absorbed MLA)")
    for y, txt in ((0.5, "claim: < 50% at 64K"), (0.25, "claim: ~25% at 100K")):
        ax2.axhline(y, color="gray", lw=0.8)
        ax2.text(2, y + 0.01, txt, fontsize=8, color="gray")
    for x in (64, 100_000 / 1024):
        ax2.axvline(x, color="gray", lw=0.8, ls="--")
    ax2.set_ylim(0, 1.2)
    ax2.set_xlim(0, 130)
    ax2.set_xlabel("generation length (# tokens, K = 1024)")
    ax2.set_ylabel("MiniMax-M1 FLOPs / DeepSeek-R1 FLOPs")
    ax2.set_title("M1 / R1")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="m1-jax flops", description=__doc__)
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=list(DEFAULT_LENGTHS),
                   help="comma-separated generation lengths (default 8192,32768,65536,100000,131072)")
    p.add_argument("--plot", default="m1_flops.png", help="PNG path for the figure (default ./m1_flops.png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--preset", action="append", default=[],
                   help="also count a ModelConfig preset and its softmax twin (repeatable), e.g. small")
    p.add_argument("--flops-per-mac", type=int, default=2)
    p.add_argument("--lightning", choices=F.LIGHTNING_MODES, default="recurrent")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of the table")
    a = p.parse_args(argv)
    # Generation always sees t + 1 keys (causal); the non-causal convention is for prefill counts (API).
    conv = F.Conventions(flops_per_mac=a.flops_per_mac, lightning=a.lightning)
    extra = {}
    for name in a.preset:
        cfg = ModelConfig.preset(name)
        extra[name] = cfg
        extra[f"{name} softmax twin"] = F.softmax_twin(cfg)
    res = compute(a.lengths, conv, extra)
    print(json.dumps(res, indent=1, default=str) if a.json else format_report(res))
    if not a.no_plot:
        print(f"\nwrote {plot(res, a.plot, conv)}")
    return 0
