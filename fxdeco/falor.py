"""falor (Features Are LOw Rank), local mode.

Every layer gets the smallest rank whose *layer-output* noise-to-signal ratio
stays under ``nsr_threshold``. The NSR of all ranks comes in closed form from
one eigen-decomposition of the layer's output second moment (see
``fxdeco.lowrank``), so no forward pass is spent per candidate rank.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable

import torch

from fxdeco.lowrank import centred_bias, nsr_by_rank, projection_factors, spectrum
from fxdeco.plan import LayerDecision, check_fraction, decision, matches_any, unique_targets
from fxdeco.progress import progress
from passes import Factorization, Site, SiteStatistics
from passes.sites import fetch_attr

log = logging.getLogger(__name__)


def smallest_rank(nsr: torch.Tensor, threshold: float, min_rank: int, full_rank: int) -> int:
    """Smallest ``k`` in ``[min_rank, full_rank]`` with ``nsr[k] <= threshold`` (full rank otherwise)."""
    candidates = torch.nonzero(nsr[min_rank: full_rank + 1] <= threshold)
    return min_rank + int(candidates[0]) if len(candidates) else full_rank


def check_options(
    *,
    nsr_threshold: float = 0.02,
    damping: float = 0.0,
    min_rank: int = 1,
    proportion_threshold: float = 1.0,
    skip: Iterable[str] = (),
    center: bool = True,
    show_progress: bool | None = None,
) -> None:
    """Validate falor's options, raising ValueError/TypeError that names the option.

    Separate from :func:`falor_local` so ``fxdeco.transform`` can reject a bad
    option before spending time on calibration.

    Example:
        >>> check_options(nsr_threshold=0.0)
        Traceback (most recent call last):
        ...
        ValueError: nsr_threshold must be a number in (0.0, inf], got 0.0
    """
    check_fraction("nsr_threshold", nsr_threshold, high=math.inf)
    check_fraction("proportion_threshold", proportion_threshold)
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping < 0 or math.isnan(damping):
        raise ValueError(f"damping must be a number >= 0, got {damping!r}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, (int, float)) or int(min_rank) != min_rank \
            or min_rank < 1:
        raise ValueError(f"min_rank must be a positive integer, got {min_rank!r}")
    if isinstance(skip, str):  # a bare string would be read as one pattern per character
        raise TypeError(f"skip must be a list of glob patterns, got the string {skip!r}; write skip=[{skip!r}]")


def falor_local(
    gm: torch.fx.GraphModule,
    sites: Iterable[Site],
    statistics: dict[str, SiteStatistics],
    *,
    nsr_threshold: float = 0.02,
    damping: float = 0.0,
    min_rank: int = 1,
    proportion_threshold: float = 1.0,
    skip: Iterable[str] = (),
    center: bool = True,
    show_progress: bool | None = None,
) -> tuple[dict[str, Factorization], list[LayerDecision]]:
    """Plan the factorization of every site from its statistics.

    A layer is factorized at rank ``k`` only when ``k`` reduces its parameters
    (``k * (in + out) < in * out``) and ``k / full_rank <= proportion_threshold``;
    layers whose qualified name matches a ``skip`` glob are kept dense. With
    ``center`` (default) the covariance is decomposed and the mean of the
    discarded directions folded into the bias (see ``fxdeco.lowrank``).

    Example:
        >>> import fxdeco, torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> prepared = fxdeco.prepare(model)
        >>> _ = torch.manual_seed(0)
        >>> _ = prepared(torch.randn(64, 32) @ torch.randn(32, 32).tril(-28))  # rank-4 data
        >>> plan, decisions = falor_local(prepared.gm, prepared.sites, prepared.statistics, nsr_threshold=1e-6)
        >>> decisions[0].rank
        4
    """
    check_options(nsr_threshold=nsr_threshold, damping=damping, min_rank=min_rank,
                  proportion_threshold=proportion_threshold, skip=skip)
    skip = tuple(skip)
    plan: dict[str, Factorization] = {}
    decisions: list[LayerDecision] = []
    for site in progress(unique_targets(sites), desc="falor", enabled=show_progress):
        stats = statistics[site.target]
        if matches_any(site.target, skip):
            decisions.append(decision(site, stats, None, None, "skipped by pattern"))
            continue
        spec = spectrum(stats, damping, center)
        nsr = nsr_by_rank(spec)
        rank = smallest_rank(nsr, nsr_threshold, min(int(min_rank), site.full_rank), site.full_rank)
        estimate = float(nsr[rank])
        if rank * (site.in_features + site.out_features) >= site.in_features * site.out_features:
            decisions.append(decision(site, stats, None, None, f"rank {rank} would not reduce parameters"))
        elif rank / site.full_rank > proportion_threshold:
            decisions.append(decision(site, stats, None, None,
                                      f"rank {rank}/{site.full_rank} above proportion_threshold"))
        else:
            first, second = projection_factors(site, fetch_attr(gm, site.weight), spec, rank)
            bias = centred_bias(spec, fetch_attr(gm, site.bias) if site.bias else None, rank)
            plan[site.target] = Factorization(first, second, {"nsr": estimate}, bias)
            decisions.append(decision(site, stats, rank, estimate, "decomposed", adds_bias=bias is not None))
        log.debug("%s: rank %d/%d, nsr %.4g", site.target, rank, site.full_rank, estimate)
    return plan, decisions
