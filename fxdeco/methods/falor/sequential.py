"""falor one block at a time (``Falor(sequential=True)``): bounded memory, errors compensated downstream.

Each block's layers are analysed on the outputs of the blocks already
decomposed (``fxdeco.sequential.BlockCalibration``), so a layer's factors fit
the inputs it will see in the decomposed model, and only one block's
statistics exist at once.

* local mode (``nsr_threshold``): each block's ranks in closed form, as one-shot.
* budget mode (``keep_params`` / ``keep_macs``): the budget holds for the whole
  model although no pass sees all layers' statistics at once. A first walk over
  the blocks, nothing decomposed, keeps only each layer's cost and layer-NSR
  curve (a vector per layer, not its statistics) and allocates the global
  budget across all layers with the knapsack; each block's share is what that
  allocation gave its layers. The second walk decomposes block by block on the
  compensated statistics, allocating the block's share again among its layers
  with their fresh curves. Cost: three forward passes per block instead of one.
  The curves are layer NSRs: the output-gradient weights of one-shot budget mode
  need a backward pass through the whole model, which a block walk does not have.
  A budget below what every layer at its smallest rank keeps is refused before
  the first walk, as one-shot refuses it after its first batch (MACs per sample:
  from the layers' output shapes on the first batch, which the cost pass kept).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Mapping

import torch

from fxdeco import distributed
from fxdeco.methods.falor.budget import LayerOptions, allocate
from fxdeco.methods.falor.config import Falor
from fxdeco.methods.falor.local import (_analyse, _Layer, _model_total, _threshold_ranks, budget_dense_reason,
                                        option_costs, plan_from_ranks, unreachable_budget)
from fxdeco.methods.falor.lowrank import output_projection
from fxdeco.metadata import original_totals
from fxdeco.plan import LayerDecision, matches_any, unique_targets
from fxdeco.prepared import model_macs
from fxdeco.sequential import BlockCalibration
from passes import Factorization, Site, SiteStatistics
from passes.replay import Override
from passes.sites import fetch_attr

log = logging.getLogger(__name__)


def _overrides(calibration: BlockCalibration, index: int, layers: list[_Layer],
               chosen: Mapping[str, int | str]) -> dict[str, Override]:
    """How the block's decomposed layers compute in the next boundary: each call's output projected as its factored
    form computes it (``lowrank.output_projection``)."""
    gm, by_target = calibration.gm, {layer.site.target: layer for layer in layers}
    return {s.node: output_projection(s, by_target[s.target].spec, fetch_attr(gm, s.bias).detach() if s.bias else None,
                                      chosen[s.target])
            for s in calibration.block_sites(index) if isinstance(chosen.get(s.target), int)}


def _options(layers: list[_Layer], config: Falor) -> tuple[list[LayerOptions], list[list[int | None]]]:
    """Each layer's cost dense and at every candidate rank, and its layer-NSR curve (the knapsack's input)."""
    measure, _ = config.budget
    options, ranks = [], []
    for layer in layers:
        candidates = config.candidate_ranks(layer.site)
        costs = option_costs(layer.site, layer.stats, candidates, measure, config.center)
        errors = [0.0] + [float(layer.nsr[k]) for k in candidates]
        options.append(LayerOptions(layer.site.target, torch.tensor(costs, dtype=torch.float64),
                                    torch.tensor(errors, dtype=torch.float64)))
        ranks.append([None, *candidates])
    return options, ranks


def _block_layers(calibration: BlockCalibration, index: int, statistics: Mapping[str, SiteStatistics],
                  config: Falor) -> tuple[list[Site], list[_Layer]]:
    targets = unique_targets(calibration.block_sites(index))
    kept = [s for s in targets if not matches_any(s.target, config.skip)]
    return targets, _analyse(calibration.gm, kept, dict(statistics), config)


@dataclasses.dataclass(frozen=True)
class _Rows:
    """A layer's rows per sample: all that ``option_costs`` reads of its statistics to count MACs."""

    rows_per_sample: float


def _first_batch_rows(calibration: BlockCalibration) -> dict[str, _Rows] | None:
    """Each layer's rows per sample as its statistics will count them (rows over batch elements, summed over its
    calls), from the output shapes the cost pass recorded on the first batch; None where a layer's shape is not
    known (the walk's allocation checks the budget then).

    Under torch.distributed the counts are summed over the ranks first, so every rank decides alike (one refusing
    alone would leave the others waiting in the next collective).
    """
    nodes = {n.name: n for n in calibration.gm.graph.nodes}
    counts: dict[str, tuple[float, float]] = {}  # target -> (rows, batch elements) over its calls
    unknown: set[str] = set()
    for site in calibration.sites:
        shape = getattr(nodes[site.node].meta.get("cost"), "shape", None)
        if not (isinstance(shape, tuple) and shape and all(isinstance(d, int) for d in shape)):
            unknown.add(site.target)
        first_call = site.target not in counts  # a batch's samples count once per layer, as its statistics count them
        rows, samples = counts.get(site.target, (0.0, 0.0))
        counts[site.target] = (0.0, 0.0) if site.target in unknown else \
            (rows + math.prod(shape) / site.out_features, samples + (shape[0] if first_call else 0))
    per_sample = distributed.means(list(counts.values()))  # NaN: no rank knows the layer's shape
    if any(math.isnan(r) for r in per_sample):
        return None
    return {target: _Rows(r) for target, r in zip(counts, per_sample)}


