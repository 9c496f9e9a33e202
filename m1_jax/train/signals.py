"""Preemption: SIGTERM / SIGINT set a flag that the step loop checks at each step boundary."""

from __future__ import annotations

import signal


class Signals:
    """SIGTERM / SIGINT set ``received``; the loop saves a checkpoint and exits at the next step boundary.
    A second SIGINT interrupts immediately. Outside the main thread nothing is installed."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    @property
    def name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
