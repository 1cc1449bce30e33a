"""Signal handlers for the length of a block: the one way lorastrap changes what a signal does (the install
transaction's SIGTERM/SIGHUP, its held signals, the Slurm login's wait), each put back as it was afterwards."""

from __future__ import annotations

import signal
from contextlib import contextmanager


@contextmanager
def handled(signals, handler):
    """Run the block with HANDLER for each of SIGNALS; the previous handlers are restored when it ends."""
    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
