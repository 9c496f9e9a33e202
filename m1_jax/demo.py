"""A minimal end-to-end check: the ``tiny`` preset trained for a few steps on the bundled corpus.

``python -m m1_jax.demo`` (or ``m1-jax demo``). The full training job is ``python train.py``.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from m1_jax import MiniMaxForCausalLM, ModelConfig


def corpus_bytes() -> np.ndarray:
    text = resources.files("m1_jax").joinpath("data/tinyshakespeare.txt").read_bytes()
    return np.frombuffer(text, np.uint8).astype(np.int32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)

    config = ModelConfig.preset("tiny")
    model = MiniMaxForCausalLM(config, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(args.lr, b1=0.9, b2=0.95), wrt=nnx.Param)
    data = corpus_bytes()
    rng = np.random.default_rng(0)

    @nnx.jit
    def step(model, optimizer, batch):
        def loss_fn(model):
            logits, aux = model(batch[:, :-1], return_aux=True)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
            return nll + config.router_aux_loss_coef * aux, nll

        (_, nll), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return nll

    t0 = time.time()
    for i in range(args.steps):
        starts = rng.integers(0, len(data) - args.seq - 1, args.batch)
        batch = jnp.asarray(np.stack([data[s:s + args.seq + 1] for s in starts]))
        loss = float(step(model, optimizer, batch))
        if i % 5 == 0 or i == args.steps - 1:
            rate = (i + 1) * args.batch * args.seq / (time.time() - t0)
            print(f"step {i:4d}  loss {loss:.3f}  {rate:,.0f} tok/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
