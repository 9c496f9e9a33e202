"""Generation on a device mesh vs one device (run as a script with fake CPU devices).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/inference/sharded_generate.py \
        "data=2,tensor=2,expert=2:ep_capacity" "fsdp=2,tensor=4"

Each argument is a MeshConfig string, optionally ``:moe_impl``. The same parameters generate greedily on one
device and, sharded by the project's rules, on the mesh (``jax.set_mesh``): chunked prefill of left-padded
prompts of different lengths, then the on-device decode loop. Prints one JSON line per mesh.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from flax import nnx

from m1_jax import MiniMaxForCausalLM, ModelConfig, generate
from m1_jax.config import FULL, LINEAR
from sharding import MeshConfig, make_mesh, state_shardings

CFG = dict(num_hidden_layers=4, layer_types=(LINEAR, FULL) * 2, block_size=4, vocab_size=61,
           moe_capacity_factor=-1.0)
LENS = [9, 4, 1, 7]


def main(specs):
    rng = np.random.default_rng(0)
    ids = np.zeros((len(LENS), max(LENS)), np.int32)
    for r, n in enumerate(LENS):
        ids[r, ids.shape[1] - n:] = rng.integers(0, 61, n)
    ref_model = MiniMaxForCausalLM(ModelConfig.preset("tiny", **CFG), rngs=nnx.Rngs(0))
    params = nnx.state(ref_model)
    ref_t, ref_lp = generate(ref_model, ids, max_new_tokens=6, lengths=LENS, prefill_chunk=4)
    for spec in specs:
        mesh_str, _, impl = spec.partition(":")
        mesh = make_mesh(MeshConfig.from_string(mesh_str))
        model = MiniMaxForCausalLM(ModelConfig.preset("tiny", **CFG, moe_impl=impl or "ragged"), rngs=nnx.Rngs(1))
        nnx.update(model, jax.device_put(params, state_shardings(params, mesh)))
        with jax.set_mesh(mesh):
            t, lp = generate(model, ids, max_new_tokens=6, lengths=LENS, prefill_chunk=4)
        q = model.blocks.layers[1].self_attn.q_proj.get_value()
        print(json.dumps(dict(mesh=spec, tokens_equal=bool(np.array_equal(np.asarray(t), np.asarray(ref_t))),
                              logprob_abs=float(np.max(np.abs(np.asarray(lp) - np.asarray(ref_lp)))),
                              q_proj_spec=str(q.sharding.spec), devices=len(mesh.devices.flat))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
