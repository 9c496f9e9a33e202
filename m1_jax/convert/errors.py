"""The one error type of checkpoint conversion."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint does not match what its config and the key mapping expect.

    Messages name the file and the tensor, and say what was expected and what was found.
    """
