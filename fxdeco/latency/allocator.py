"""The C allocator's share of a CPU model's time: page faults on memory handed back to the OS.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a
large request (over its mmap threshold: 128 KiB, raised adaptively up to
32 MiB) with fresh pages from the OS and returns them when the tensor is freed,
so a model whose activations are large faults every page of them in, zeroed by
the kernel, on every call. Measured on this project's 2-core CPU, float32,
eager (``/tmp`` scripts, glibc 2.36):

============================  ================  ==========================
model, batch                  glibc defaults    freed memory held (below)
============================  ================  ==========================
Fashion-MNIST CNN, 256        61 ms, 25k faults 34 ms, 0 faults per call
torchvision resnet18, 16      247 ms, 64k       173 ms, 0
Fashion-MNIST ViT, 256        119 ms, 16k       101 ms, 157
timm deit_small, 16           750 ms, 0         753 ms, 0
============================  ================  ==========================

That time is the allocator's, not the layers': factoring a layer does not
reduce it (its intermediate activation adds to it), and whether a call faults
depends on the allocator's history in the process (the CNN measured 34-57 ms
per call in different runs of one benchmark), which makes the timings a latency
budget is planned on noisy. :func:`hold_freed_memory` (glibc) or running under
jemalloc / tcmalloc (``LD_PRELOAD``; PyTorch's CPU performance tuning guide
recommends them) keeps freed memory in the process; it is a setting of the
process that serves the model, so it belongs where the model is deployed as
much as where it is decomposed.

Example:
    >>> faults = page_faults(lambda: torch.zeros(1024).sum())
    >>> faults is None or faults >= 0
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

# Seconds one minor page fault costs, including the kernel zeroing the page (25k faults were 27 ms of the CNN's
# 61 ms above): used only to say how much of a call's time the faults may be.
FAULT_SECONDS = 1.1e-6
# The share of a call's time in page faults (estimated with FAULT_SECONDS) from which a latency plan warns.
FAULT_SHARE_WARN = 0.05
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Whether hold_freed_memory() has changed this process's allocator (what allocator_tag reports).
_held = False


def page_faults(fn: Callable[[], Any], calls: int = 2) -> float | None:
    """Minor page faults per call of ``fn``: the fewest over ``calls`` calls (call it warmed up); None where the
    platform does not count them (no :mod:`resource`, as on Windows).

    Counted for the whole process (``getrusage``), so another thread allocating
    at the same time adds to it; the fewest over calls discards that.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    fewest = None
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        fewest = faults if fewest is None else min(fewest, faults)
    return float(fewest) if fewest is not None else None


def fault_share(faults: float | None, seconds: float) -> float:
    """The share of a call of ``seconds`` that ``faults`` page faults may take (estimated, at
    :data:`FAULT_SECONDS` each; 0 when not counted).

    Example:
        >>> round(fault_share(25_000, 0.061), 2), fault_share(None, 1.0)
        (0.45, 0.0)
    """
    return 0.0 if not faults or seconds <= 0 else min(1.0, faults * FAULT_SECONDS / seconds)


def fault_advice(faults: float, seconds: float, what: str = "the original model") -> str:
    """The warning a latency plan gives when ``what`` page-faults for a good share of its ``seconds`` per call."""
    return (f"each call of {what} page-faults {faults:,.0f} times ({faults * 4096 / 2**20:,.0f} MiB of fresh "
            f"memory from the OS, about {fault_share(faults, seconds):.0%} of its {seconds * 1e3:.3g} ms): the C "
            "allocator hands large activations back to the OS after every call. That time is not the layers', "
            "factoring does not save it, and it varies with the allocator's history, so the timings a latency plan "
            "is chosen on are noisy. Call fxdeco.latency.hold_freed_memory() at the start of the process (glibc), "
            "or run under jemalloc or tcmalloc, here and where the model is deployed")


def hold_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory in the process (no mmap threshold, no trimming), so that large
    tensors reuse pages already faulted in instead of taking fresh ones from the OS on every call.

    Applies to the whole process from now on, for allocations made after the
    call (what the process holds grows to its peak and stays there). Returns
    False, changing nothing, where the C library is not glibc (macOS, musl,
    Windows, or jemalloc / tcmalloc preloaded, which hold freed memory
    already). The same as starting Python with ``MALLOC_MMAP_THRESHOLD_=1073741824
    MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment.

    Example (at the start of the process that times or serves a model; not run here, it would change the test
    process's allocator)::

        >>> import fxdeco.latency
        >>> fxdeco.latency.hold_freed_memory()  # doctest: +SKIP
        True
    """
    libc = _glibc()
    if libc is None:
        return False
    global _held
    held = bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(2**30))) and \
        bool(libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)))
    _held = _held or held
    log.info("fxdeco: glibc malloc now keeps freed memory in the process (%s)", "done" if held else "refused")
    return held


def _glibc() -> Any | None:
    """The C library, when it is glibc (its ``gnu_get_libc_version`` and ``mallopt`` are present)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - absent from any other C library
        return libc if hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


def faults_of_call(model: Callable[..., Any], call: tuple[tuple, dict[str, Any]]) -> float | None:
    """Page faults per call of ``model`` on ``call`` (``(args, kwargs)``), without gradients (warm it up first)."""
    args, kwargs = call
    with torch.no_grad():
        return page_faults(lambda: model(*args, **kwargs))


def allocator_tag() -> str:
    """How this process allocates CPU memory, when not with the C library's defaults ("" when it does): part of a
    CPU layer timing's cache key (:class:`fxdeco.latency.LatencyKey`), since the same layer runs at a different
    speed under another allocator setting and a table measured under one must not be reused under the other.

    Seen: a preloaded jemalloc / tcmalloc / mimalloc, :func:`hold_freed_memory`, and glibc's thresholds set in the
    environment (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``). Other ways (an
    ``mallopt`` call elsewhere) are not.

    Example:
        >>> isinstance(allocator_tag(), str)
        True
    """
    preloaded = _preloaded_allocator()
    if preloaded:
        return preloaded
    if _held:
        return "malloc holding freed memory"
    settings = [f"{name}={os.environ[name]}" for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
                if name in os.environ]
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        settings.append(f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}")
    return " ".join(settings)


def describe_allocator() -> str:
    """How this process allocates CPU memory, for a printed timing.

    Example:
        >>> describe_allocator().startswith("C allocator: ")
        True
    """
    return f"C allocator: {allocator_tag() or 'defaults'}"


@functools.cache
def _preloaded_allocator() -> str:
    """The name of a replacement malloc mapped into this process (Linux: /proc/self/maps), or ""."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return ""
    return next((name for name in ("jemalloc", "tcmalloc", "mimalloc") if f"lib{name}" in maps), "")
