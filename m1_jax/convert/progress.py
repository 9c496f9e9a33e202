"""A progress bar for conversions: bytes (with rate) and tensors, through tqdm on stderr."""

from __future__ import annotations

import sys


class Progress:
    """``bytes(n)`` advances the byte count (tqdm shows the rate); ``tensors(n)`` the tensor count."""

    def __init__(self, total_bytes: int, total_tensors: int, desc: str, *, enabled: bool = True):
        self.total_tensors = total_tensors
        self.done_tensors = 0
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                             file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
            self._bar.set_postfix_str(f"0/{total_tensors} tensors", refresh=False)

    def bytes(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def tensors(self, n: int = 1) -> None:
        self.done_tensors += n
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.done_tensors}/{self.total_tensors} tensors", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
