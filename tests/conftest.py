import os

# Tests run on the CPU; keep XLA from grabbing every core's worth of threads per test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

# Extra parametrizations of the slowest interpreter tests (the same code paths at more shapes) run only with
# M1_FULL_TESTS=1, to keep the default suite (CI) near 20 minutes on 2 cores.
FULL = os.environ.get("M1_FULL_TESTS") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "full: an extra case run only with M1_FULL_TESTS=1")


def pytest_collection_modifyitems(config, items):
    if FULL:
        return
    skip = pytest.mark.skip(reason="an extra case: set M1_FULL_TESTS=1 to run it")
    for item in items:
        if item.get_closest_marker("full"):
            item.add_marker(skip)
