"""``m1-jax generate``: continue prompts with a training checkpoint, a HF checkpoint folder, or a random preset.

Every argument is checked before anything is loaded (a bad one exits with status 2 and one line naming
it); text is streamed as it is produced; prefill and decode rates are reported separately, compilation
excluded.
"""

from __future__ import annotations

import argparse
import math
import os
import sys


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="m1-jax generate", description=__doc__.split("\n")[0][len("``m1-jax generate``: "):],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH",
                     help="a training checkpoint from train.py: a step folder (runs/x/checkpoints/200), its "
                          "checkpoints/ folder or the run folder (then its latest step)")
    src.add_argument("--hf", metavar="FOLDER", help="HF checkpoint folder (config.json + *.safetensors)")
    src.add_argument("--preset", help="a randomly initialised preset (e.g. tiny): exercises the machinery only")
    ap.add_argument("--tokenizer", default=None,
                    help="'byte' or a tokenizer.json (default: the run's tokenizer for --checkpoint, the folder's "
                         "tokenizer.json for --hf, else byte)")
    ap.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (>= 1)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; > 0 samples")
    ap.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (>= 1)")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (also the --preset init seed)")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="prompt tokens per prefill forward (default: about 16K tokens over the batch)")
    ap.add_argument("--dtype", default=None, help="parameter dtype override, e.g. bfloat16 (default: the checkpoint's)")
    ap.add_argument("--stream-every", type=int, default=8, help="tokens per streamed chunk (>= 1)")
    return ap


