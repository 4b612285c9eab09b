"""falor (Features Are LOw Rank), local closed-form mode and global budget mode.

Each layer's output second moment is eigen-decomposed once; the layer-output
noise-to-signal ratio of *every* rank then follows in closed form (see
``fxdeco.methods.falor.lowrank``), so no forward pass is spent per candidate rank. Ranks are
chosen either

* per layer: the smallest rank whose NSR stays under ``nsr_threshold``; or
* globally: ``keep_params=0.6`` (or ``keep_macs=``) allocates ranks across all
  layers so the model keeps that fraction of its original size with the least
  summed layer NSR (``fxdeco.methods.falor.budget``).

``rank_multiple`` rounds ranks up to hardware-friendly multiples.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import statistics as statistics_lib
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch

from fxdeco.methods.falor.budget import BudgetError, LayerOptions, allocate
from fxdeco.errors import warn_user
from fxdeco.methods.falor.config import Falor
from fxdeco.methods.falor.lowrank import (Spectrum, centred_bias, nsr_by_rank, output_error_by_rank, projection_factors,
                            spectrum)
from fxdeco.plan import (LayerDecision, decision, dense_macs, factored_macs, matches_any, round_rank,
                         site_multiple, unique_targets)
from fxdeco.metadata import original_totals
from fxdeco.progress import progress
from passes import Factorization, Site, SiteStatistics
from passes.sites import fetch_attr

if TYPE_CHECKING:
    from fxdeco.methods.falor.speed import LatencyModel

log = logging.getLogger(__name__)

# (ranks by layer, spectra by layer) -> measured final-output NSR by layer (fxdeco.methods.falor.budget_measure);
# the spectra are truncated to the largest rank each layer may get (Spectrum.truncated)
FinalNsrMeasure = Callable[[Mapping[str, int], Mapping[str, Spectrum]], Mapping[str, float]]


def smallest_rank(nsr: torch.Tensor, threshold: float, min_rank: int, full_rank: int) -> int:
    """Smallest ``k`` in ``[min_rank, full_rank]`` with ``nsr[k] <= threshold`` (full rank otherwise)."""
    candidates = torch.nonzero(nsr[min_rank: full_rank + 1] <= threshold)
    return min_rank + int(candidates[0]) if len(candidates) else full_rank


@dataclasses.dataclass
class _Layer:
    """One layer's analysis: statistics, spectrum and the NSR of every rank."""

    site: Site
    stats: SiteStatistics
    spec: Spectrum
    nsr: torch.Tensor  # nsr[k] for k = 0..out
    _output_error: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    def output_error(self) -> torch.Tensor | None:
        """Predicted final-output squared error per sample for every rank (index k), or None.

        With the output-gradient moment ``G`` (``passes.sensitivity``) and the
        spectrum ``C = Σ λ_j u_j u_jᵀ``, dropping directions ``j > k`` changes the
        final output by ``tr(G Σ_{j>k} λ_j u_j u_jᵀ) = Σ_{j>k} λ_j u_jᵀ G u_j``.
        Computed once (an ``out x out x k`` product): budget rounds read it again.
        """
        g = self.stats.sensitivity
        if g is not None and self._output_error is None:
            self._output_error = output_error_by_rank(self.spec, g)
        return self._output_error if g is not None else None



def option_costs(s: Site, stats: SiteStatistics, candidates: list[int], measure: str, center: bool,
                 latency: LatencyModel | None = None) -> list[float]:
    """Params (MACs per sample, or measured seconds) of layer ``s`` dense, then factored at each candidate rank.

    A centred factorization carries a bias even where the layer had none.
    """
    if measure == "latency":
        return latency.option_costs(s, candidates)
    if measure == "params":
        bias = s.out_features if s.bias else 0
        return [s.dense_params] + [s.factor_params(k) + (s.out_features if center else bias) for k in candidates]
    return [dense_macs(s, stats)] + [factored_macs(s, stats, k) for k in candidates]