def check_reachable(calibration: BlockCalibration, config: Falor) -> None:
    """Raise :class:`BudgetError` before any block runs if the budget is below what every layer at its smallest
    candidate rank keeps (MACs: rows per sample of the first batch, see :func:`_first_batch_rows`; where those are
    not known, the first walk's allocation refuses it)."""
    if config.budget is None:
        return
    measure, keep = config.budget
    rows = _first_batch_rows(calibration) if measure == "macs" else {}
    if rows is None:
        return
    total = _model_total(calibration.gm, measure)
    floor = total
    for site in unique_targets(calibration.sites):
        if not matches_any(site.target, config.skip):
            costs = option_costs(site, rows.get(site.target), config.candidate_ranks(site), measure, config.center)
            floor -= costs[0] - min(costs)
    if floor > keep * total * (1 + 1e-12):
        raise unreachable_budget(measure, keep, floor, total)


def _block_shares(calibration: BlockCalibration, config: Falor) -> list[float]:
    """The first walk: each block's share of the global budget (see the module docstring)."""
    measure, keep = config.budget
    options: list[LayerOptions] = []
    owner: list[int] = []
    # MACs: the first batch's rest of the model, plus each block's layers on every batch's rows (as they are counted)
    macs = original_totals(calibration.gm).other_macs if measure == "macs" else None
    for index, block in enumerate(calibration.blocks):
        statistics = calibration.statistics(index, advance=True)
        targets, layers = _block_layers(calibration, index, statistics, config)
        block_options, _ = _options(layers, config)
        options += block_options
        owner += [index] * len(block_options)
        if macs is not None:
            macs = model_macs(macs, targets, statistics)
    if macs is not None:
        calibration.prepared.macs_per_sample = original_totals(calibration.gm).macs = macs
    total = _model_total(calibration.gm, measure)
    fixed = total - sum(float(o.costs[0]) for o in options)
    floor = fixed + sum(float(o.costs.min()) for o in options)
    if floor > keep * total * (1 + 1e-12):  # on every batch's rows: the first batch's check may have passed
        raise unreachable_budget(measure, keep, floor, total)
    choice = allocate(options, keep * total, fixed)
    shares = [0.0] * len(calibration.blocks)
    for o, i, block in zip(options, choice, owner):
        shares[block] += float(o.costs[i])
    log.info("falor sequential: block shares of the budget allocated from %d layers' curves", len(options))
    return shares


def falor_sequential(calibration: BlockCalibration, config: Falor,
                     on_block: Callable[[dict[str, Factorization]], None] | None = None
                     ) -> tuple[dict[str, Factorization], list[LayerDecision], dict[str, Any]]:
    """Plan every block in order on compensated statistics; return the plan, decisions and a summary.

    ``calibration`` must not have run any block yet. ``on_block``, when given, receives each block's plan once
    the walk is past the block (``fxdeco.decompose_`` factors it into the model then, so its dense weights are
    freed as the walk goes), and the plan returned is empty.
    """
    check_reachable(calibration, config)  # before the first walk: it costs a forward pass per block
    shares = _block_shares(calibration, config) if config.mode == "budget" else None
    if shares is not None:
        calibration.restart()
    plan: dict[str, Factorization] = {}
    decisions: dict[str, LayerDecision] = {}
    for index, block in enumerate(calibration.blocks):
        statistics = calibration.statistics(index)
        targets, layers = _block_layers(calibration, index, statistics, config)
        if shares is None:
            chosen = _threshold_ranks(layers, config)
        else:
            options, ranks = _options(layers, config)
            choice = allocate(options, shares[index], 0.0) if options else []
            chosen = {layer.site.target: r[i] if r[i] is not None else budget_dense_reason(layer.site, config, r[1:])
                      for layer, r, i in zip(layers, ranks, choice)}
        block_plan, block_decisions = plan_from_ranks(calibration.gm, targets, statistics, layers, chosen)
        for d in block_decisions:
            stats = statistics.get(d.target)
            if stats is not None:
                d.calib_rows = float(stats.weight if stats.weight is not None else stats.rows)
            decisions[d.target] = d
        calibration.advance(index, _overrides(calibration, index, layers, chosen) if block_plan else None)
        if on_block is not None:
            on_block(block_plan)
        else:
            plan.update(block_plan)
        log.info("falor sequential: block %s: %d of %d layers decomposed", block.name, len(block_plan),
                 len(block_decisions))
    order = [s.target for s in unique_targets(calibration.sites)]
    summary = {"sequential": {"blocks": len(calibration.blocks),
                              "peak_statistics_bytes": calibration.peak_statistics_bytes,
                              "largest_boundary_bytes": calibration.boundaries.largest_bytes,
                              "walks": 2 if shares is not None else 1}}
    return plan, [decisions[t] for t in order if t in decisions], summary
