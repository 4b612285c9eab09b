"""Whole-model latency: measure models end to end, and predict a decomposed model's time from its layers'.

The prediction is additive::

    predicted = rest + sum(dense or factored time of each site)
    rest      = measured model time - sum(dense time of each site)   (measured once)

It ignores what layers do to each other's speed: caches warmed or flushed
by the neighbouring layer, a factored layer's extra activation traffic
between its two halves, fusion by a compiler, overlap of GPU kernels with
Python. It ranks choices of ranks cheaply; the chosen model is then to be
measured end to end (:func:`compare_models`) and the prediction corrected.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree

from fxdeco.batches import as_call
from fxdeco.latency.curve import SiteLatency
from fxdeco.latency.timing import interleaved_medians

log = logging.getLogger(__name__)


def input_device(example: Any) -> torch.device:
    """The device of the first tensor in a batch (the CPU when it holds none).

    Example:
        >>> input_device({"x": torch.ones(1)}), input_device(3)
        (device(type='cpu'), device(type='cpu'))
    """
    for leaf in pytree.tree_leaves(example):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")


def compare_models(models: Mapping[str, Callable[..., Any]], example_args: Any, *, repeats: int = 7,
                   warmup: int = 2, min_sample_s: float = 0.02, max_time_s: float | None = None) -> dict[str, float]:
    """Seconds per call of each model on the batch ``example_args``, all timed in one interleaved run.

    ``example_args`` is a tensor (the positional input), a tuple/list (the
    positional inputs) or a dict (the keyword inputs). Interleaving the
    models round by round (:func:`~fxdeco.latency.timing.interleaved_medians`)
    makes their times comparable even on a busy machine; CUDA is synchronised
    when the inputs are on CUDA. The models are called as they are (put them
    in eval mode first); nothing is modified.

    Example:
        >>> small, large = torch.nn.Linear(64, 8), torch.nn.Linear(64, 2048)
        >>> t = compare_models({"small": small, "large": large}, torch.randn(64, 64), repeats=3, min_sample_s=1e-3)
        >>> sorted(t), all(seconds > 0 for seconds in t.values())
        (['large', 'small'], True)
    """
    args, kwargs = as_call(example_args)
    fns = {name: functools.partial(_call, model, args, kwargs) for name, model in models.items()}
    return interleaved_medians(fns, repeats=repeats, warmup=warmup, min_sample_s=min_sample_s,
                               device=input_device((args, kwargs)), max_time_s=max_time_s)


def _call(model: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    return model(*args, **kwargs)


def measure_model(fn: Callable[..., Any], example_args: Any, **timing: Any) -> float:
    """Seconds per call of ``fn`` (a model, a GraphModule) on ``example_args``; options as :func:`compare_models`.

    Example:
        >>> measure_model(torch.nn.Linear(4, 4), torch.ones(2, 4), repeats=1, min_sample_s=1e-4) > 0
        True
    """
    return compare_models({"model": fn}, example_args, **timing)["model"]


def rest_seconds(model_seconds: float, site_latencies: Mapping[str, SiteLatency]) -> float:
    """The model's time outside its sites: ``model_seconds`` minus the dense time of every site (at least 0).

    A negative difference (the layers timed alone were slower than inside the
    model) is logged and read as 0.

    Example:
        >>> rest_seconds(10.0, {"a": SiteLatency("a", 3.0, {}), "b": SiteLatency("b", 4.0, {})})
        3.0
    """
    rest = model_seconds - sum(lat.dense for lat in site_latencies.values())
    if rest < 0:
        log.warning("the layers timed alone take %.3g s more than the whole model (%.3g s); the rest of the "
                    "graph is taken as 0 (on a CPU under glibc's default malloc, timing layers alone can page-fault "
                    "their outputs in on every call: fxdeco.latency.hold_freed_memory() avoids it)", -rest,
                    model_seconds)
    return max(rest, 0.0)


def predict_latency(rest_seconds: float, site_latencies: Mapping[str, SiteLatency],
                    ranks: Mapping[str, int | None]) -> float:
    """Predicted seconds per call: ``rest_seconds`` plus each site dense or, where ``ranks`` gives one, factored.

    ``ranks`` maps targets to a rank (factored) or None (dense); sites it
    leaves out stay dense. Additive: see the module's note on what it ignores.

    Example:
        >>> lat = {"a": SiteLatency("a", 3.0, {8: 1.0, 16: 2.0}), "b": SiteLatency("b", 4.0, {4: 1.0})}
        >>> predict_latency(2.0, lat, {"a": 12, "b": None})
        7.5
    """
    unknown = set(ranks) - set(site_latencies)
    if unknown:
        raise KeyError(f"ranks name layers without a latency measurement: {sorted(unknown)}")
    return rest_seconds + sum(lat.seconds(ranks.get(target)) for target, lat in site_latencies.items())