def check_budget_reachable(prepared: Any, config: Falor) -> None:
    """Raise :class:`fxdeco.methods.falor.budget.BudgetError` now if the budget is below what falor can reach.

    Every layer at its smallest candidate rank is the floor; it needs only the
    layers' shapes (and, for MACs, the rows per sample of one calibration
    batch), so ``fxdeco.transform`` calls this after the first batch instead
    of finding out after all of them.
    """
    if config.budget is None:
        return
    measure, keep = config.budget
    latency, margin = None, 1e-12
    if measure == "latency":
        from fxdeco.methods.falor.speed import REFUSE_OVER, latency_model  # timing machinery, only when asked for

        latency = latency_model(prepared, config)
        # a latency floor is a prediction from layer timings and a timing of the whole model that may have been
        # taken under different loads (a fresh process timed the Fashion-MNIST CNN at 57.5 ms, its layers as if it
        # took 34 ms, and refused keep_latency=0.6 for a predicted floor of 0.6045; seconds later the original ran
        # in 36.5 ms and keep_macs=0.2 measured 0.50 of it): within REFUSE_OVER the floor plan is timed end to end
        # instead, and the measurement decides
        margin = REFUSE_OVER
    floor, total = _budget_floor(prepared, config, latency)
    if floor > keep * total * (1 + 1e-12) and latency is not None:
        # a time is noisy: before refusing, time the original once more (the faster median is kept)
        from fxdeco.methods.falor.speed import time_models

        if latency.retime_original(time_models({"original": prepared.gm}, latency.call)["original"]):
            floor, total = _budget_floor(prepared, config, latency)
    if floor > keep * total * (1 + margin):
        raise unreachable_budget(measure, keep, floor, total)


def unreachable_budget(measure: str, keep: float, floor: float, total: float) -> BudgetError:
    """The refusal of a budget below ``floor``, the model's ``measure`` with every layer at its smallest rank
    (one-shot and sequential mode say it alike).

    Example:
        >>> print(unreachable_budget("params", 0.1, 30.0, 100.0))
        keep_params=0.1 cannot be reached: decomposing every layer at its smallest rank keeps 0.3000 of the model's params (keep_params >= 0.3000 is reachable; layers that are not Linear/Conv2d, skipped or too small to save anything stay as they are)
    """
    name = f"keep_{measure}"
    return BudgetError(f"{name}={keep:g} cannot be reached: decomposing every layer at its smallest rank keeps "
                       f"{floor / total:.4f} of the model's {measure} ({name} >= {floor / total:.4f} is "
                       "reachable; layers that are not Linear/Conv2d, skipped or too small to save anything "
                       "stay as they are)")


def _budget_floor(prepared: Any, config: Falor, latency: LatencyModel | None) -> tuple[float, float]:
    """(the model's total with every layer at its cheapest candidate rank, the original's total)."""
    measure, _ = config.budget
    statistics, total = prepared.statistics, _model_total(prepared.gm, measure, latency)
    floor = total
    for site in unique_targets(prepared.sites):
        # a parameter count needs no statistics (sequential mode checks its budget before any block ran)
        if matches_any(site.target, config.skip) or (site.target not in statistics and measure != "params"):
            continue
        candidates = _budget_candidates(site, config, latency)
        costs = option_costs(site, statistics.get(site.target), candidates, measure, config.center, latency)
        floor -= costs[0] - min(costs)
    return floor, total


def _analyse(gm: torch.fx.GraphModule, sites: Iterable[Site], statistics: dict[str, SiteStatistics],
             config: Falor) -> list[_Layer]:
    """Each site's spectrum and error curves.

    Once a layer's curves are computed (the output-error curve too where budget
    mode may read it), its spectrum is cut to the largest rank falor may give the
    layer (:meth:`Spectrum.truncated`): factors and projections read no further,
    and a layer that saves parameters has a rank below about half its width, so
    the layers analysed together (a model, or a block in sequential mode) hold
    about half the float64 eigenvectors, and no full spectrum outlives its layer's
    turn (4096 wide: 0.13 GB each).
    """
    layers = []
    wants_output_error = config.mode == "budget" and config.budget_criterion != "nsr"
    for site in progress(sites, desc="falor: spectra", enabled=config.show_progress):
        stats = statistics[site.target]
        spec = spectrum(stats, config.damping, config.center)
        layer = _Layer(site, stats, spec, nsr_by_rank(spec))
        if wants_output_error:
            layer.output_error()  # its tail reads every direction
        layer.spec = spec.truncated(max(config.candidate_ranks(site), default=0))
        layers.append(layer)
    return layers


