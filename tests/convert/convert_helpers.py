import glob
import os

import numpy as np

from m1_jax.convert.safetensors_io import SafetensorsFolder, TensorReader


def read_all(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors folder (tests only: small folders)."""
    folder = SafetensorsFolder(path)
    with TensorReader(folder) as r:
        return {k: r.read(k) for k in folder.tensors}


def assert_same_tensors(a: dict, b: dict, skip=()):
    ka = {k for k in a if not any(s in k for s in skip)}
    kb = {k for k in b if not any(s in k for s in skip)}
    assert ka == kb, (sorted(ka - kb)[:3], sorted(kb - ka)[:3])
    for k in ka:
        assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        assert np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), k


def files(path: str) -> list[str]:
    return sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "*")))
