"""falor (Features Are LOw Rank), local closed-form mode and global budget mode.

Each layer's output second moment is eigen-decomposed once; the layer-output
noise-to-signal ratio of *every* rank then follows in closed form (see
``fxdeco.lowrank``), so no forward pass is spent per candidate rank. Ranks are
chosen either

* per layer: the smallest rank whose NSR stays under ``nsr_threshold``; or
* globally: ``keep_params=0.6`` (or ``keep_macs=``) allocates ranks across all
  layers so the model keeps that fraction of its original size with the least
  summed layer NSR (``fxdeco.budget``).

``rank_multiple`` rounds ranks up to hardware-friendly multiples.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import statistics as statistics_lib
from typing import Any, Callable, Iterable, Mapping

import torch

from fxdeco.budget import BudgetError, LayerOptions, allocate
from fxdeco.errors import warn_user
from fxdeco.lowrank import (Spectrum, centred_bias, nsr_by_rank, output_error_by_rank, projection_factors,
                            spectrum)
from fxdeco.plan import (LayerDecision, check_fraction, decision, dense_macs, factored_macs, matches_any,
                         site_multiple, unique_targets)
from fxdeco.progress import progress
from passes import Factorization, Site, SiteStatistics
from passes.rewrite import factored_params
from passes.sites import fetch_attr

log = logging.getLogger(__name__)

# (ranks by layer, spectra by layer) -> measured final-output NSR by layer (fxdeco.budget_measure)
FinalNsrMeasure = Callable[[Mapping[str, int], Mapping[str, Spectrum]], Mapping[str, float]]


def smallest_rank(nsr: torch.Tensor, threshold: float, min_rank: int, full_rank: int) -> int:
    """Smallest ``k`` in ``[min_rank, full_rank]`` with ``nsr[k] <= threshold`` (full rank otherwise)."""
    candidates = torch.nonzero(nsr[min_rank: full_rank + 1] <= threshold)
    return min_rank + int(candidates[0]) if len(candidates) else full_rank


def round_rank(rank: int, multiple: int, full_rank: int) -> int:
    """Round ``rank`` up to a multiple of ``multiple``, at most ``full_rank``.

    Example:
        >>> round_rank(13, 8, 64), round_rank(61, 8, 64), round_rank(3, 8, 5)
        (16, 64, 5)
    """
    return min(full_rank, -(-rank // multiple) * multiple)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# Options only one of falor's modes reads. One beside another mode's options would be silently ignored.
MODE_OPTIONS = {
    "local": ("nsr_threshold",),
    "budget": ("keep_params", "keep_macs", "budget_criterion", "budget_rounds"),
    "final-output": ("nsr_final_threshold", "kl_final_threshold", "num_metric_batches", "max_probes", "rank_tolerance"),
}


def selected_mode(given: Iterable[str]) -> str:
    """The mode falor runs in for the option names ``given``: final-output thresholds, else a budget, else local."""
    given = set(given)
    if given & {"nsr_final_threshold", "kl_final_threshold"}:
        return "final-output"
    return "budget" if given & {"keep_params", "keep_macs"} else "local"


def check_mode_options(given: Iterable[str]) -> None:
    """Refuse an option that the selected mode would ignore (``given``: the names the caller passed).

    Example:
        >>> check_mode_options(["keep_params", "rank_multiple"])
        >>> check_mode_options(["nsr_threshold", "keep_params"])
        Traceback (most recent call last):
        ...
        ValueError: keep_params selects falor's budget mode, which ignores nsr_threshold (an option of its local \
mode); drop one of them
    """
    given = set(given)
    mode = selected_mode(given)
    selector = next((n for n in MODE_OPTIONS[mode] if n in given), None)
    for other, names in MODE_OPTIONS.items():
        ignored = next((n for n in names if n in given), None)
        if other != mode and ignored is not None:
            chooser = f"{selector} selects falor's {mode} mode" if selector is not None else \
                "falor runs in its local mode (no keep_params/keep_macs nor final-output threshold was given)"
            raise ValueError(f"{chooser}, which ignores {ignored} (an option of its {other} mode); drop one of them")


def check_options(
    *,
    nsr_threshold: float = 0.02,
    keep_params: float | None = None,
    keep_macs: float | None = None,
    nsr_final_threshold: float | None = None,
    kl_final_threshold: float | None = None,
    num_metric_batches: int = 2,
    max_probes: int = 8,
    rank_tolerance: float = 0.02,
    rank_multiple: int | str = "auto",
    budget_criterion: str = "auto",
    budget_rounds: int = 1,
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
    if keep_params is not None and keep_macs is not None:
        raise ValueError("give keep_params or keep_macs, not both")
    for name, value in (("keep_params", keep_params), ("keep_macs", keep_macs)):
        if value is not None:
            check_fraction(name, value)
    for name, value in (("nsr_final_threshold", nsr_final_threshold), ("kl_final_threshold", kl_final_threshold)):
        if value is not None:
            check_fraction(name, value, high=math.inf)
    if (nsr_final_threshold is not None or kl_final_threshold is not None) and \
            (keep_params is not None or keep_macs is not None):
        raise ValueError("give final-output thresholds (nsr_final_threshold / kl_final_threshold) or a budget "
                         "(keep_params / keep_macs), not both")
    _check_positive_int("num_metric_batches", num_metric_batches)
    _check_positive_int("max_probes", max_probes)
    check_fraction("rank_tolerance", rank_tolerance, low=-1e-12)
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping < 0 or math.isnan(damping):
        raise ValueError(f"damping must be a number >= 0, got {damping!r}")
    _check_positive_int("min_rank", min_rank)
    if rank_multiple != "auto":
        _check_positive_int("rank_multiple", rank_multiple)
    if isinstance(budget_rounds, bool) or not isinstance(budget_rounds, int) or budget_rounds < 0:
        raise ValueError(f"budget_rounds must be an integer >= 0, got {budget_rounds!r}")
    if budget_criterion not in ("auto", "nsr", "output"):
        raise ValueError(f"budget_criterion must be 'auto', 'nsr' or 'output', got {budget_criterion!r}")
    if isinstance(skip, str):  # a bare string would be read as one pattern per character
        raise TypeError(f"skip must be a list of glob patterns, got the string {skip!r}; write skip=[{skip!r}]")


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

    def candidate_ranks(self, min_rank: int, multiple: int | str, proportion_threshold: float) -> list[int]:
        """Ranks worth considering: multiples of ``multiple`` that save parameters."""
        return candidate_ranks(self.site, min_rank, multiple, proportion_threshold)


def candidate_ranks(s: Site, min_rank: int, multiple: int | str, proportion_threshold: float) -> list[int]:
    """The ranks a budget may give layer ``s``: multiples of ``multiple`` that save parameters."""
    multiple = site_multiple(s, multiple)
    ranks = sorted({round_rank(k, multiple, s.full_rank) for k in range(max(min_rank, 1), s.full_rank + 1)})
    return [k for k in ranks if k * (s.in_features + s.out_features) < s.in_features * s.out_features
            and k / s.full_rank <= proportion_threshold]


def option_costs(s: Site, stats: SiteStatistics, candidates: list[int], measure: str, center: bool) -> list[float]:
    """Params (or MACs per sample) of layer ``s`` dense, then factored at each candidate rank.

    A centred factorization carries a bias even where the layer had none.
    """
    if measure == "params":
        bias = s.out_features if s.bias else 0
        return [s.in_features * s.out_features + bias] + [
            factored_params(s, k) + (s.out_features if center else bias) for k in candidates]
    return [dense_macs(s, stats)] + [factored_macs(s, stats, k) for k in candidates]


def check_budget_reachable(prepared: Any, keep_params: float | None = None, keep_macs: float | None = None,
                           rank_multiple: int | str = "auto", min_rank: int = 1, proportion_threshold: float = 1.0,
                           center: bool = True, skip: Iterable[str] = (), **_: Any) -> None:
    """Raise :class:`fxdeco.budget.BudgetError` now if the budget is below what falor can reach.

    Every layer at its smallest candidate rank is the floor; it needs only the
    layers' shapes (and, for MACs, the rows per sample of one calibration
    batch), so ``fxdeco.transform`` calls this after the first batch instead
    of finding out after all of them.
    """
    if keep_params is None and keep_macs is None:
        return
    measure, keep = ("params", keep_params) if keep_params is not None else ("macs", keep_macs)
    statistics, total = prepared.statistics, _model_total(prepared.gm, measure)
    floor = total
    for site in unique_targets(prepared.sites):
        if matches_any(site.target, tuple(skip)) or site.target not in statistics:
            continue
        costs = option_costs(site, statistics[site.target],
                             candidate_ranks(site, int(min_rank), rank_multiple, proportion_threshold), measure, center)
        floor -= costs[0] - min(costs)
    if floor > keep * total * (1 + 1e-12):
        name = "keep_params" if measure == "params" else "keep_macs"
        raise BudgetError(f"{name}={keep:g} cannot be reached: decomposing every layer at its smallest rank keeps "
                          f"{floor / total:.4f} of the model's {measure} ({name} >= {floor / total:.4f} is "
                          "reachable; layers that are not Linear/Conv2d, skipped or too small to save anything "
                          "stay as they are)")


def _analyse(gm: torch.fx.GraphModule, sites: Iterable[Site], statistics: dict[str, SiteStatistics],
             damping: float, center: bool, show_progress: bool | None) -> list[_Layer]:
    layers = []
    for site in progress(sites, desc="falor: spectra", enabled=show_progress):
        stats = statistics[site.target]
        spec = spectrum(stats, damping, center)
        layers.append(_Layer(site, stats, spec, nsr_by_rank(spec)))
    return layers


def _threshold_ranks(layers: list[_Layer], nsr_threshold: float, min_rank: int, multiple: int | str,
                     proportion_threshold: float) -> dict[str, int | str]:
    """Per layer: the chosen rank, or the reason it stays dense."""
    chosen: dict[str, int | str] = {}
    for layer in layers:
        s = layer.site
        rank = round_rank(smallest_rank(layer.nsr, nsr_threshold, min(min_rank, s.full_rank), s.full_rank),
                          site_multiple(s, multiple), s.full_rank)
        if rank * (s.in_features + s.out_features) >= s.in_features * s.out_features:
            chosen[s.target] = f"rank {rank} would not reduce parameters"
        elif rank / s.full_rank > proportion_threshold:
            chosen[s.target] = f"rank {rank}/{s.full_rank} above proportion_threshold"
        else:
            chosen[s.target] = rank
    return chosen


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


def _budget_ranks(layers: list[_Layer], keep: float, measure: str, model_total: float, min_rank: int,
                  multiple: int | str, proportion_threshold: float, center: bool, use_output: bool,
                  scales: Mapping[str, float] | None = None) -> dict[str, int | str]:
    """Ranks for all layers at once so the model keeps ``keep`` of its params (or MACs).

    ``scales`` multiply layers' predicted final-output error curves (measured / predicted,
    ``fxdeco.budget_measure``); a layer without one gets the median scale, so all curves share a unit.
    """
    options, ranks = [], []
    default_scale = statistics_lib.median(scales.values()) if scales else 1.0
    for layer in layers:
        s = layer.site
        candidates = layer.candidate_ranks(min_rank, multiple, proportion_threshold)
        costs = option_costs(s, layer.stats, candidates, measure, center)
        curve = layer.output_error() * (scales or {}).get(s.target, default_scale) if use_output else layer.nsr
        errors = [0.0] + [float(curve[k]) for k in candidates]
        options.append(LayerOptions(s.target, torch.tensor(costs, dtype=torch.float64),
                                    torch.tensor(errors, dtype=torch.float64)))
        ranks.append([None] + candidates)
    fixed = model_total - sum(float(o.costs[0]) for o in options)
    choice = allocate(options, keep * model_total, fixed)
    total = fixed + sum(float(o.costs[i]) for o, i in zip(options, choice))
    log.info("falor budget: kept %.4f of the model's %s (asked %.4f)", total / model_total, measure, keep)
    return {layer.site.target: (r[i] if r[i] is not None else "kept dense by the budget allocation")
            for layer, r, i in zip(layers, ranks, choice)}


def _refine(layers: list[_Layer], chosen: dict[str, int | str], allocate_ranks: Callable[..., dict[str, int | str]],
            measure_final_nsr: FinalNsrMeasure, rounds: int) -> dict[str, int | str]:
    """Measure the allocated layers, rescale their predicted curves, allocate again; ``rounds`` times."""
    from fxdeco.budget_measure import measured_scales

    by_target = {layer.site.target: layer for layer in layers}
    scales: dict[str, float] = {}
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


def _model_total(gm: torch.fx.GraphModule, measure: str) -> float:
    """The original model's params/MACs per sample, recorded by ``fxdeco.prepare``."""
    totals = gm.meta.get("fxdeco_totals", {})
    if measure == "params":
        return float(totals.get("params", sum(p.numel() for p in gm.parameters())))
    if totals.get("macs") is None:
        raise ValueError("keep_macs needs the model's MACs: calibrate through fxdeco.prepare(...) first")
    return float(totals["macs"])