def _threshold_ranks(layers: list[_Layer], config: Falor) -> dict[str, int | str]:
    """Per layer: the chosen rank, or the reason it stays dense."""
    chosen: dict[str, int | str] = {}
    for layer in layers:
        s = layer.site
        rank = round_rank(smallest_rank(layer.nsr, config.nsr_threshold, min(config.min_rank, s.full_rank),
                                        s.full_rank), site_multiple(s, config.rank_multiple), s.full_rank)
        chosen[s.target] = config.rank_refusal(s, rank) or rank
    return chosen


def budget_dense_reason(site: Site, config: Falor, candidates: list[int]) -> str:
    """Why budget mode leaves ``site`` dense: the allocation's choice, or, when no rank was a candidate at all,
    what local mode says of its smallest rank (the allocation never had a choice to make for that layer).

    Example:
        >>> from passes import Site
        >>> site = Site("fc", "linear", "fc", "fc.weight", None, (4, 34))  # full rank 4, the smallest multiple of 4
        >>> budget_dense_reason(site, Falor(keep_params=0.5, rank_multiple=4), [])
        'rank 4 would not reduce parameters'
        >>> budget_dense_reason(site, Falor(keep_params=0.5), [1, 2, 3])
        'kept dense by the budget allocation'
    """
    if not candidates:
        smallest = round_rank(min(config.min_rank, site.full_rank), site_multiple(site, config.rank_multiple),
                              site.full_rank)
        refusal = config.rank_refusal(site, smallest)
        if refusal is not None:
            return refusal
    return "kept dense by the budget allocation"


def _budget_candidates(site: Site, config: Falor, latency: LatencyModel | None) -> list[int]:
    """The ranks the budget may give ``site`` (none for a layer the latency budget could not time).

    A latency budget drops the ranks that are not measurably faster than a
    larger one (:meth:`~fxdeco.methods.falor.speed.LatencyModel.worth_ranks`),
    whichever cost it allocates by (its MAC-shaped plan too): below some width a
    thin factored layer costs its fixed overhead, and a thinner rank there buys
    error for no time (or only for timing noise).
    """
    if latency is not None and site.target not in latency.latencies:
        return []
    candidates = config.candidate_ranks(site)
    return latency.worth_ranks(site, candidates) if config.keep_latency is not None and latency is not None \
        else candidates


def _accept_by_speed(layers: list[_Layer], chosen: dict[str, int | str], config: Falor,
                     latency: LatencyModel) -> dict[str, int | str]:
    """Each chosen rank timed exactly (and snapped up to a faster rank nearby), or dense where not faster."""
    accepted = dict(chosen)
    for layer in layers:
        rank = chosen[layer.site.target]
        if isinstance(rank, int):
            accepted[layer.site.target] = latency.accept(layer.site, rank, config.candidate_ranks(layer.site))
    return accepted


def _uses_output_error(layers: list[_Layer], criterion: str) -> bool:
    """Whether the budget allocation weighs layers by predicted final-output error (else summed layer NSR)."""
    use_output = criterion == "output" or (criterion == "auto" and all(l.stats.sensitivity is not None
                                                                       for l in layers))
    if use_output and any(l.stats.sensitivity is None for l in layers):
        raise ValueError("budget_criterion='output' needs output-gradient statistics: "
                         "fxdeco.prepare(..., sensitivity=True) (transform collects them in budget mode)")
    if criterion == "auto" and not use_output:
        warn_user("budget mode allocates ranks by summed layer NSR: the prepared model has no output-gradient "
                  "statistics for the (better) predicted final-output error; prepare it with "
                  "fxdeco.prepare(..., sensitivity=True), or pass budget_criterion='nsr' to choose this")
    return use_output


