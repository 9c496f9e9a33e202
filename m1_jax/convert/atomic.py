"""Write a folder under a temporary name next to its destination; move it into place only when complete."""

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
def staged_folder(dst: str, *, overwrite: bool = False):
    """Yield a temporary folder on the same filesystem as ``dst``; on success rename it to ``dst``
    (replacing an existing ``dst`` only with ``overwrite``); on any error delete it and leave ``dst``
    untouched."""
    dst = os.path.abspath(dst)
    check_destination(dst, overwrite)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(dst):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
        os.rename(dst, os.path.join(old, "x"))
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
