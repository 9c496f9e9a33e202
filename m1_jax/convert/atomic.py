"""Write a checkpoint under a temporary name next to its destination; move it into place only when complete.

With ``overwrite`` an existing destination folder is replaced, but only the files the converter writes
(HF weights, index and configs; Orbax's files): anything else in it (a README, a tokenizer.json, notes)
is carried over into the new folder untouched. The converter never deletes a file it did not write.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile

from m1_jax.convert.errors import CheckpointError

# What `save_hf_checkpoint` / `orbax_to_hf` and `save_orbax` / `hf_to_orbax` put in a destination folder.
_HF_NAMES = re.compile(r"config\.json|config\.original\.json|model\.safetensors\.index\.json"
                       r"|model(-\d{5}-of-\d{5})?\.safetensors")
_ORBAX_NAMES = re.compile(r"_METADATA|_CHECKPOINT_METADATA|_ROOT_METADATA|_sharding|manifest\.ocdbt"
                          r"|commit_success\.txt|d|array_metadatas|descriptor|ocdbt\.process_\d+")


def written_by_converter(name: str) -> bool:
    """Whether a top-level entry of a checkpoint folder is one the converter writes (and may replace)."""
    return bool(_HF_NAMES.fullmatch(name) or _ORBAX_NAMES.fullmatch(name))


def foreign_entries(folder: str) -> list[str]:
    """Entries of ``folder`` the converter did not write (they survive an overwrite)."""
    return sorted(n for n in os.listdir(folder) if not written_by_converter(n))


def check_destination(dst: str, overwrite: bool) -> None:
    if not os.path.lexists(dst):
        return
    if not os.path.isdir(dst) or os.path.islink(dst):
        raise CheckpointError(f"{dst}: exists and is not a folder; the converter writes a folder there and never "
                              f"replaces a file (remove or rename it)")
    if os.listdir(dst) and not overwrite:
        raise CheckpointError(f"{dst}: already exists (pass overwrite=True / --overwrite to replace its checkpoint "
                              f"files; other files in it are kept)")


@contextlib.contextmanager
def staged_path(dst: str, *, overwrite: bool = False, create: bool = False):
    """Yield a not-yet-existing path (a folder when ``create``) in a temporary folder next to ``dst``.

    When the block succeeds it is renamed to ``dst``. An existing ``dst`` folder is replaced only with
    ``overwrite``, and then only the entries ``written_by_converter``: every other entry is moved into
    the new folder first. On any error the temporary folder is deleted and ``dst`` is left untouched.
    """
    dst = os.path.abspath(dst)
    check_destination(dst, overwrite)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    out = os.path.join(tmp, os.path.basename(dst))
    replaced = os.path.join(tmp, ".replaced")
    if create:
        os.mkdir(out)
    safe_to_delete = True  # False while a user's file sits inside tmp
    try:
        yield out
        if os.path.exists(dst):
            moved: list[str] = []
            safe_to_delete = False
            try:
                for name in foreign_entries(dst):
                    os.rename(os.path.join(dst, name), os.path.join(out, name))
                    moved.append(name)
                os.rename(dst, replaced)
                os.rename(out, dst)
            except BaseException:
                # put the user's files back where they were before anything is deleted
                if not os.path.exists(dst) and os.path.isdir(replaced):
                    os.rename(replaced, dst)
                if os.path.isdir(out):
                    for name in moved:
                        os.rename(os.path.join(out, name), os.path.join(dst, name))
                safe_to_delete = True  # not reached when putting them back failed: tmp is then kept
                raise
            safe_to_delete = True
        else:
            os.rename(out, dst)
    finally:
        if safe_to_delete:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"m1-jax convert: could not move files back into {dst}; they are in {out}", file=sys.stderr)


def staged_folder(dst: str, *, overwrite: bool = False):
    """``staged_path`` with the folder created."""
    return staged_path(dst, overwrite=overwrite, create=True)