def _budget_ranks(layers: list[_Layer], config: Falor, budget: tuple[str, float], model_total: float,
                  use_output: bool, latency: LatencyModel | None = None,
                  scales: Mapping[str, float] | None = None, log_result: bool = True) -> dict[str, int | str]:
    """Ranks for all layers at once so the model keeps ``keep`` of its params (MACs, seconds); ``budget`` is
    ``(measure, keep)``.

    ``scales`` multiply layers' predicted final-output error curves (measured / predicted,
    ``fxdeco.methods.falor.budget_measure``); a layer without one gets the median scale, so all curves share a unit.
    """
    measure, keep = budget
    options, ranks = [], []
    default_scale = statistics_lib.median(scales.values()) if scales else 1.0
    for layer in layers:
        s = layer.site
        candidates = _budget_candidates(s, config, latency)
        costs = option_costs(s, layer.stats, candidates, measure, config.center, latency)
        curve = layer.output_error() * (scales or {}).get(s.target, default_scale) if use_output else layer.nsr
        errors = [0.0] + [float(curve[k]) for k in candidates]
        options.append(LayerOptions(s.target, torch.tensor(costs, dtype=torch.float64),
                                    torch.tensor(errors, dtype=torch.float64)))
        ranks.append([None] + candidates)
    fixed = model_total - sum(float(o.costs[0]) for o in options)
    # a latency budget is aimed off by the last measured miss of the additive prediction (measured / predicted)
    target = keep * model_total
    if measure == "latency" and latency is not None:
        # the fastest plan, when the correction (or a predicted floor within the refusal margin) asks for more
        floor = fixed + sum(float(o.costs.min()) for o in options)
        target = max(target / latency.correction, floor)
    choice = allocate(options, target, fixed)
    total = fixed + sum(float(o.costs[i]) for o, i in zip(options, choice))
    log.log(logging.INFO if log_result else logging.DEBUG, "falor budget: kept %.4f of the model's %s (asked %.4f)",
            total / model_total, measure, keep)
    return {layer.site.target: (r[i] if r[i] is not None else budget_dense_reason(layer.site, config, r[1:]))
            for layer, r, i in zip(layers, ranks, choice)}


def _refine(layers: list[_Layer], chosen: dict[str, int | str], allocate_ranks: Callable[..., dict[str, int | str]],
            measure_final_nsr: FinalNsrMeasure, rounds: int,
            scales: dict[str, float] | None = None) -> dict[str, int | str]:
    """Measure the allocated layers, rescale their predicted curves, allocate again; ``rounds`` times.

    ``scales`` (updated in place) holds the scales measured by earlier allocations of the same layers.
    """
    from fxdeco.methods.falor.budget_measure import measured_scales

    by_target = {layer.site.target: layer for layer in layers}
    scales = {} if scales is None else scales
    for round_index in range(rounds):
        ranks = {t: r for t, r in chosen.items() if isinstance(r, int)}
        if not ranks:
            break
        measured = measure_final_nsr(ranks, {t: by_target[t].spec for t in ranks})
        predicted = {t: float(by_target[t].output_error()[r]) for t, r in ranks.items()}
        scales.update(measured_scales(measured, predicted))  # layers measured earlier keep their scale
        chosen = allocate_ranks(scales=scales)
        log.info("falor budget: round %d rescaled %d layers by measurement", round_index + 1, len(ranks))
    return chosen


def _model_total(gm: torch.fx.GraphModule, measure: str, latency: LatencyModel | None = None) -> float:
    """The original model's params/MACs per sample, recorded by ``fxdeco.prepare`` (or its measured seconds)."""
    if measure == "latency":
        if latency is None:
            raise ValueError("keep_latency needs the layers' timings: run falor through fxdeco.convert, or pass "
                             "latency=fxdeco.methods.falor.speed.latency_model(prepared, config)")
        return latency.original
    totals = original_totals(gm)
    if measure == "params":
        return float(totals.params)
    if totals.macs is None:
        raise ValueError("keep_macs needs the model's MACs: calibrate through fxdeco.prepare(...) first")
    return float(totals.macs)