def check_arguments(args) -> None:
    """Range checks that need nothing loaded."""
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UsageError(f"--temperature must be a finite number >= 0 (0 is greedy); got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1; got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1]; got {args.top_p}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise UsageError(f"--prefill-chunk must be >= 1; got {args.prefill_chunk}")
    if args.stream_every < 1:
        raise UsageError(f"--stream-every must be >= 1; got {args.stream_every}")
    from m1_jax.dtypes import DTYPE_NAMES

    if args.dtype is not None and args.dtype not in DTYPE_NAMES:
        raise UsageError(f"--dtype must be one of {list(DTYPE_NAMES)}; got {args.dtype!r}")


def read_config(args):
    """``(config, tokenizer spec, eos token name, loader)`` without reading any weight."""
    from m1_jax.config import ConfigError, ModelConfig

    if args.preset:
        if args.preset not in ModelConfig.preset_names():
            raise UsageError(f"--preset must be one of {ModelConfig.preset_names()}; got {args.preset!r}")
        config = ModelConfig.preset(args.preset)
        if args.dtype:
            config = config.replace(param_dtype=args.dtype, dtype=args.dtype)

        def load():
            from flax import nnx

            from m1_jax import MiniMaxForCausalLM

            return MiniMaxForCausalLM(config, rngs=nnx.Rngs(args.seed))
        return config, args.tokenizer or "byte", None, load
    if args.hf:
        import json

        file = os.path.join(args.hf, "config.json")
        if not os.path.isfile(file):
            raise UsageError(f"--hf {args.hf}: not a HF checkpoint folder (no config.json); expected a folder with "
                             "config.json and *.safetensors")
        try:
            with open(file) as f:
                config = ModelConfig.from_hf(json.load(f))
        except (OSError, ValueError, ConfigError) as e:
            raise UsageError(f"--hf {args.hf}: cannot read config.json: {e}") from None

        def load():
            from m1_jax import load_hf_checkpoint

            return load_hf_checkpoint(args.hf, dtype=args.dtype)[1]
        tok = os.path.join(args.hf, "tokenizer.json")
        return config, args.tokenizer or (tok if os.path.isfile(tok) else "byte"), None, load
    from m1_jax.convert.errors import CheckpointError
    from m1_jax.convert.training_checkpoint import (load_training_checkpoint, model_config_from_run, read_run_config,
                                                    resolve_step_folder)

    try:
        step_dir = resolve_step_folder(args.checkpoint)
        run_config = read_run_config(step_dir)
        config = model_config_from_run(run_config, step_dir)
    except CheckpointError as e:
        raise UsageError(f"--checkpoint {e}") from None
    if args.dtype:
        config = config.replace(param_dtype=args.dtype, dtype=args.dtype)
    data = run_config.get("data") or {}
    tok = args.tokenizer or data.get("tokenizer") or "byte"
    if tok != "byte" and not os.path.exists(tok):  # a relative path of the run: try beside the run folder
        run_dir = os.path.dirname(os.path.dirname(step_dir))
        for base in (run_dir, os.path.dirname(run_dir)):
            if os.path.exists(os.path.join(base, tok)):
                tok = os.path.join(base, tok)
                break

    def load():
        return load_training_checkpoint(step_dir, dtype=args.dtype)[1]
    return config, tok, (None if args.tokenizer else data.get("eos_token")), load


def encode_prompts(tokenizer, prompts, config, max_new_tokens):
    """Token ids per prompt; warns about characters the tokenizer could not encode."""
    encoded = []
    for i, p in enumerate(prompts):
        checked = getattr(tokenizer, "encode_checked", None)
        if checked is not None:  # (ids, the characters it could not encode)
            ids, lost = checked(p)
            if len(lost):
                print(f"m1-jax generate: warning: the tokenizer dropped {len(lost)} character(s) of --prompt "
                      f"#{i + 1}: {''.join(map(str, lost))[:40]!r}", file=sys.stderr)
        else:
            ids = tokenizer.encode(p)
            if tokenizer.decode(ids) != p:
                print(f"m1-jax generate: warning: --prompt #{i + 1} does not survive the tokenizer unchanged "
                      f"(decoded: {tokenizer.decode(ids)[:40]!r})", file=sys.stderr)
        if len(ids) == 0:
            raise UsageError(f"--prompt #{i + 1} encodes to no token; every prompt needs at least one")
        if len(ids) + max_new_tokens > config.max_position_embeddings:
            raise UsageError(f"--prompt #{i + 1} has {len(ids)} tokens; with --max-new-tokens {max_new_tokens} that "
                             f"exceeds the model's max_position_embeddings = {config.max_position_embeddings}")
        encoded.append([int(t) for t in ids])
    return encoded


class TextStream:
    """Prints each row's text as its tokens arrive (one row: live; several: each row once it is done)."""

    def __init__(self, tokenizer, prompts, out=None):
        self.tok, self.prompts = tokenizer, prompts
        self.out = out = sys.stdout if out is None else out
        self.ids = [[] for _ in prompts]
        self.shown = [""] * len(prompts)
        self.printed = [False] * len(prompts)
        if len(prompts) == 1:
            out.write(prompts[0])
            out.flush()

    def update(self, chunk, final: bool = False):
        for r in range(len(self.prompts)):
            take = max(0, int(chunk.lengths[r]) - len(self.ids[r]))
            self.ids[r] += [int(t) for t in chunk.tokens[r, :take]]
            if len(self.prompts) == 1:
                text = self.tok.decode(self.ids[r])
                if text.startswith(self.shown[r]) and not text.endswith("\ufffd"):  # whole characters only
                    self.out.write(text[len(self.shown[r]):])
                    self.out.flush()
                    self.shown[r] = text
            elif (chunk.done[r] or final) and not self.printed[r]:
                self.out.write(f"--- {self.prompts[r]!r}\n{self.prompts[r]}{self.tok.decode(self.ids[r])}\n")
                self.out.flush()
                self.printed[r] = True
        if final and len(self.prompts) == 1:
            text = self.tok.decode(self.ids[0])
            self.out.write(text[len(self.shown[0]):] + "\n")
            self.out.flush()


def rates_line(t: dict, steps: int) -> str:
    def rate(n, s):
        return f"{n / s:,.1f} tok/s" if s > 0 else "n/a"
    return (f"[prefill: {t['prompt_tokens']} tokens in {t['prefill_s']:.3f} s ({rate(t['prompt_tokens'], t['prefill_s'])}); "
            f"decode: {t['generated_tokens']} tokens in {t['decode_s']:.3f} s ({rate(t['generated_tokens'], t['decode_s'])}, "
            f"{1e3 * t['decode_s'] / max(steps - 1, 1):.2f} ms/step); compilation {t['compile_s']:.1f} s, excluded]")


def run(args) -> int:
    check_arguments(args)
    config, tok_spec, eos_token, load = read_config(args)
    from m1_jax.data.tokenizer import make_tokenizer

    try:
        tokenizer = make_tokenizer(tok_spec, eos_token=eos_token if tok_spec != "byte" else None)
    except (OSError, ValueError) as e:
        raise UsageError(f"--tokenizer {tok_spec}: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise UsageError(f"--tokenizer {tok_spec!r} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{config.vocab_size}")
    encoded = encode_prompts(tokenizer, args.prompt, config, args.max_new_tokens)

    import numpy as np

    from m1_jax.inference import generate_stream

    model = load()
    T = max(len(e) for e in encoded)
    ids = np.zeros((len(encoded), T), np.int32)
    for r, e in enumerate(encoded):
        ids[r, T - len(e):] = e  # left padding
    stops = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    timings: dict = {}
    stream = TextStream(tokenizer, args.prompt)
    steps = 0
    chunk = None
    for chunk in generate_stream(model, ids, max_new_tokens=args.max_new_tokens, lengths=[len(e) for e in encoded],
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                 stop_tokens=stops, prefill_chunk=args.prefill_chunk, stream_every=args.stream_every,
                                 timings=timings):
        steps += chunk.tokens.shape[1]
        stream.update(chunk)
    stream.update(chunk, final=True)
    print(rates_line(timings, steps), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"m1-jax generate: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
