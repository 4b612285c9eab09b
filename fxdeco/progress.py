"""Progress of long loops: a tqdm bar on a terminal, plain periodic lines elsewhere (logs, CI, ``nohup``).

A bar redrawn with carriage returns makes a mess of a log file, and no output
at all for minutes looks like a hang; so when stderr is not a terminal, a loop
that has run for ``first`` seconds writes one line such as
``fxdeco calibrating: 12/40 (30%), 31s`` and another every ``every`` seconds.
Short loops print nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")


def length_of(iterable: Any) -> int | None:
    """``len(iterable)`` when it has one (a list, a DataLoader), else None (a generator).

    Example:
        >>> length_of([1, 2, 3]), length_of(x for x in [1])
        (3, None)
    """
    try:
        return len(iterable)
    except TypeError:  # no __len__, or an IterableDataset's DataLoader
        return None


class Progress:
    """Progress of one loop of ``total`` steps (None: unknown), updated with :meth:`update`.

    ``enabled``: True for a tqdm bar wherever stderr goes, False for nothing, None
    (default) for a bar on a terminal and periodic lines elsewhere.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> p = Progress("calibrating", total=4, enabled=None, stream=out, first=0.0, every=0.0)
        >>> for _ in range(4):
        ...     p.update(loss=0.5)
        >>> p.close()
        >>> out.getvalue().splitlines()[-1].split(",")[0]
        'fxdeco calibrating: 4/4 (100%)'
    """

    def __init__(self, desc: str, total: int | None = None, enabled: bool | None = None, *,
                 stream: Any = None, first: float = 10.0, every: float = 30.0) -> None:
        self.desc, self.total, self.done = desc, total, 0
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        self.lines = False
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
            self.lines = not enabled
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc=desc, leave=False, file=self.stream)
            except ImportError:  # tqdm is optional: periodic lines instead
                self.lines = True
        self.start = time.perf_counter()
        self.next_line = self.start + first
        self.every = every

    def update(self, n: int = 1, **values: float) -> None:
        """Count ``n`` more steps; ``values`` (a loss, ...) are shown beside the count."""
        self.done += n
        if self.bar is not None:
            if values:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
            self.bar.update(n)
        elif self.lines and time.perf_counter() >= self.next_line:
            self._line(values)
            self.next_line = time.perf_counter() + self.every

    def _line(self, values: dict[str, float]) -> None:
        count = f"{self.done}/{self.total} ({100 * self.done / self.total:.0f}%)" if self.total else f"{self.done}"
        shown = "".join(f", {k} {v:.4g}" for k, v in values.items())
        self.stream.write(f"fxdeco {self.desc}: {count}, {time.perf_counter() - self.start:.0f}s{shown}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress(iterable: Iterable[T], desc: str, total: int | None = None, enabled: bool | None = None) -> Iterator[T]:
    """Iterate ``iterable`` while showing :class:`Progress` (``total`` defaults to its length, when it has one).

    Example:
        >>> list(progress([1, 2, 3], "counting", enabled=False))
        [1, 2, 3]
    """
    shown = Progress(desc, total if total is not None else length_of(iterable), enabled)
    try:
        for item in iterable:
            yield item
            shown.update()
    finally:
        shown.close()
