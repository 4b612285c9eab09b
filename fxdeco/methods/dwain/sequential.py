"""dwain one block at a time (``Dwain(sequential=True)``): the memory of one block's statistics, errors compensated.

One-shot dwain (:mod:`fxdeco.methods.dwain.search`) holds every layer's
statistics and goes from the last layer to the first, so nothing upstream of a
probed layer has changed. For a model whose statistics do not fit at once, the
walk of :class:`fxdeco.sequential.BlockCalibration` goes the other way, first
block to last, each block calibrated on the outputs of the blocks already
decomposed (error compensation, as in falor's sequential mode). Per block:

1. its layers' statistics, on the cached boundary of every calibration batch;
2. its layers from the last to the first, each at the smallest candidate rank
   that passes ptdeco's rule (:class:`~fxdeco.methods.dwain.search.Thresholds`)
   against the *current* model: the blocks before decomposed, the block's layers
   accepted so far, the blocks after still dense. A probe runs the block, with
   the layer's output projected at the rank, and every block after it, on each
   metric batch's cached boundary: the rest of the model, never the part before;
3. the boundaries move past the block with its accepted layers.

What differs from one-shot dwain, and why: the order (a layer is measured
against a model whose *later* blocks are still dense, where one-shot measures
it against a model whose later layers are decomposed), and every candidate is
measured: the loss-gradient screen needs a backward pass through the whole
model. The scout (``predict=True``: a rank whose first metric batch alone is
:data:`~fxdeco.methods.dwain.search.SCOUT` times over its threshold is rejected
without the others) still applies.

Example:
    >>> import torch, fxdeco
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    >>> data = [torch.randn(128, 64) for _ in range(3)]
    >>> config = fxdeco.Dwain(lambda out, batch: out.square().mean(), min_rank=8, sequential=True,
    ...                       show_progress=False)
    >>> small = fxdeco.transform(model, data, config, show_progress=False)
    >>> small.meta["fxdeco"].summary["sequential"]["blocks"]
    2
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import torch

from fxdeco import distributed
from fxdeco.methods.dwain.config import Dwain
from fxdeco.methods.dwain.search import Probe, Thresholds, check_loss, measure_probe, removed_params, rows_nsr
from fxdeco.methods.falor.lowrank import centred_bias, output_projection, projection_factors, spectrum
from fxdeco.modes import eval_mode
from fxdeco.outputs import default_logits, select_output
from fxdeco.plan import LayerDecision, decision, matches_any, unique_targets
from fxdeco.sequential import BlockCalibration
from passes import Factorization, Site
from passes.replay import Override
from passes.sites import fetch_attr

log = logging.getLogger(__name__)


def rest_of_model(calibration: BlockCalibration, index: int, batch: int,
                  overrides: Mapping[str, Override] | None = None) -> Any:
    """The graph's output on ``batch``, from its cached boundary before block ``index``: that block with
    ``overrides`` on node outputs, then every block after it as it is."""
    run = calibration.run
    boundary = run.run_block(index, calibration.boundaries.get(batch), overrides=overrides)
    for later in range(index + 1, len(calibration.blocks)):
        boundary = run.run_block(later, boundary)
    return run.graph_output(boundary)


@dataclasses.dataclass
class _Reference:
    """One metric batch as :func:`~fxdeco.methods.dwain.search.measure_probe` reads it: the loader's batch and the
    current model's output and loss on it."""

    raw: Any
    output: Any
    loss: float


@dataclasses.dataclass
class _Current:
    """The current model on the metric batches: its outputs and losses (the reference every probe is compared to)."""

    outputs: list[Any]
    losses: list[float]


