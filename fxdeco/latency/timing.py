"""Robust wall-clock timing of several callables at once: interleaved rounds, medians.

Timing one callable after another lets drift (CPU frequency, another process
waking up, a GPU warming) hit one of them and not the others. Here every
round runs each callable once, in a rotating order, so noise falls on all of
them alike, and the median over rounds discards the rounds it spoiled.

Each sample runs a callable in a loop long enough (``min_sample_s``) for the
clock's resolution and the loop's overhead not to matter; the loop count is
calibrated once per callable after warm-up. CUDA work is asynchronous, so on a
CUDA device the clock is read only after ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping

import torch

log = logging.getLogger(__name__)


def as_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a ``torch.device``; None is the CPU.

    Example:
        >>> as_device(None), as_device("cpu")
        (device(type='cpu'), device(type='cpu'))
    """
    return torch.device("cpu") if device is None else torch.device(device)


def device_name(device: torch.device | str | None = None) -> str:
    """A readable name of the hardware behind ``device``: ``cpu:<processor model>`` or ``cuda:<GPU name>``.

    Two machines with the same name are taken to run a layer equally fast (the
    thread count is recorded separately).

    Example:
        >>> device_name("cpu").startswith("cpu:")
        True
    """
    device = as_device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu:{_cpu_model()}"
    return device.type


@functools.cache
def _cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux, where ``platform.processor()`` is often empty)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def synchronizer(device: torch.device | str | None) -> Callable[[], None]:
    """What to call before reading the clock: ``torch.cuda.synchronize`` on CUDA, nothing elsewhere.

    Example:
        >>> synchronizer("cpu")()
    """
    device = as_device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Keep the garbage collector from running inside timed loops (as ``timeit`` does)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _time_loop(fn: Callable[[], object], loops: int, sync: Callable[[], None]) -> float:
    """Seconds for ``loops`` calls of ``fn``, all queued work finished."""
    sync()
    start = time.perf_counter()
    for _ in range(loops):
        fn()
    sync()
    return time.perf_counter() - start


def _calibrate(fn: Callable[[], object], min_sample_s: float, sync: Callable[[], None]) -> int:
    """The loop count for which one sample of ``fn`` lasts at least ``min_sample_s``."""
    loops = 1
    while True:
        elapsed = _time_loop(fn, loops, sync)
        if elapsed >= min_sample_s or loops >= 1 << 20:
            return loops
        # aim 20% past the target, at most 100x more at a step (a first call can be unusually fast)
        wanted = math.ceil(loops * 1.2 * min_sample_s / max(elapsed, 1e-9))
        loops = max(loops + 1, min(wanted, loops * 100))


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]],
    *,
    repeats: int = 7,
    warmup: int = 2,
    min_sample_s: float = 0.005,
    device: torch.device | str | None = None,
    max_time_s: float | None = None,
    min_repeats: int = 3,
) -> dict[str, float]:
    """Seconds per call of each callable in ``fns``: the median over ``repeats`` interleaved rounds.

    Each callable is first called ``warmup`` times, then its loop count is
    calibrated so that one sample lasts at least ``min_sample_s``. Each round
    then takes one sample of every callable, in an order rotated from round
    to round. Everything runs under ``torch.inference_mode()`` with the garbage
    collector paused; on a CUDA ``device`` the clock is read after
    ``torch.cuda.synchronize``.

    ``max_time_s`` bounds the rounds: once that much time has gone into them,
    no new round starts after ``min_repeats`` have been taken (warm-up and
    calibration are not bounded: a callable must run at least that often).

    Example:
        >>> t = interleaved_medians({"nothing": lambda: None, "sum": lambda: sum(range(1000))},
        ...                         repeats=3, min_sample_s=1e-4)
        >>> sorted(t), all(seconds >= 0 for seconds in t.values())
        (['nothing', 'sum'], True)
    """
    if repeats < 1 or warmup < 0 or min_sample_s < 0:
        raise ValueError(f"need repeats >= 1, warmup >= 0, min_sample_s >= 0; got {repeats}, {warmup}, {min_sample_s}")
    names = list(fns)
    if not names:
        return {}
    sync = synchronizer(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode(), _gc_paused():
        for name in names:
            for _ in range(warmup):
                fns[name]()
        loops = {name: _calibrate(fns[name], min_sample_s, sync) for name in names}
        start = time.perf_counter()
        for round_ in range(repeats):
            if (max_time_s is not None and round_ >= min_repeats
                    and time.perf_counter() - start >= max_time_s):
                log.debug("timing stopped after %d of %d rounds (max_time_s=%s)", round_, repeats, max_time_s)
                break
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(_time_loop(fns[name], loops[name], sync) / loops[name])
    return {name: statistics.median(samples[name]) for name in names}
