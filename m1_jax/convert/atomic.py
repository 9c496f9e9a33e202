"""Write a checkpoint under a temporary name next to its destination; move it into place only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from m1_jax.convert.errors import CheckpointError


def check_destination(dst: str, overwrite: bool) -> None:
    if os.path.exists(dst) and not overwrite:
        if not os.path.isdir(dst) or os.listdir(dst):
            raise CheckpointError(f"{dst}: already exists (pass overwrite=True / --overwrite to replace it)")


@contextlib.contextmanager
def staged_path(dst: str, *, overwrite: bool = False, create: bool = False):
    """Yield a not-yet-existing path (a folder when ``create``) in a temporary folder next to ``dst``.

    When the block succeeds it is renamed to ``dst`` (an existing ``dst`` is replaced only with
    ``overwrite``); on any error the temporary folder is deleted and ``dst`` is left untouched.
    """
    dst = os.path.abspath(dst)
    check_destination(dst, overwrite)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    out = os.path.join(tmp, os.path.basename(dst))
    if create:
        os.mkdir(out)
    try:
        yield out
        if os.path.exists(dst):
            os.rename(dst, os.path.join(tmp, ".replaced"))
        os.rename(out, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def staged_folder(dst: str, *, overwrite: bool = False):
    """``staged_path`` with the folder created."""
    return staged_path(dst, overwrite=overwrite, create=True)
