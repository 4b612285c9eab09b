"""What a decomposition held in memory: the process's peak, the device's peak, the statistics' sums.

Recorded in each decomposed model's summary (``ModelRecord.summary["memory"]``) and shown by
:func:`fxdeco.report`, so a user scaling up sees what bounded the run.

Example:
    >>> figures = memory_figures(statistics=2 ** 20)
    >>> figures["statistics_bytes"], figures["peak_host_bytes"] > 0
    (1048576, True)
"""

from __future__ import annotations

import resource
import sys
from typing import Any, Iterable

import torch

from passes import SiteStatistics


def peak_host_bytes() -> int:
    """This process's peak resident memory so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_device_bytes() -> int | None:
    """The CUDA caching allocator's peak on the current device, or None when CUDA was not used."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())


def statistics_bytes(sums: Iterable[SiteStatistics], moments: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the float64 sums held (second moments, means) and of any gradient moments."""
    total = sum(s.shifted_outer.numel() * 8 + s.shifted_sum.numel() * 8 for s in sums)
    return int(total + sum(m.numel() * m.element_size() for m in moments))


def memory_figures(statistics: int) -> dict[str, Any]:
    """The summary entry: the peaks now and the statistics' bytes (held at once, at most)."""
    return {"peak_host_bytes": peak_host_bytes(), "peak_device_bytes": peak_device_bytes(),
            "statistics_bytes": int(statistics)}
