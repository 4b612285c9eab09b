"""Hold Ctrl-C back while a few lines that must not be cut in half run."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Run the block to its end even if Ctrl-C (SIGINT) arrives; the interrupt is raised after it.

    For short critical sections, such as adding a finished batch's statistics
    to many layers' sums: an interrupt between two of those additions would
    leave some layers counting the batch and others not. Outside the main
    thread (where Python cannot install signal handlers) the block runs as is.

    Example:
        >>> with interrupts_deferred():
        ...     total = sum(range(10))
        >>> total
        45
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple[int, Any]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(*received[0])  # Python's default handler raises KeyboardInterrupt here
        elif received and previous == signal.SIG_DFL:
            raise KeyboardInterrupt
