"""Progress bars for long loops: tqdm on a terminal, silent otherwise."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, enabled: bool | None = None) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar when ``enabled`` (default: stderr is a terminal)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iter(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar, same loop
        return iter(iterable)
    return iter(tqdm(iterable, desc=desc, total=total, leave=False))
