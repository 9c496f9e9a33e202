import os

# Tests run on the CPU; keep XLA from grabbing every core's worth of threads per test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Test programs are compiled once and run for a step or two: without LLVM's expensive passes XLA:CPU compiles
# about a third faster (measured on the 2-core CPU, 2026-12-01), which is most of the suite's time.
# Subprocess tests append their device-count flag to these. M1_TEST_XLA_OPT=1 keeps XLA's defaults.
if os.environ.get("M1_TEST_XLA_OPT") != "1":
    _FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST).strip()

import pytest  # noqa: E402

# Extra parametrizations of the slowest interpreter tests (the same code paths at more shapes) run only with
# M1_FULL_TESTS=1, to keep the default suite (CI) near 20 minutes on 2 cores.
FULL = os.environ.get("M1_FULL_TESTS") == "1"


def pytest_collection_modifyitems(config, items):
    _order_slowest_first(items)
    if FULL:
        return
    skip = pytest.mark.skip(reason="an extra case: set M1_FULL_TESTS=1 to run it")
    for item in items:
        if item.get_closest_marker("full"):
            item.add_marker(skip)


# The slowest files first: with whole files per xdist worker (scripts/test.sh), long files started last
# would leave one core idle at the end (longest-first scheduling). Measured on the 2-core CPU, 2026-12-01.
SLOWEST_FIRST = [
    "pallas_kernels/test_lightning_mosaic.py", "sharding/test_sharding.py", "train/test_train_loop.py",
    "rl/test_rl_loop.py", "sharding/test_scaling_bench.py", "pallas_kernels/test_lightning_kernels.py",
    "train/test_train_mesh.py", "convert/test_convert_mesh.py", "inference/test_generate.py",
    "model/test_model.py", "inference/test_generate_cli.py", "model/test_hf_parity.py",
]


def _slow_rank(item) -> int:
    path = str(item.path).replace(os.sep, "/")
    return next((i for i, f in enumerate(SLOWEST_FIRST) if path.endswith("tests/" + f)), len(SLOWEST_FIRST))


def _order_slowest_first(items):
    items.sort(key=_slow_rank)  # stable: the order inside a file is kept
