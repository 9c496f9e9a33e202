"""``m1-jax generate``: continue a prompt with a HF checkpoint folder (or a random preset, for smoke tests)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="m1-jax generate", description=__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="PATH", help="HF checkpoint folder (config.json + safetensors)")
    src.add_argument("--preset", help="randomly initialised preset (e.g. tiny): exercises the machinery only")
    ap.add_argument("--tokenizer", default=None,
                    help="'byte' or a tokenizer.json (default: the checkpoint folder's tokenizer.json, else byte)")
    ap.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from flax import nnx

    from m1_jax import MiniMaxForCausalLM, ModelConfig, generate
    from m1_jax.data.tokenizer import make_tokenizer

    if args.hf:
        from m1_jax import load_hf_checkpoint

        config, model = load_hf_checkpoint(args.hf)
        default_tok = os.path.join(args.hf, "tokenizer.json")
        tok_spec = args.tokenizer or (default_tok if os.path.isfile(default_tok) else "byte")
    else:
        config = ModelConfig.preset(args.preset)
        model = MiniMaxForCausalLM(config, rngs=nnx.Rngs(args.seed))
        tok_spec = args.tokenizer or "byte"
    tokenizer = make_tokenizer(tok_spec)
    if tokenizer.vocab_size > config.vocab_size:
        print(f"m1-jax generate: tokenizer {tok_spec!r} has {tokenizer.vocab_size} tokens but the model's "
              f"vocab_size is {config.vocab_size}", file=sys.stderr)
        return 2
    encoded = [tokenizer.encode(p) for p in args.prompt]
    if any(len(e) == 0 for e in encoded):
        print("m1-jax generate: every prompt must encode to at least one token", file=sys.stderr)
        return 2
    T = max(len(e) for e in encoded)
    ids = np.zeros((len(encoded), T), np.int32)
    for r, e in enumerate(encoded):
        ids[r, T - len(e):] = e  # left padding
    stops = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    t0 = time.time()
    tokens, _ = generate(model, ids, max_new_tokens=args.max_new_tokens, lengths=[len(e) for e in encoded],
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         stop_tokens=stops)
    dt = time.time() - t0
    for prompt, row in zip(args.prompt, np.asarray(tokens)):
        print(f"--- {prompt!r}\n{prompt}{tokenizer.decode(row)}")
    print(f"[{tokens.size} tokens in {dt:.1f}s, {tokens.size / dt:.1f} tok/s including compilation]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
