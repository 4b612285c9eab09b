"""falor's final-output mode: ptdeco's criterion, predicted for every rank, verified by measurement.

Each layer gets the smallest rank whose *final-output* error, with only that
layer decomposed, stays under ``nsr_final_threshold`` (per-channel NSR of the
model's output) and ``kl_final_threshold`` (symmetric KL of its softmax) on
the metric batches — the meaning of ptdeco.falor's thresholds. ptdeco finds it
with a halving search that runs the whole model twice per probe; here:

1. **Predict.** The output-gradient moments ``G`` of every layer (one backward
   pass per metric batch under random projections of the final output, scaled
   so that ``tr(G Σ_δ)`` predicts the per-channel NSR; ``passes.sensitivity``)
   and each layer's spectrum give the predicted final NSR of every rank at once
   (``fxdeco.methods.falor.lowrank.output_error_by_rank``).
2. **Verify.** A :class:`passes.replay.GraphWalk` per metric batch runs the
   reference forward once, layer by layer; a probe replays only the part of the
   graph downstream of the layer, with the layer's output replaced by its rank-k
   projection (exactly what the factored layer computes). The search starts at
   the predicted rank, rescales the prediction by what it measures (the ratio
   learnt on earlier layers seeds the next), and falls back to bisection when
   the prediction misleads, until the passing and failing ranks are within
   ``rank_tolerance`` of the full rank. Every accepted rank was measured under
   the thresholds; a layer whose candidates all fail stays dense.

Under torch.distributed (:mod:`fxdeco.distributed`) each rank measures on its own
metric batches: the gradient moments and every probe's NSR and KL sums are
all-reduced (with their counts), so each probe's mean is over every rank's
batches and all ranks search alike, probe for probe.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
import re
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx

from fxdeco import distributed
from fxdeco.methods.falor.final_metrics import channel_variance, final_nsr, symmetric_kl
from fxdeco.methods.falor.lowrank import (NSR_EPSILON, Spectrum, centred_bias, nsr_by_rank, output_error_by_rank,
                                          output_projection, projection_factors, spectrum)
from fxdeco.modes import eval_mode
from fxdeco.outputs import OutputFn, select_output
from fxdeco.methods.falor.config import Falor
from fxdeco.plan import LayerDecision, decision, matches_any, site_multiple, unique_targets
from fxdeco.progress import progress
from passes import Factorization, Site, SiteStatistics, fresh_inputs
from passes.cost import graph_macs
from passes.replay import GraphWalk
from passes.sensitivity import SensitivityInterpreter
from passes.sites import fetch_attr

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Measured:
    nsr: float
    kl: float
    violation: float  # max(nsr / nsr_threshold, kl / kl_threshold): passes when <= 1


@dataclasses.dataclass
class Probe:
    """Measures one layer's final-output error at a rank, on every metric batch."""

    site: Site
    nodes: list[str]  # every call of the layer (a shared layer is decomposed at all of them)
    spec: Spectrum
    bias: torch.Tensor | None
    walks: list[GraphWalk]
    references: list[torch.Tensor]
    output_fn: OutputFn | None
    nsr_threshold: float
    kl_threshold: float | None
    count: int = 0  # ranks probed (a rank measured on more batches later counts once more)
    _seen: dict[tuple[int, int], tuple[float, float]] = dataclasses.field(default_factory=dict)

    def projection(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``y -> P (y − b) + b'``: the rank-``rank`` factored layer's output from the dense one's."""
        return output_projection(self.site, self.spec, self.bias, rank)

    def measure(self, rank: int, batches: int | None = None) -> _Measured:
        """The error at ``rank``, averaged over the first ``batches`` metric batches (default: all).

        Per-batch results are remembered, so verifying a rank scouted on one
        batch replays only the other batches.
        """
        self.count += 1
        batches = len(self.walks) if batches is None else batches
        project = self.projection(rank)
        overrides = {name: project for name in self.nodes}
        for b in range(batches):
            if (rank, b) not in self._seen:
                approx = select_output(self.walks[b].replay(overrides), self.output_fn)
                kl = symmetric_kl(self.references[b], approx) if self.kl_threshold is not None else 0.0
                self._seen[(rank, b)] = (final_nsr(self.references[b], approx), kl)
        values = [self._seen[(rank, b)] for b in range(batches)]
        # the means over every rank's metric batches (this rank's alone outside torch.distributed)
        nsr_mean, kl_mean = distributed.means([(sum(v[0] for v in values), batches),
                                               (sum(v[1] for v in values), batches)])
        violation = nsr_mean / self.nsr_threshold
        if self.kl_threshold is not None:
            violation = max(violation, kl_mean / self.kl_threshold)
        if math.isnan(violation):
            violation = math.inf
        return _Measured(nsr_mean, kl_mean, violation)


def _search(probe: Probe, candidates: list[int], predicted: torch.Tensor, scale: float, max_probes: int,
            tolerance: int) -> tuple[int | None, _Measured | None, list[float]]:
    """Smallest verified rank among ``candidates`` (None: keep dense), its measurement on all metric
    batches, and the measured/predicted ratio at the first probe (to seed the next layer's scale).

    The search scouts on the first metric batch; the rank it settles on is then
    measured on the others too (the first batch's result is reused). Should the
    average miss the thresholds, the search goes on from there on all batches.
    """
    scout = 1 if len(probe.walks) > 1 else None
    rank, _, ratios = _bracket(probe, candidates, predicted, scale, max_probes, tolerance, -1, scout)
    if rank is None:
        return None, None, ratios
    measured = probe.measure(rank)
    if measured.violation <= 1.0:
        return rank, measured, ratios
    # the other batches disagree: search again above the scouted rank, on every batch
    rescaled = measured.violation / max(float(predicted[rank]), 1e-300)
    rank, verified, _ = _bracket(probe, candidates, predicted, rescaled, max_probes, tolerance,
                                 candidates.index(rank), None)
    return rank, verified, ratios


def _bracket(probe: Probe, candidates: list[int], predicted: torch.Tensor, scale: float, max_probes: int,
             tolerance: int, lo: int, batches: int | None) -> tuple[int | None, _Measured | None, list[float]]:
    """Smallest rank among ``candidates`` above index ``lo`` measured to pass on the first ``batches``
    metric batches (None: none found; keep dense), its measurement, and the first measured/predicted ratio.

    The first probe goes to the predicted rank; the second to the prediction
    rescaled by what the first measured; after that a secant on ``log``
    violation against rank (the measured curve is smooth where the predicted one
    has steps), kept inside the bracket ``(lo, hi)`` — the largest candidate
    index known to fail and the smallest known to pass (``len(candidates)``:
    the dense layer, exact) — with bisection when the secant leaves it.
    """
    hi = len(candidates)
    best: _Measured | None = None
    ratios: list[float] = []
    points: list[tuple[int, float]] = []  # (candidate index, log violation) of finite, non-zero measurements

    def rank_at(i: int) -> int:
        return candidates[i] if 0 <= i < len(candidates) else (probe.site.full_rank if i >= 0 else 0)

    def first_under(threshold: float) -> int | None:
        return next((i for i in range(lo + 1, hi) if scale * float(predicted[candidates[i]]) <= threshold), None)

    i = first_under(1.0)
    i = hi - 1 if i is None else i
    while probe.count < max_probes and hi - lo > 1 and rank_at(hi) - rank_at(lo) > tolerance:
        measured = probe.measure(candidates[i], batches)
        p = float(predicted[candidates[i]])
        if 0 < measured.violation < math.inf:
            points.append((i, math.log(measured.violation)))
            if p > 0 and not ratios:
                ratios.append(measured.violation / p)
        if measured.violation <= 1.0:
            hi, best = i, measured
        else:
            lo = i
        if hi - lo <= 1 or _CLOSE <= measured.violation <= 1.0:
            break
        if p > 0 and 0 < measured.violation < math.inf:
            scale = measured.violation / p
        i = _next_index(points, lo, hi, first_under(_AIM), len(candidates))
    return (candidates[hi], best, ratios) if hi < len(candidates) else (None, None, ratios)


# Aim a little under the threshold: a probe that passes narrows the search from above, and one that just
# misses costs another probe.
_AIM = 0.9
# A passing rank this close to the threshold is kept without probing below it: the measured curve is smooth, so
# the rank that just passes is at most a step or two lower, and finding it would cost a probe or two more.
_CLOSE = 0.7


def _next_index(points: list[tuple[int, float]], lo: int, hi: int, predicted: int | None, dense: int) -> int:
    """The next candidate index to probe, strictly inside ``(lo, hi)`` (``dense``: the index meaning "dense")."""
    guess: float | None = None
    if len(points) >= 2:
        # secant through the two measurements closest to the aim, in log violation
        (i0, v0), (i1, v1) = sorted(points, key=lambda q: abs(q[1] - math.log(_AIM)))[:2]
        if i0 != i1 and v0 != v1:
            guess = i0 + (math.log(_AIM) - v0) * (i1 - i0) / (v1 - v0)
    elif predicted is not None:
        guess = predicted
    if guess is None or not lo < guess < hi or not math.isfinite(guess):
        # bisect; with no passing rank measured yet, double the failing one instead of jumping half way to dense
        guess = 2 * lo + 1 if hi == dense and lo >= 0 else (lo + hi) / 2
    return min(hi - 1, max(lo + 1, math.ceil(guess)))


def metric_references(gm: torch.fx.GraphModule, metric_inputs: Sequence[Sequence[Any]],
                       output_fn: OutputFn | None) -> list[torch.Tensor]:
    with torch.no_grad():
        return [select_output(torch.fx.Interpreter(gm).run(*fresh_inputs(flat)), output_fn).detach()
                for flat in metric_inputs]


def _sensitivities(gm: torch.fx.GraphModule, sites: list[Site], metric_inputs: Sequence[Sequence[Any]],
                   references: list[torch.Tensor], output_fn: OutputFn | None, seed: int) -> dict[str, torch.Tensor]:
    """Output-gradient moments scaled so ``tr(G Σ_δ)`` predicts the per-channel final NSR, per sample."""
    moments: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(seed)
    samples = 0
    for flat, reference in zip(metric_inputs, references):
        channels = reference[0].numel()
        scale = (1.0 / (channels * (channel_variance(reference) + NSR_EPSILON))).sqrt()
        interp = SensitivityInterpreter(gm, sites, output_fn=lambda out: select_output(out, output_fn),
                                        generator=generator, moments=moments, output_scale=scale.float())
        interp.run(*fresh_inputs(flat))
        samples += interp.samples
    # the NSR of each batch is a per-sample mean, averaged over batches (equal sizes assumed); under
    # torch.distributed over every rank's batches, so every rank predicts (and starts its searches) alike
    moments = distributed.all_sum_tensors(moments)
    samples = int(distributed.all_sum([samples])[0])
    return {target: m / max(samples, 1) for target, m in moments.items()}


def falor_final(
    gm: torch.fx.GraphModule,
    sites: Iterable[Site],
    statistics: dict[str, SiteStatistics],
    config: Falor,
    *,
    metric_inputs: Sequence[Sequence[Any]],
    output_fn: OutputFn | None = None,
) -> tuple[dict[str, Factorization], list[LayerDecision], dict[str, Any]]:
    """Plan every site by its verified final-output error (see the module docstring).

    ``config`` is a :class:`fxdeco.Falor` in final-output mode; ``metric_inputs``
    are the metric batches as flat placeholder values
    (``passes.inputs.flatten_inputs``), each of at least 2 samples.
    ``max_probes`` bounds the measured probes per layer; the search stops once
    the smallest passing and largest failing rank are within
    ``rank_tolerance * full_rank`` (at least ``rank_multiple``). Returns the
    plan, the decisions (with ``nsr_final``/``kl_final`` measured at the chosen
    rank and the number of probes) and a summary of the work done.
    """
    if not metric_inputs:
        raise ValueError("final-output mode needs at least one metric batch")
    all_sites = list(sites)  # every call of every layer; targets: one site per layer
    targets = unique_targets(all_sites)
    work = [s for s in targets if not matches_any(s.target, config.skip)]
    with eval_mode(gm):
        references = metric_references(gm, metric_inputs, output_fn)
        sensitivity = _sensitivities(gm, all_sites, metric_inputs, references, output_fn, seed=0)
        with torch.no_grad():
            plan, decisions, summary = _verify_all(gm, all_sites, targets, work, statistics, sensitivity,
                                                   metric_inputs, references, output_fn, config)
    return plan, decisions, summary


def _verify_all(gm: torch.fx.GraphModule, all_sites: list[Site], targets: list[Site], work: list[Site],
                statistics: dict[str, SiteStatistics], sensitivity: dict[str, torch.Tensor],
                metric_inputs: Sequence[Sequence[Any]], references: list[torch.Tensor], output_fn: OutputFn | None,
                config: Falor) -> tuple[dict[str, Factorization], list[LayerDecision], dict[str, Any]]:
    nsr_threshold = math.inf if config.nsr_final_threshold is None else config.nsr_final_threshold
    walks = [GraphWalk(gm, flat) for flat in metric_inputs]
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    nodes_of: dict[str, list[str]] = {}
    for s in all_sites:
        nodes_of.setdefault(s.target, []).append(s.node)
    plan: dict[str, Factorization] = {}
    chosen: dict[str, LayerDecision] = {}
    unreached: list[str] = []  # layers that do not reach the compared output (kept dense)
    ratios: list[float] = []
    ratio_by_role: dict[str, float] = {}
    probes = 0
    for site in progress(sorted(work, key=lambda s: min(order[n] for n in nodes_of[s.target])),
                         desc="falor: verifying ranks", enabled=config.show_progress):
        stats = statistics[site.target]
        first = min(nodes_of[site.target], key=order.__getitem__)
        for walk in walks:
            walk.advance_to(first)
        spec = spectrum(stats, config.damping, config.center)
        bias = fetch_attr(gm, site.bias) if site.bias else None
        probe = Probe(site, nodes_of[site.target], spec, bias, walks, references, output_fn, nsr_threshold,
                      config.kl_final_threshold)
        g = sensitivity.get(site.target)  # None when the layer does not reach the output: its own NSR curve then
        predicted = output_error_by_rank(spec, g) if g is not None else nsr_by_rank(spec)
        candidates = config.candidate_ranks(site)
        tolerance = max(site_multiple(site, config.rank_multiple), math.ceil(config.rank_tolerance * site.full_rank))
        # The measured/predicted ratio differs by a layer's role (query, value, fc1...) far more than by its depth:
        # seed from the last layer of the same role in another block, else from the last layer probed.
        role = re.sub(r"\d+", "#", site.target)
        seed_scale = ratio_by_role.get(role, ratios[-1] if ratios else 1.0)
        rank, measured, seen = _search(probe, candidates, predicted, seed_scale, config.max_probes, tolerance)
        ratios += seen
        if seen:
            ratio_by_role[role] = seen[0]
        probes += probe.count
        if rank is None or measured is None:
            reason = ("no rank that reduces parameters meets the final-output thresholds" if candidates
                      else "no rank reduces parameters")
            chosen[site.target] = dataclasses.replace(decision(site, stats, None, None, reason), probes=probe.count)
            continue
        if g is None and not measured.nsr and not measured.kl:
            # no gradient reached it and the compared output did not move at all: the layer feeds only outputs that
            # output_fn leaves out (BertModel's pooler beside last_hidden_state); any rank would "pass", so the
            # criterion says nothing about it and it is kept dense rather than cut to its smallest rank
            reason = "its output does not reach the tensor output_fn compares (the criterion cannot judge it)"
            chosen[site.target] = dataclasses.replace(decision(site, stats, None, None, reason), probes=probe.count)
            unreached.append(site.target)
            continue
        first_factor, second = projection_factors(site, fetch_attr(gm, site.weight), spec, rank)
        new_bias = centred_bias(spec, bias, rank)
        kl_final = measured.kl if config.kl_final_threshold is not None else None  # None: not measured
        meta = {"nsr_final": measured.nsr, "kl_final": kl_final, "probes": probe.count}
        plan[site.target] = Factorization(first_factor, second, meta, new_bias)
        d = decision(site, stats, rank, None, "decomposed", adds_bias=new_bias is not None)
        chosen[site.target] = dataclasses.replace(d, nsr_final=measured.nsr, kl_final=kl_final,
                                                  probes=probe.count)
        log.debug("%s: rank %d/%d, final nsr %.4g, kl %.4g, %d probes", site.target, rank, site.full_rank,
                  measured.nsr, measured.kl, probe.count)
    if unreached:
        warnings.warn(f"final-output mode kept {len(unreached)} layer(s) dense whose output does not reach the tensor "
                      f"output_fn selects ({', '.join(unreached[:4])}{', ...' if len(unreached) > 4 else ''}): "
                      "choose an output_fn that covers them, or decompose them with another criterion",
                      UserWarning, stacklevel=2)
    decisions = [chosen.get(s.target) or decision(s, statistics[s.target], None, None, "skipped by pattern")
                 for s in targets]
    total_macs = graph_macs(gm)
    replayed = sum(w.replayed_macs for w in walks)
    summary = {
        "probes": probes,
        "metric_batches": len(walks) * distributed.world(),  # on every rank: each measures on its own
        # probes' cost in whole forward passes over one metric batch (MACs replayed / MACs of the graph)
        "probe_forward_equivalents": replayed / total_macs if total_macs else None,
    }
    log.info("falor final-output mode: %d probes over %d layers (%.1f forward passes of a metric batch)",
             probes, len(work), summary["probe_forward_equivalents"] or float("nan"))
    return plan, decisions, summary