def dwain_sequential(calibration: BlockCalibration, config: Dwain, raws: Sequence[Any], total_params: int,
                     on_block: Callable[[dict[str, Factorization]], None] | None = None
                     ) -> tuple[dict[str, Factorization], list[LayerDecision], dict[str, Any]]:
    """dwain block by block (see the module docstring); returns the plan, the decisions and a summary.

    ``raws`` are the metric batches as the loader yielded them (``loss_fn`` reads its targets there), the first
    ``config.num_metric_batches`` of the calibration batches. ``on_block``, when given, receives each block's plan
    once the walk is past the block (``fxdeco.decompose_``), and the plan returned is empty.
    """
    wanted = config.num_metric_batches
    if min(calibration.batches, len(raws)) < wanted:
        raise ValueError(f"num_metric_batches={wanted} but the calibration loader gave {calibration.batches} "
                         "batch(es); lower num_metric_batches or give more batches")
    limits = Thresholds(config.trade_off_factor, config.max_accepted_ppl_diff, config.nsr_final_threshold,
                        total_params)
    output_fn = calibration.prepared.output_fn
    strict = math.isfinite(config.nsr_final_threshold)

    def compared(output: Any) -> torch.Tensor:
        return select_output(output, output_fn) if strict or output_fn else default_logits(output)

    plan: dict[str, Factorization] = {}
    decisions: dict[str, LayerDecision] = {}
    counts = {"probes": 0, "scouted": 0}
    with eval_mode(calibration.gm), torch.no_grad():
        for index, block in enumerate(calibration.blocks):
            # the current model first (the blocks before decomposed): a loss_fn or an output that final-output
            # NSR cannot compare fails here, before the block's statistics pass over every calibration batch
            outputs = [rest_of_model(calibration, index, b) for b in range(wanted)]
            current = _Current(outputs, [float(check_loss(config.loss_fn, out, raws[b], b))
                                         for b, out in enumerate(outputs)])
            if index == 0 and strict:
                compared(outputs[0])  # a tuple/ModelOutput without output_fn: the error names the remedy
            statistics = calibration.statistics(index)
            accepted: dict[str, Override] = {}
            block_plan: dict[str, Factorization] = {}
            sites = calibration.block_sites(index)
            targets = unique_targets(sites)
            order = {n.name: i for i, n in enumerate(calibration.gm.graph.nodes)}
            nodes_of = {t.target: [s.node for s in sites if s.target == t.target] for t in targets}
            for site in sorted(targets, key=lambda s: min(order[n] for n in nodes_of[s.target]), reverse=True):
                stats = statistics[site.target]
                if matches_any(site.target, config.skip):
                    decisions[site.target] = decision(site, stats, None, None, "skipped by pattern")
                    continue

                def probe(rank: int, limit: float, site: Site = site) -> tuple[Probe, dict[str, Override]]:
                    projected = output_projection(site, spec, bias, rank)
                    trial = {**accepted, **{node: projected for node in nodes_of[site.target]}}
                    reference = [_Reference(raws[b], current.outputs[b], current.losses[b]) for b in range(wanted)]
                    result = measure_probe(rank, limit, lambda b: rest_of_model(calibration, index, b, trial),
                                           reference, config, compared if strict else None)
                    return result, trial

                spec = spectrum(stats, config.damping, config.center)
                bias = fetch_attr(calibration.gm, site.bias).detach() if site.bias else None
                chosen, tried = None, 0
                for rank in sorted(config.candidate_ranks(site)):  # smallest first: the first to pass is the smallest
                    removed = removed_params(site, rank)
                    result, trial = probe(rank, limits.ppl_limit(removed))
                    tried += 1
                    counts["scouted"] += result.batches < wanted
                    if limits.accepts(result, removed):
                        chosen = result
                        break
                counts["probes"] += tried
                if chosen is None:
                    reason = ("no candidate rank passes the loss criterion" if config.candidate_ranks(site)
                              else f"no rank from min_rank={config.min_rank} saves parameters")
                    decisions[site.target] = dataclasses.replace(decision(site, stats, None, None, reason),
                                                                 probes=tried)
                    continue
                if math.isnan(chosen.nsr):  # measured for the report only (no nsr_final_threshold)
                    chosen.nsr = distributed.means([(sum(rows_nsr(compared(a), compared(b)) for a, b in
                                                         zip(current.outputs, chosen.outputs)), wanted)])[0]
                accepted, current = trial, _Current(chosen.outputs, chosen.losses)
                weight = fetch_attr(calibration.gm, site.weight)
                first, second = projection_factors(site, weight, spec, chosen.rank)
                new_bias = centred_bias(spec, bias, chosen.rank)
                block_plan[site.target] = Factorization(first, second, {"ppl_diff": chosen.ppl_diff,
                                                                        "nsr_final": chosen.nsr, "probes": tried},
                                                        new_bias)
                d = decision(site, stats, chosen.rank, None, "decomposed", adds_bias=new_bias is not None)
                decisions[site.target] = dataclasses.replace(d, nsr_final=chosen.nsr, ppl_diff=chosen.ppl_diff,
                                                             probes=tried)
            for target in block_plan:
                stats = statistics[target]
                decisions[target].calib_rows = float(stats.weight if stats.weight is not None else stats.rows)
            calibration.advance(index, accepted or None)
            if on_block is not None:
                on_block(block_plan)
            else:
                plan.update(block_plan)
            log.info("dwain sequential: block %s: %d of %d layers decomposed", block.name, len(block_plan),
                     len(targets))
    summary = {"probes": counts["probes"], "probes_stopped_by_the_scout": counts["scouted"],
               "metric_batches": wanted * distributed.world(),
               "sequential": {"blocks": len(calibration.blocks),
                              "peak_statistics_bytes": calibration.peak_statistics_bytes,
                              "largest_boundary_bytes": calibration.boundaries.largest_bytes, "walks": 1}}
    order = [s.target for s in unique_targets(calibration.sites)]
    return plan, [decisions[t] for t in order if t in decisions], summary
