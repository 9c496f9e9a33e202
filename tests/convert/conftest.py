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


# Two layers (one lightning, one softmax), short rows: compilation dominates, everything else is the real path.
TRAIN_BINDINGS = [
    "TrainConfig.model_overrides = {'num_hidden_layers': 2, 'layer_types': ('linear_attention', 'full_attention'), "
    "'block_size': 16}",
    "DataConfig.seq_len = 16", "DataConfig.batch_size = 2", "OptimizerConfig.warmup_steps = 1",
    "OptimizerConfig.learning_rate = 1e-2", "TrainConfig.steps = 2", "TrainConfig.checkpoint_every = 1",
    "TrainConfig.sample_tokens = 0", "TrainConfig.progress_bar = False", "TrainConfig.tensorboard = False",
    "TrainConfig.loss_chunk_size = 16",
]


@pytest.fixture(scope="session")
def training_run(tmp_path_factory):
    """The run folder of a real 2-step ``train.py`` run (checkpoints at steps 1 and 2)."""
    from m1_jax.train.config import load_config
    from m1_jax.train.loop import train

    run_dir = str(tmp_path_factory.mktemp("train") / "run")
    result = train(load_config([], TRAIN_BINDINGS + [f"TrainConfig.run_dir = '{run_dir}'"]), verbose=False)
    assert result.status == "completed" and result.checkpoint_step == 2
    return run_dir
