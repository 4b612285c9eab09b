"""Measure every site's latency on this device: dense, and factored at candidate ranks.

:func:`probe_sites` runs the graph once on an example batch to learn each
site's input shape, then times stand-ins of each layer (same geometry, dtype,
device, input shape; random weights) dense and factored, all variants of a
layer interleaved in one run (:func:`~fxdeco.latency.timing.interleaved_medians`)
so that they share the machine's noise. Results go into a
:class:`~fxdeco.latency.table.LatencyTable`: layers of the same shape are timed
once, and a later probe of any model with those shapes times nothing.

:func:`refine` measures more ranks of a layer later (near a rank a budget
chose, say). New ranks are timed beside the dense layer again and scaled by
the ratio of its stored time to its new time, so that ranks measured at
different moments stay comparable on a machine whose load changes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx

from fxdeco.latency.curve import SiteLatency
from fxdeco.latency.inputs import site_inputs
from fxdeco.latency.layers import dense_layer, example_input, factored_layer, runner
from fxdeco.latency.table import LatencyKey, LatencyTable, PathArg
from fxdeco.latency.timing import as_device, interleaved_medians
from fxdeco.progress import progress
from passes.sites import Site, fetch_attr

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TimingOptions:
    """How hard to time each layer shape: rounds, warm-up calls, the length of one sample, and a time budget.

    ``budget_s`` bounds the timed rounds of one layer shape (all its ranks
    together): after that long no new round starts once ``min_repeats`` are
    done. Warm-up, loop calibration and (with inductor) compilation come on top.

    Example:
        >>> TimingOptions(repeats=3).repeats
        3
    """

    repeats: int = 7
    warmup: int = 2
    min_sample_s: float = 0.005
    budget_s: float = 1.0
    min_repeats: int = 3


def max_saving_rank(site: Site) -> int:
    """The largest rank at which the factors have fewer parameters than the weight: ``r * (in + out) < in * out``.

    0 when no rank saves parameters (a layer with a side of 1).

    Example:
        >>> from torch import nn
        >>> from passes.sites import find_sites
        >>> sites, _ = find_sites(torch.fx.symbolic_trace(nn.Sequential(nn.Linear(1024, 1024), nn.Linear(3, 1))))
        >>> [max_saving_rank(s) for s in sites]
        [511, 0]
    """
    n_in, n_out = site.in_features, site.out_features
    return min(site.full_rank, math.ceil(n_in * n_out / (n_in + n_out)) - 1)


def default_ranks(site: Site, count: int = 7) -> list[int]:
    """A geometric grid of about ``count`` ranks from 1 to :func:`max_saving_rank` (fewer for small layers).

    Example:
        >>> from torch import nn
        >>> from passes.sites import find_sites
        >>> sites, _ = find_sites(torch.fx.symbolic_trace(nn.Sequential(nn.Linear(1024, 1024), nn.Linear(8, 4))))
        >>> default_ranks(sites[0]), default_ranks(sites[1])
        ([1, 3, 8, 23, 64, 181, 511], [1, 2])
    """
    top = max_saving_rank(site)
    if top < 1:
        return []
    if count <= 1:
        return [top]
    return sorted({max(1, min(top, round(top ** (i / (count - 1))))) for i in range(count)})


def site_key(site: Site, gm: torch.fx.GraphModule, input_shape: Sequence[int], backend: str = "eager",
             channels_last: bool = False) -> tuple[LatencyKey, torch.device]:
    """The latency key of ``site`` in ``gm`` called on an input of ``input_shape``, and the device of its weight.

    Example:
        >>> from passes.sites import find_sites
        >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(3, 2))
        >>> key, device = site_key(find_sites(gm)[0][0], gm, (5, 3))
        >>> key.kind, key.weight_shape, key.input_shape, key.bias, device
        ('linear', (2, 3), (5, 3), True, device(type='cpu'))
    """
    weight = fetch_attr(gm, site.weight)
    geometry: dict[str, Any] = {}
    if site.kind == "conv2d":
        geometry = {"stride": site.stride, "padding": site.padding, "dilation": site.dilation,
                    "channels_last": channels_last}
    key = LatencyKey.here(weight.device, weight.dtype, backend, kind=site.kind, weight_shape=site.weight_shape,
                          input_shape=tuple(input_shape), bias=site.bias is not None, **geometry)
    return key, weight.device


def as_table(table: LatencyTable | PathArg) -> LatencyTable:
    """``table`` itself, or a :class:`LatencyTable` at that path (True: the default cache; None/False: in memory).

    Example:
        >>> as_table(None)
        LatencyTable(0 keys, in memory)
    """
    return table if isinstance(table, LatencyTable) else LatencyTable(table)


def measure_key(key: LatencyKey, ranks: Iterable[int], table: LatencyTable, *,
                device: torch.device | str = "cpu", options: TimingOptions = TimingOptions()) -> bool:
    """Time what ``table`` lacks of ``key`` (the dense layer, the factored form at ``ranks``); True if it timed.

    When the dense time is already known, the dense layer is timed again
    beside the new ranks and their times are scaled by stored / new dense
    time, to stay comparable with the ranks measured before.

    Example:
        >>> key = LatencyKey.here("cpu", torch.float32, "eager", kind="linear", weight_shape=(16, 16),
        ...                       input_shape=(4, 16))
        >>> table = LatencyTable(None)
        >>> fast = TimingOptions(repeats=1, warmup=0, min_sample_s=0.0, min_repeats=1)
        >>> measure_key(key, [2, 4], table, options=fast), sorted(table.get(key).factored)
        (True, [2, 4])
        >>> measure_key(key, [4], table, options=fast)   # known already: nothing is run
        False
    """
    need_dense, ranks = table.missing(key, ranks)
    if not need_dense and not ranks:
        return False
    device = as_device(device)
    x = example_input(key, device)
    fns: dict[str, Callable[[], object]] = {"dense": runner(dense_layer(key, device), x, key.backend)}
    for r in ranks:
        fns[f"rank {r}"] = runner(factored_layer(key, r, device), x, key.backend)
    with torch.inference_mode():
        for fn in fns.values():  # compile (inductor) and allocate before timing
            fn()
    start = time.perf_counter()
    times = interleaved_medians(fns, repeats=options.repeats, warmup=options.warmup,
                                min_sample_s=options.min_sample_s, device=device, max_time_s=options.budget_s,
                                min_repeats=options.min_repeats)
    dense = times["dense"]
    scale = 1.0 if need_dense else table.dense(key) / dense  # type: ignore[operator]
    factored = {r: times[f"rank {r}"] * scale for r in ranks}
    log.debug("%s: dense %.3g s, factored %s (%.2f s)", key, dense,
              {r: f"{t:.3g}" for r, t in factored.items()}, time.perf_counter() - start)
    table.record(key, dense=dense if need_dense else None, factored=factored)
    return True


def _latency(target: str, full_rank: int | None, keys: Sequence[LatencyKey], device: torch.device, table: LatencyTable,
             ranks: Iterable[int]) -> SiteLatency:
    """A layer's :class:`SiteLatency` from the table: each time summed over the layer's calls."""
    dense = sum(table.dense(k) for k in keys)  # type: ignore[misc]
    measured: dict[int, float] = {}
    for r in sorted(set(ranks)):
        times = [table.factored(k, r) for k in keys]
        if all(t is not None for t in times):
            measured[r] = sum(times)  # type: ignore[arg-type]
    return SiteLatency(target, dense, measured, full_rank, tuple(keys), str(device), table)


def probe_sites(
    gm: torch.fx.GraphModule,
    sites: Sequence[Site],
    example_args: Any,
    ranks_for: Callable[[Site], Sequence[int]] | None = None,
    *,
    backend: str = "eager",
    table: LatencyTable | PathArg = True,
    options: TimingOptions = TimingOptions(),
    show_progress: bool | None = None,
    flat_inputs: list[Any] | None = None,
) -> dict[str, SiteLatency]:
    """Measured latency of every site of ``gm``, by target: dense, and factored at ``ranks_for(site)``.

    ``example_args`` is one batch as calibration takes it (a tensor, a tuple of
    positional inputs, or a dict of keyword inputs; or None with ``flat_inputs``, the
    placeholder values as ``passes.inputs.flatten_inputs`` gives them); its shapes, and the
    weights' dtype and device, are the ones timed, at the current
    ``torch.get_num_threads()``. ``ranks_for`` defaults to
    :func:`default_ranks`. ``table`` is a :class:`LatencyTable` or where to
    keep one (True: the default cache file; None/False: memory only). Layers
    with the same key are timed once; what the table already holds is not
    timed again. ``options`` bounds the time spent per layer shape.

    ``gm`` is not modified (it runs once, in eval mode). A layer called at
    several nodes adds up all its calls.

    Example:
        >>> from torch import nn
        >>> from passes.sites import find_sites
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)))
        >>> sites, _ = find_sites(gm)
        >>> fast = TimingOptions(repeats=1, warmup=0, min_sample_s=0.0, min_repeats=1)
        >>> lat = probe_sites(gm, sites, torch.randn(8, 32), lambda s: [4, 8], table=None, options=fast)
        >>> sorted(lat), lat["0"].ranks, lat["0"].keys == lat["2"].keys
        (['0', '2'], [4, 8], True)
    """
    sites = list(sites)
    table = as_table(table)
    ranks_for = ranks_for or default_ranks
    inputs = site_inputs(gm, sites, example_args, flat_inputs=flat_inputs)
    by_target: dict[str, list[Site]] = defaultdict(list)
    for s in sites:
        if s.node not in inputs:
            log.warning("site %s (node %s) received no tensor input on the example batch; not timed", s.target, s.node)
            continue
        by_target[s.target].append(s)

    plans: dict[str, tuple[list[LatencyKey], torch.device, list[int], int]] = {}
    jobs: dict[LatencyKey, tuple[set[int], torch.device]] = {}
    for target, group in by_target.items():
        ranks = sorted({int(r) for r in ranks_for(group[0])})
        if ranks and ranks[0] < 1:
            raise ValueError(f"{target}: ranks must be >= 1, got {ranks}")
        keys = []
        for s in group:
            found = inputs[s.node]
            key, device = site_key(s, gm, found.shape, backend, found.channels_last)
            keys.append(key)
            job_ranks, _ = jobs.setdefault(key, (set(), device))
            job_ranks.update(ranks)
        plans[target] = (keys, device, ranks, group[0].full_rank)

    todo = [(k, r, d) for k, (r, d) in jobs.items() if table.missing(k, r) != (False, [])]
    start = time.perf_counter()
    for key, ranks, device in progress(todo, desc="timing layers", enabled=show_progress):
        measure_key(key, ranks, table, device=device, options=options)
    if todo:
        log.info("timed %d layer shapes in %.1f s (%d already in %r)", len(todo), time.perf_counter() - start,
                 len(jobs) - len(todo), table)
    return {target: _latency(target, full_rank, keys, device, table, ranks)
            for target, (keys, device, ranks, full_rank) in plans.items()}


def refine(latency: SiteLatency, ranks: Iterable[int], *, table: LatencyTable | None = None,
           options: TimingOptions = TimingOptions()) -> SiteLatency:
    """``latency`` with ``ranks`` measured too (those already measured are not timed again).

    Measurements go into ``table`` (default: the table ``latency`` came from).

    Example:
        >>> key = LatencyKey.here("cpu", torch.float32, "eager", kind="linear", weight_shape=(16, 16),
        ...                       input_shape=(4, 16))
        >>> fast = TimingOptions(repeats=1, warmup=0, min_sample_s=0.0, min_repeats=1)
        >>> lat = SiteLatency("fc", 1e-5, {}, 16, (key,), "cpu", LatencyTable(None))
        >>> refine(lat, [4, 6], options=fast).ranks
        [4, 6]
    """
    table = table if table is not None else latency.table
    if table is None:
        raise ValueError(f"{latency.target}: no latency table to refine into; pass table=")
    if not latency.keys:
        raise ValueError(f"{latency.target}: this SiteLatency has no keys (it was not made by probe_sites)")
    ranks = sorted({int(r) for r in ranks} | set(latency.measured))
    if ranks and ranks[0] < 1:
        raise ValueError(f"{latency.target}: ranks must be >= 1, got {ranks}")
    for key in dict.fromkeys(latency.keys):
        measure_key(key, ranks, table, device=latency.device, options=options)
    return _latency(latency.target, latency.full_rank, latency.keys, as_device(latency.device), table, ranks)

