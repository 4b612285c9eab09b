"""Latency measured on the user's device: per-layer lookup tables for rank budgets and acceptance.

* ``timing.py``: :func:`interleaved_medians`, robust timing of several callables at once; :func:`device_name`.
* ``table.py``: :class:`LatencyKey` (hardware, software, dtype, threads, backend, layer, input shape) and
  :class:`LatencyTable`, the measurements cached in one JSON file (``$FXDECO_CACHE_DIR/latency.json``).
* ``curve.py``: :class:`SiteLatency`, one layer's dense time and factored time by rank (interpolated).
* ``inputs.py``: :func:`site_inputs`, the input shape of every site on an example batch.
* ``layers.py``: the dense and factored stand-in layers that are timed.
* ``probe.py``: :func:`probe_sites` (time every site of a graph), :func:`refine` (more ranks later).
* ``graph.py``: :func:`measure_model`, :func:`compare_models`, and the additive :func:`predict_latency`.
* ``allocator.py``: :func:`page_faults` (the C allocator's share of a CPU model's time) and
  :func:`hold_freed_memory` (glibc: keep freed memory in the process, so large activations stop faulting).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from passes.sites import find_sites
    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(64, 64)))
    >>> sites, _ = find_sites(gm)
    >>> quick = TimingOptions(repeats=1, warmup=0, min_sample_s=0.0, min_repeats=1)
    >>> lat = probe_sites(gm, sites, torch.randn(16, 64), table=None, options=quick)["0"]
    >>> lat.ranks, lat.dense > 0
    ([1, 2, 3, 6, 10, 17, 31], True)
"""

from fxdeco.latency.allocator import hold_freed_memory, page_faults
from fxdeco.latency.curve import RankTime, SiteLatency
from fxdeco.latency.graph import compare_models, measure_model, predict_latency, rest_seconds
from fxdeco.latency.inputs import SiteInput, site_inputs
from fxdeco.latency.probe import TimingOptions, default_ranks, max_saving_rank, probe_sites, refine
from fxdeco.latency.table import LatencyKey, LatencyTable, default_path
from fxdeco.latency.timing import device_name, interleaved_medians

__all__ = [
    "LatencyKey", "LatencyTable", "RankTime", "SiteInput", "SiteLatency", "TimingOptions", "compare_models",
    "default_path", "default_ranks", "device_name", "hold_freed_memory", "interleaved_medians", "max_saving_rank",
    "measure_model", "page_faults", "predict_latency", "probe_sites", "refine", "rest_seconds", "site_inputs",
]
