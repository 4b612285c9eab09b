"""What a decomposition held in memory: the process's peak, the device's peak, the statistics' sums.

Recorded in each decomposed model's summary (``ModelRecord.summary["memory"]``) and shown by
:func:`fxdeco.report`, so a user scaling up sees what bounded the run.

Example:
    >>> figures = memory_figures(statistics=2 ** 20)
    >>> figures["statistics_bytes"], figures["peak_host_bytes"] > 0
    (1048576, True)
"""

from __future__ import annotations

import gc
import resource
import sys
from typing import Any, Iterable

import torch

from passes import SiteStatistics


def peak_host_bytes() -> int:
    """This process's peak resident memory so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def free_reference_cycles() -> None:
    """A full garbage collection, made where ``fxdeco.decompose_`` frees the caller's dense weights.

    Captures leave reference cycles that hold the model's parameters: those
    of torch.export (fake tensors, tracing contexts) and of a symbolic trace
    that failed, and every GraphModule (its graph points back to it). They go
    only at Python's next full collection, which may come much later. While
    they live, a dense layer swapped out for its factored form keeps its
    weights: block by block in place, an exported LLaMA of hidden 1024 grew by
    15 MB per block, none of the dense weights freed. A full collection costs
    about 0.2 s, so it is made there (after the capture, and once a one-shot
    ``decompose_`` is done), not after every capture.
    """
    gc.collect()


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
