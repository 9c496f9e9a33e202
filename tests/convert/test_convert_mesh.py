"""Import straight into a sharded layout, Orbax restore onto a different mesh, and a training checkpoint
restored onto a mesh (8 CPU devices)."""

import os
import subprocess
import sys
import textwrap


SCRIPT = textwrap.dedent(r"""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    import m1_jax
    from m1_jax.convert import orbax_io
    from sharding import MeshConfig, make_mesh
    sys.path.insert(0, sys.argv[2])
    from convert_helpers import assert_same_tensors, read_all

    src, tmp = sys.argv[1], sys.argv[3]
    assert len(jax.devices()) == 8
    mesh_a = make_mesh(MeshConfig(fsdp=2, tensor=2, expert=2))
    mesh_b = make_mesh(MeshConfig(data=2, fsdp=4))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 11)), jnp.int32)
    fwd = nnx.jit(lambda m, x: m(x))

    _, ref = m1_jax.load_hf_checkpoint(src)
    config, model = m1_jax.load_hf_checkpoint(src, mesh=mesh_a)
    w1 = model.blocks.layers[0].block_sparse_moe.w1.get_value()  # [blocks, E, H, I]: exp, embed, mlp
    assert w1.sharding.spec == P(None, "expert", "fsdp", "tensor"), w1.sharding.spec
    assert len({s.device for s in w1.addressable_shards}) == 8
    assert w1.addressable_shards[0].data.shape == (2, 2, 32, 16)
    qkv = model.blocks.layers[0].self_attn.qkv_proj.get_value()  # [blocks, H, heads, 3, d]
    assert qkv.sharding.spec[:3] == (None, ("fsdp", "expert"), "tensor"), qkv.sharding.spec
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(ref))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))
    np.testing.assert_allclose(np.asarray(fwd(model, ids)), np.asarray(fwd(ref, ids)), atol=1e-5)

    # each HF tensor is read once with the default host budget; with a 1-byte budget every shard is its
    # own batch (more reads, same result)
    from m1_jax.convert import safetensors_io
    reads = []
    orig = safetensors_io.TensorReader.read
    safetensors_io.TensorReader.read = lambda self, key: (reads.append(key), orig(self, key))[1]
    m1_jax.load_hf_checkpoint(src, mesh=mesh_a)
    assert len(reads) == len(set(reads)) == 79, len(reads)  # every mapped tensor once (decay buffers: never)
    reads.clear()
    _, small = m1_jax.load_hf_checkpoint(src, mesh=mesh_a, host_bytes=1)
    assert len(reads) > 79
    safetensors_io.TensorReader.read = orig
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(small)), nnx.to_flat_state(nnx.state(ref))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))

    # Orbax: save from mesh A, restore onto mesh B
    orbax_io.save_orbax(model, config, tmp + "/ob")
    config_b, model_b = orbax_io.restore_orbax(tmp + "/ob", mesh=mesh_b)
    w1b = model_b.blocks.layers[0].block_sparse_moe.w1.get_value()
    assert w1b.sharding.mesh.shape == mesh_b.shape and w1b.sharding.spec == P(None, None, "fsdp"), w1b.sharding.spec
    np.testing.assert_array_equal(np.asarray(w1b), np.asarray(w1))
    np.testing.assert_allclose(np.asarray(fwd(model_b, ids)), np.asarray(fwd(model, ids)), atol=1e-5)  # other reduction order

    # a streamed (hf_to_orbax) checkpoint restores onto a mesh too
    orbax_io.hf_to_orbax(src, tmp + "/ob_streamed")
    _, model_s = orbax_io.restore_orbax(tmp + "/ob_streamed", mesh=mesh_a)
    w1s = model_s.blocks.layers[0].block_sparse_moe.w1.get_value()
    assert w1s.sharding.spec == w1.sharding.spec
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model_s)), nnx.to_flat_state(nnx.state(ref))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))

    # export from the sharded model is the source checkpoint again
    m1_jax.save_hf_checkpoint(model_b, config_b, tmp + "/hf", max_shard_size="100KB")
    assert_same_tensors(read_all(src), read_all(tmp + "/hf"), skip=("_decay", "slope_rate"))

    # a train.py checkpoint restores its parameters straight into the mesh's layout
    from m1_jax.convert import load_training_checkpoint
    _, trained, _ = load_training_checkpoint(sys.argv[4])
    _, trained_a, info = load_training_checkpoint(sys.argv[4], mesh=mesh_a)
    w1t = trained_a.blocks.layers[0].block_sparse_moe.w1.get_value()
    assert w1t.sharding.spec == P(None, "expert", "fsdp", "tensor"), w1t.sharding.spec
    assert len({s.device for s in w1t.addressable_shards}) == 8 and info["step"] == 2
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(trained_a)), nnx.to_flat_state(nnx.state(trained))):
        assert a.get_value().sharding.mesh.shape == mesh_a.shape, p
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))
    print("MESH OK")
""")


def test_sharded_import_and_restore_onto_another_mesh(tiny_hf, training_run, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, tiny_hf[1], os.path.dirname(__file__), str(tmp_path),
                          training_run],
                         capture_output=True, text=True, env=env, timeout=1800)
    assert out.returncode == 0 and "MESH OK" in out.stdout, out.stderr[-4000:]
