import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # convert_helpers, convert_synthetic

from convert_helpers import tiny_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """``(torch model, folder)`` of a tiny random float32 transformers MiniMax saved with save_pretrained."""
    model = tiny_hf_model()
    path = str(tmp_path_factory.mktemp("tiny_hf") / "ckpt")
    model.save_pretrained(path)
    return model, path


@pytest.fixture
def hf_copy(tiny_hf, tmp_path):
    """A private copy of the tiny checkpoint folder, free to break."""
    import shutil

    dst = str(tmp_path / "hf")
    shutil.copytree(tiny_hf[1], dst)
    return dst