def falor_local(
    gm: torch.fx.GraphModule,
    sites: Iterable[Site],
    statistics: dict[str, SiteStatistics],
    *,
    nsr_threshold: float = 0.02,
    keep_params: float | None = None,
    keep_macs: float | None = None,
    rank_multiple: int | str = "auto",
    budget_criterion: str = "auto",
    damping: float = 0.0,
    min_rank: int = 1,
    proportion_threshold: float = 1.0,
    skip: Iterable[str] = (),
    center: bool = True,
    show_progress: bool | None = None,
    budget_rounds: int = 0,
    measure_final_nsr: FinalNsrMeasure | None = None,
) -> tuple[dict[str, Factorization], list[LayerDecision]]:
    """Plan the factorization of every site from its statistics.

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
    discarded directions folded into the bias (see ``fxdeco.lowrank``).

    With the output criterion, ``budget_rounds`` rounds of measurement refine the
    allocation: ``measure_final_nsr(ranks, spectra)`` returns each allocated
    layer's measured final-output NSR, which rescales its predicted curve before
    the next allocation (``fxdeco.budget_measure``; :func:`falor` wires it up).

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
    check_options(nsr_threshold=nsr_threshold, keep_params=keep_params, keep_macs=keep_macs,
                  rank_multiple=rank_multiple, budget_criterion=budget_criterion, damping=damping, min_rank=min_rank,
                  proportion_threshold=proportion_threshold, skip=skip)
    skip = tuple(skip)
    targets = unique_targets(sites)
    skipped = [s for s in targets if matches_any(s.target, skip)]
    layers = _analyse(gm, [s for s in targets if s not in skipped], statistics, damping, center, show_progress)
    min_rank = int(min_rank)
    if keep_params is not None or keep_macs is not None:
        measure, keep = ("params", keep_params) if keep_params is not None else ("macs", keep_macs)
        use_output = _uses_output_error(layers, budget_criterion)
        log.info("falor budget: allocating by %s",
                 "predicted final-output error" if use_output else "summed layer NSR")
        allocate_ranks = functools.partial(_budget_ranks, layers, float(keep), measure, _model_total(gm, measure),
                                           min_rank, rank_multiple, proportion_threshold, center, use_output)
        chosen = allocate_ranks()
        if use_output and measure_final_nsr is not None and budget_rounds > 0:
            chosen = _refine(layers, chosen, allocate_ranks, measure_final_nsr, budget_rounds)
    else:
        chosen = _threshold_ranks(layers, nsr_threshold, min_rank, rank_multiple, proportion_threshold)

    plan: dict[str, Factorization] = {}
    by_target = {layer.site.target: layer for layer in layers}
    decisions = []
    for site in targets:
        if site in skipped:
            decisions.append(decision(site, statistics[site.target], None, None, "skipped by pattern"))
            continue
        layer, rank = by_target[site.target], chosen[site.target]
        if isinstance(rank, str):
            decisions.append(decision(site, layer.stats, None, None, rank))
            continue
        estimate = float(layer.nsr[rank])
        first, second = projection_factors(site, fetch_attr(gm, site.weight), layer.spec, rank)
        bias = centred_bias(layer.spec, fetch_attr(gm, site.bias) if site.bias else None, rank)
        plan[site.target] = Factorization(first, second, {"nsr": estimate}, bias)
        decisions.append(decision(site, layer.stats, rank, estimate, "decomposed", adds_bias=bias is not None))
        log.debug("%s: rank %d/%d, nsr %.4g", site.target, rank, site.full_rank, estimate)
    return plan, decisions


def _budget_meter(prepared: Any, rounds: int, criterion: str) -> Any:
    """The final-NSR meter of budget refinement (on the first kept calibration batch), or None."""
    if rounds == 0 or criterion == "nsr" or prepared.sensitivity_moments is None:
        return None
    if not prepared.kept_inputs:
        log.info("falor budget: no calibration batch was kept (keep_batches=0), so the allocation is not refined "
                 "by measurement")
        return None
    from fxdeco.budget_measure import FinalNsrMeter  # the replay machinery, only when asked for

    return FinalNsrMeter(prepared.gm, prepared.sites, prepared.kept_inputs[:1], prepared.output_fn)


def falor(
    prepared: Any,
    *,
    nsr_threshold: float = 0.02,
    keep_params: float | None = None,
    keep_macs: float | None = None,
    nsr_final_threshold: float | None = None,
    kl_final_threshold: float | None = None,
    num_metric_batches: int = 2,
    max_probes: int = 8,
    rank_tolerance: float = 0.02,
    rank_multiple: int | str = "auto",
    budget_criterion: str = "auto",
    budget_rounds: int = 1,
    damping: float = 0.0,
    min_rank: int = 1,
    proportion_threshold: float = 1.0,
    skip: Iterable[str] = (),
    center: bool = True,
    show_progress: bool | None = None,
) -> tuple[dict[str, Factorization], list[LayerDecision], dict[str, Any]]:
    """falor on a calibrated :class:`fxdeco.PreparedModel`, in one of three modes:

    * ``nsr_threshold`` (default): per layer, closed form (:func:`falor_local`);
    * ``keep_params`` / ``keep_macs``: a global budget (:func:`falor_local`), allocated by
      predicted final-output error, then ``budget_rounds`` times rescaled by a measurement
      of each allocated layer on the first calibration batch (``fxdeco.budget_measure``);
    * ``nsr_final_threshold`` / ``kl_final_threshold``: per layer, by the model's
      final output, every rank verified by measurement on the first
      ``num_metric_batches`` calibration batches (:func:`fxdeco.falor_final.falor_final`).

    Returns the plan, the per-layer decisions and a summary for ``gm.meta``.
    """
    check_options(nsr_threshold=nsr_threshold, keep_params=keep_params, keep_macs=keep_macs,
                  nsr_final_threshold=nsr_final_threshold, kl_final_threshold=kl_final_threshold,
                  num_metric_batches=num_metric_batches, max_probes=max_probes, rank_tolerance=rank_tolerance,
                  rank_multiple=rank_multiple, budget_criterion=budget_criterion, budget_rounds=budget_rounds,
                  damping=damping, min_rank=min_rank, proportion_threshold=proportion_threshold, skip=skip)
    common = dict(rank_multiple=rank_multiple, min_rank=int(min_rank), proportion_threshold=proportion_threshold,
                  damping=damping, center=center, skip=skip, show_progress=show_progress)
    if nsr_final_threshold is None and kl_final_threshold is None:
        budget = keep_params is not None or keep_macs is not None
        meter = _budget_meter(prepared, budget_rounds, budget_criterion) if budget else None
        plan, decisions = falor_local(prepared.gm, prepared.sites, prepared.statistics, nsr_threshold=nsr_threshold,
                                      keep_params=keep_params, keep_macs=keep_macs,
                                      budget_criterion=budget_criterion, budget_rounds=budget_rounds,
                                      measure_final_nsr=meter.measure if meter is not None else None, **common)
        return plan, decisions, ({"budget_rounds": budget_rounds, "probes": meter.probes, "metric_batches": 1,
                                  "probe_forward_equivalents": meter.forward_equivalents()}
                                 if meter is not None else {})
    from fxdeco.falor_final import falor_final  # the final-output mode's machinery, only when asked for

    kept = prepared.kept_inputs
    if len(kept) < num_metric_batches:
        raise ValueError(f"num_metric_batches={num_metric_batches} but only {len(kept)} calibration batch(es) were "
                         f"kept to measure on: lower num_metric_batches, or give at least {num_metric_batches} "
                         f"batches (with fxdeco.prepare: prepare(..., keep_batches={num_metric_batches}))")
    return falor_final(prepared.gm, prepared.sites, prepared.statistics, metric_inputs=kept[:num_metric_batches],
                       nsr_final_threshold=math.inf if nsr_final_threshold is None else nsr_final_threshold,
                       kl_final_threshold=kl_final_threshold, output_fn=prepared.output_fn, max_probes=max_probes,
                       rank_tolerance=rank_tolerance, **common)