def falor_local(
    gm: torch.fx.GraphModule,
    sites: Iterable[Site],
    statistics: dict[str, SiteStatistics],
    config: Falor | None = None,
    *,
    measure_final_nsr: FinalNsrMeasure | None = None,
    latency: LatencyModel | None = None,
    **options: Any,
) -> tuple[dict[str, Factorization], list[LayerDecision]]:
    """Plan the factorization of every site from its statistics.

    ``config`` is a :class:`fxdeco.Falor` in local or budget mode (or its options as keywords).
    Threshold mode (default): each layer gets the smallest rank (rounded up to
    ``rank_multiple``) whose layer-output NSR is at most ``nsr_threshold``.
    Budget mode: ``keep_params`` / ``keep_macs`` is the fraction of the original
    model's parameters / MACs per sample to keep; ranks are allocated across
    layers (``nsr_threshold`` is then ignored) to minimise the predicted
    final-output error when the statistics carry output-gradient moments
    (``budget_criterion="output"``; ``"auto"`` picks it when available), else
    the summed layer NSR (``"nsr"``).

    A layer is factorized at rank ``k`` only when ``k`` reduces its parameters
    and MACs (``k * (in + out) < in * out``) and ``k / full_rank <=
    proportion_threshold``; layers matching a ``skip`` glob are kept dense. With
    ``center`` (default) the covariance is decomposed and the mean of the
    discarded directions folded into the bias (see ``fxdeco.methods.falor.lowrank``).

    With the output criterion, ``budget_rounds`` rounds of measurement refine the
    allocation: ``measure_final_nsr(ranks, spectra)`` returns each allocated
    layer's measured final-output NSR, which rescales its predicted curve before
    the next allocation (``fxdeco.methods.falor.budget_measure``; :func:`falor` wires it up).

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
    config = config if config is not None else Falor(**options)
    if config.mode == "final-output":
        raise ValueError("falor_local plans local and budget mode; final-output mode runs in "
                         "fxdeco.methods.falor.final")
    return LocalPlanner(gm, sites, statistics, config, measure_final_nsr=measure_final_nsr, latency=latency).plan()


class LocalPlanner:
    """The layers of local and budget mode, analysed once (spectra, error curves) and planned at any budget.

    :func:`falor_local` plans once; a latency budget plans several times (its
    rounds, and the MAC-shaped plan it measures beside them:
    ``fxdeco.methods.falor.speed``), and the spectra and the measured error
    scales of the budget rounds carry over from one plan to the next.
    """

    def __init__(self, gm: torch.fx.GraphModule, sites: Iterable[Site], statistics: dict[str, SiteStatistics],
                 config: Falor, *, measure_final_nsr: FinalNsrMeasure | None = None,
                 latency: LatencyModel | None = None) -> None:
        if config.accepts_by_speed and latency is None:
            raise ValueError("acceptance by speed needs the layers' timings: run falor through fxdeco.convert, or "
                             "pass latency=fxdeco.methods.falor.speed.latency_model(prepared, config)")
        self.gm, self.statistics, self.config, self.latency = gm, statistics, config, latency
        self.measure_final_nsr = measure_final_nsr
        self.targets = unique_targets(sites)
        self.layers = _analyse(gm, [s for s in self.targets if not matches_any(s.target, config.skip)], statistics,
                               config)
        self.use_output = False
        if config.mode == "budget":
            self.use_output = _uses_output_error(self.layers, config.budget_criterion)
            log.info("falor budget: allocating by %s",
                     "predicted final-output error" if self.use_output else "summed layer NSR")
        self.scales: dict[str, float] = {}  # measured / predicted final-output error, by layer (budget rounds)

    def ranks(self, budget: tuple[str, float] | None = None, *, refine: bool = True) -> dict[str, int | str]:
        """Each layer's rank (or why it stays dense) before acceptance by speed: by the config's threshold, or
        allocated at ``budget`` (``(measure, keep)``; default the config's), refined by ``budget_rounds`` rounds
        of measurement when ``refine``."""
        if self.config.mode != "budget":
            return _threshold_ranks(self.layers, self.config)
        budget = budget or self.config.budget
        allocate_ranks = functools.partial(_budget_ranks, self.layers, self.config, budget,
                                           _model_total(self.gm, budget[0], self.latency), self.use_output,
                                           self.latency)
        chosen = allocate_ranks(scales=self.scales, log_result=refine)  # (a bisection allocates many times)
        if refine and self.use_output and self.measure_final_nsr is not None and self.config.budget_rounds > 0:
            chosen = _refine(self.layers, chosen, allocate_ranks, self.measure_final_nsr, self.config.budget_rounds,
                             self.scales)
        return chosen

    def keep_for_seconds(self, measure: str, seconds: float, steps: int = 14) -> float | None:
        """The largest ``keep_<measure>`` whose allocation (before refinement and acceptance) the layer timings
        predict at most ``seconds`` per call for; None when no budget is predicted that fast (bisection).

        Example:
            >>> import fxdeco, torch
            >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
            >>> _ = torch.manual_seed(0)
            >>> prepared = fxdeco.calibrate(fxdeco.prepare(model, keep_batches=1), [torch.randn(512, 256)])
            >>> from fxdeco.methods.falor.speed import LatencyModel
            >>> from fxdeco.latency.curve import SiteLatency
            >>> fake = {s.target: SiteLatency(s.target, 1.0, {8: 0.1, 128: 0.6}) for s in prepared.sites}
            >>> planner = LocalPlanner(prepared.gm, prepared.sites, prepared.statistics,
            ...                        Falor(keep_macs=0.5, budget_criterion="nsr"),
            ...                        latency=LatencyModel(fake, 2.5, 0.5, ((), {})))
            >>> keep = planner.keep_for_seconds("macs", 1.2)   # 0.5 s outside the layers: 0.7 s for both
            >>> round(keep, 2), planner.ranks(("macs", keep))    # each 0.1 + 56 / 240 s: 1.17 s in all
            (0.53, {'0': 64, '2': 64})
        """
        from fxdeco.methods.falor.budget import BudgetError

        def predicted(keep: float) -> float | None:
            try:
                chosen = self.ranks((measure, keep), refine=False)
            except BudgetError:  # below what every layer at its smallest rank reaches
                return None
            ranks = {t: r if isinstance(r, int) else None for t, r in chosen.items()}
            if self.config.accepts_by_speed:  # plan() keeps dense a layer not faster factored: predict it so
                ranks = {t: r if r is not None and self.latency.faster(t, r) else None for t, r in ranks.items()}
            return self.latency.predict(ranks)

        best, lo, hi = None, 0.0, 1.0
        for _ in range(steps):
            mid = (lo + hi) / 2
            time = predicted(mid)
            if time is not None and time <= seconds:
                best, lo = mid, mid
            else:
                hi = mid
        return best

    def plan(self, budget: tuple[str, float] | None = None) -> tuple[dict[str, Factorization], list[LayerDecision]]:
        """The factors and decisions (see :meth:`ranks`), each rank accepted by speed when the config asks."""
        chosen = self.ranks(budget)
        if self.config.accepts_by_speed:
            chosen = _accept_by_speed(self.layers, chosen, self.config, self.latency)
        return plan_from_ranks(self.gm, self.targets, self.statistics, self.layers, chosen)


def plan_from_ranks(gm: torch.fx.GraphModule, targets: list[Site], statistics: Mapping[str, SiteStatistics],
                    layers: list[_Layer], chosen: Mapping[str, int | str]
                    ) -> tuple[dict[str, Factorization], list[LayerDecision]]:
    """The factors and decisions of ``targets`` given each analysed layer's rank (or the reason it stays dense);
    a target without an analysis was skipped by pattern."""
    plan: dict[str, Factorization] = {}
    by_target = {layer.site.target: layer for layer in layers}
    decisions = []
    for site in targets:
        if site.target not in by_target:
            decisions.append(decision(site, statistics[site.target], None, None, "skipped by pattern"))
            continue
        layer, rank = by_target[site.target], chosen[site.target]
        if isinstance(rank, str):
            decisions.append(decision(site, layer.stats, None, None, rank))
            continue
        estimate = float(layer.nsr[rank])
        weight = fetch_attr(gm, site.weight)
        # in the weight's dtype now (the rewrite would round them to it alike): half the memory of float64, and no
        # view keeping the spectrum's storage alive until the rewrite
        first, second = (f.to(weight.dtype) for f in projection_factors(site, weight, layer.spec, rank))
        bias = centred_bias(layer.spec, fetch_attr(gm, site.bias) if site.bias else None, rank)
        plan[site.target] = Factorization(first, second, {"nsr": estimate}, bias)
        decisions.append(decision(site, layer.stats, rank, estimate, "decomposed", adds_bias=bias is not None))
        log.debug("%s: rank %d/%d, nsr %.4g", site.target, rank, site.full_rank, estimate)
    return plan, decisions


def _budget_meter(prepared: Any, rounds: int, criterion: str) -> Any:
    """The meter of budget refinement (on the first kept calibration batch): the final NSR, or the rise of the
    loss the moments were collected for; None without rounds."""
    if rounds == 0 or criterion == "nsr" or prepared.sensitivity_moments is None:
        return None
    if not prepared.kept_inputs:
        log.info("falor budget: no calibration batch was kept (keep_batches=0), so the allocation is not refined "
                 "by measurement")
        return None
    from fxdeco.methods.falor.budget_measure import FinalNsrMeter, LossMeter  # the replay machinery

    if prepared.sensitivity_loss is not None:
        if not prepared.kept_raw:
            log.info("falor budget: the loader's batches were not kept (calibrate with fxdeco.calibrate), so the "
                     "allocation is not refined by measurement")
            return None
        return LossMeter(prepared.gm, prepared.sites, prepared.kept_inputs[:1], prepared.kept_raw[:1],
                         prepared.sensitivity_loss)
    meter = FinalNsrMeter(prepared.gm, prepared.sites, prepared.kept_inputs[:1], prepared.output_fn)
    if any(not isinstance(r, torch.Tensor) or r.dim() == 0 or r.shape[0] < 2 for r in meter.references):
        warn_user("falor budget: the allocation is not refined by measurement: the final-output NSR it measures needs "
                  "a batch of at least 2 samples, and the first calibration batch has fewer (calibrate with batches "
                  "of 2 samples or more, or pass budget_rounds=0 to say so)")
        return None
    return meter


def falor(prepared: Any, config: Falor) -> tuple[dict[str, Factorization], list[LayerDecision], dict[str, Any]]:
    """falor on a calibrated :class:`fxdeco.PreparedModel`, in one of three modes:

    * ``nsr_threshold`` (default): per layer, closed form (:func:`falor_local`);
    * ``keep_params`` / ``keep_macs``: a global budget (:func:`falor_local`), allocated by
      predicted final-output error, then ``budget_rounds`` times rescaled by a measurement
      of each allocated layer on the first calibration batch (``fxdeco.methods.falor.budget_measure``);
    * ``nsr_final_threshold`` / ``kl_final_threshold``: per layer, by the model's
      final output, every rank verified by measurement on the first
      ``num_metric_batches`` calibration batches (:func:`fxdeco.methods.falor.final.falor_final`).

    Returns the plan, the per-layer decisions and a summary for ``gm.meta``.
    """
    if config.loss_fn is not None and config.mode == "budget" and prepared.sensitivity_loss is not config.loss_fn:
        raise ValueError("Falor(loss_fn=...) weighs layers by the loss gradient's moments, collected during "
                         "calibration: prepare the model with fxdeco.prepare(..., sensitivity_loss=loss_fn) "
                         "(fxdeco.transform does)")
    latency = None
    if config.measures_latency:
        from fxdeco.methods.falor.speed import latency_model  # timing machinery, only when asked for

        latency = latency_model(prepared, config)
        latency.correction = 1.0  # each plan learns its own misses (the timings are shared by later converts)
        if config.keep_latency is not None:
            check_budget_reachable(prepared, config)  # re-times the original once before refusing a budget
    if config.mode != "final-output":
        meter = _budget_meter(prepared, config.budget_rounds, config.budget_criterion) \
            if config.mode == "budget" else None

        planner = LocalPlanner(prepared.gm, prepared.sites, prepared.statistics, config,
                               measure_final_nsr=meter.measure if meter is not None else None, latency=latency)
        plan, decisions = planner.plan()
        summary = ({"budget_rounds": config.budget_rounds, "probes": meter.probes, "metric_batches": 1,
                    "probe_forward_equivalents": meter.forward_equivalents()} if meter is not None else {})
        if config.mode == "budget" and prepared.sensitivity_moments is not None:
            summary["budget_weights"] = "loss" if prepared.sensitivity_loss is not None else "output"
    else:
        from fxdeco.methods.falor.final import falor_final  # the final-output mode's machinery, only when asked for

        kept, wanted = prepared.kept_inputs, config.num_metric_batches
        if len(kept) < wanted:
            raise ValueError(f"num_metric_batches={wanted} but only {len(kept)} calibration batch(es) were "
                             f"kept to measure on: lower num_metric_batches, or give at least {wanted} "
                             f"batches (with fxdeco.prepare: prepare(..., keep_batches={wanted}))")
        plan, decisions, summary = falor_final(prepared.gm, prepared.sites, prepared.statistics, config,
                                               metric_inputs=kept[:wanted], output_fn=prepared.output_fn)
        planner = None
        if config.accepts_by_speed:
            from fxdeco.methods.falor.speed import drop_slower

            plan, decisions = drop_slower(prepared.sites, plan, decisions, config, latency)
    if latency is not None:
        from fxdeco.methods.falor.speed import measure_latency_rounds

        plan, decisions, figures = measure_latency_rounds(prepared, config, latency, plan, decisions, planner)
        summary = {**summary, **figures}
        if planner is not None and meter is not None:  # the latency rounds' plans probed too
            summary.update(probes=meter.probes, probe_forward_equivalents=meter.forward_equivalents())
    return plan, decisions, summary
