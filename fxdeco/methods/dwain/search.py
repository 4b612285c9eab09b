"""dwain on the graph: layers from the last to the first, each at the smallest rank the loss accepts.

ptdeco's dwain runs the whole model twice per probe (the layer decomposed,
and the current model) on every metric batch, and recomputes each layer's
covariance with more forward passes. Here:

1. **One recorded reference run per metric batch** (:class:`passes.RecordedRun`).
   Layers go from the last to the first, so everything upstream of the layer
   being tried is still the original: a probe replays only the graph after the
   layer, with the already accepted layers' projections applied where the
   replay reaches them. The current model's output and loss are those of the
   last accepted probe, so they cost nothing more.
2. **A screen from the loss's own gradient.** One backward pass of ``loss_fn``
   per metric batch gives, at every layer's output, the moment ``G = Σ_rows g gᵀ``
   of the loss gradient (an empirical Fisher; :class:`passes.SensitivityInterpreter`
   with ``random_projection=False``). Dropping the directions ``j > k`` of the
   layer's output spectrum then raises the loss by about ``½ R tr(G Σ_δ(k))``
   (``R`` rows per batch, ``Σ_δ(k)`` the error covariance of the rank-k
   projection) for every rank at once. Ranks are tried from the smallest up;
   one whose predicted ``ppl_diff`` (rescaled by what the probes of the same
   role measured so far) exceeds its threshold by more than :data:`SCREEN` is
   not measured, and a measured one whose first metric batch alone reaches
   :data:`SCOUT` times its threshold is rejected without the others. With
   ``predict=False`` every rank is measured on every batch up to the first that
   passes, which is ptdeco's decision exactly (its smallest accepted rank).
3. **Statistics are not refreshed.** A layer's factors come from its output
   covariance, i.e. from its inputs; going from the last layer to the first,
   no layer upstream of the one being tried has changed, so its calibration
   statistics are exactly what ptdeco's per-layer covariance pass recomputes.

Under torch.distributed (:mod:`fxdeco.distributed`) each rank measures on its own
metric batches: the loss gradient's moments and every probe's sums of
``ppl_diff`` and NSR are all-reduced with their counts before a rank is accepted
or screened out, so every rank takes the same decisions. ``finetune_fn`` is
refused there (each rank would train its own graph on its own data).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, Callable, Sequence

import torch
import torch.fx

from fxdeco import distributed
from fxdeco.errors import CalibrationError, warn_user
from fxdeco.methods.dwain.config import Dwain
from fxdeco.methods.falor.final_metrics import final_nsr
from fxdeco.methods.falor.lowrank import (Spectrum, centred_bias, output_error_by_rank, output_projection,
                                          projection_factors, spectrum)
from fxdeco.modes import eval_mode
from fxdeco.outputs import default_logits, select_output
from fxdeco.plan import LayerDecision, decision, matches_any, unique_targets
from fxdeco.progress import progress
from passes import (Factorization, RecordedRun, SensitivityInterpreter, Site, SiteStatistics, factorize_sites,
                    fresh_inputs)
from passes.cost import graph_macs
from passes.sites import fetch_attr, site_input

log = logging.getLogger(__name__)

# A rank is measured unless its predicted ppl_diff is over SCREEN times its threshold: the prediction is first
# order and rescaled by measurements, so a margin keeps ranks that may pass in.
SCREEN = 3.0
# With predict=True, a measured rank whose first metric batch alone raises ppl_diff to SCOUT times its threshold is
# rejected without the other batches: its mean could pass only if the others improved on the current model's loss.
SCOUT = 2.0


def check_loss(loss_fn: Callable[[Any, Any], torch.Tensor], output: Any, batch: Any, index: int,
               what: str = "metric batch") -> torch.Tensor:
    """``loss_fn(output, batch)`` as a finite scalar tensor; anything else is an error naming the batch.

    Example:
        >>> check_loss(lambda out, b: out.mean(), torch.ones(2, 3), None, 0)
        tensor(1.)
        >>> check_loss(lambda out, b: out, torch.ones(2, 3), None, 4)
        Traceback (most recent call last):
        ...
        fxdeco.errors.CalibrationError: loss_fn returned a tensor of shape (2, 3) on metric batch 4; it must return \
a scalar (reduce the loss, e.g. with .mean())
    """
    try:
        loss = loss_fn(output, batch)
    except Exception as exc:
        raise CalibrationError(f"loss_fn failed on {what} {index}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(loss, torch.Tensor):
        raise CalibrationError(f"loss_fn returned a {type(loss).__name__} on {what} {index}; it must return a "
                               "scalar tensor")
    if loss.numel() != 1:
        raise CalibrationError(f"loss_fn returned a tensor of shape {tuple(loss.shape)} on {what} {index}; it "
                               "must return a scalar (reduce the loss, e.g. with .mean())")
    if not torch.isfinite(loss).all():
        raise CalibrationError(f"loss_fn returned {float(loss)} on {what} {index} of the original model; it "
                               "must be finite")
    return loss.reshape(())


def rows_nsr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Per-channel NSR with every dimension but the last one as samples (ptdeco's dwain: a token is a sample).

    Example:
        >>> y = torch.randn(2, 5, 3)
        >>> rows_nsr(y, y)
        0.0
    """
    if reference.dim() > 2:
        reference, approx = reference.reshape(-1, reference.shape[-1]), approx.reshape(-1, approx.shape[-1])
    return final_nsr(reference, approx)


@dataclasses.dataclass
class _Batch:
    """One metric batch: its recorded reference run and the current model's output and loss on it."""

    raw: Any
    run: RecordedRun
    output: Any
    loss: float


@dataclasses.dataclass
class Probe:
    """One rank of one layer, measured on every metric batch against the current model."""

    rank: int
    ppl_diff: float  # mean over batches of (exp(loss') - exp(loss)) / exp(loss)
    nsr: float  # mean over batches of the final-output NSR against the current model
    outputs: list[Any]
    losses: list[float]
    batches: int = 0  # metric batches this rank measured (fewer than all: rejected by the scout)


@dataclasses.dataclass
class Thresholds:
    """ptdeco's acceptance rule for one layer."""

    trade_off: float  # ppl_diff < trade_off * removed / total
    max_ppl_diff: float
    max_nsr: float
    total_params: int

    def ppl_limit(self, removed: int) -> float:
        """The largest ``ppl_diff`` a rank removing ``removed`` parameters may cause (exclusive).

        Example:
            >>> Thresholds(0.5, 0.1, math.inf, 1000).ppl_limit(100)   # 0.5 * 100 / 1000 = 0.05, under 0.1
            0.05
        """
        return min(self.trade_off * removed / self.total_params, self.max_ppl_diff)

    def accepts(self, probe: Probe, removed: int) -> bool:
        """Whether ``probe`` passes: ``ppl_diff`` under its limit and the NSR under ``max_nsr`` (an NSR left
        unmeasured, NaN, passes an infinite ``max_nsr`` only)."""
        nsr_ok = probe.nsr < self.max_nsr or (math.isnan(probe.nsr) and math.isinf(self.max_nsr))
        return probe.ppl_diff < self.ppl_limit(removed) and nsr_ok


def layer_role(target: str) -> str:
    """The layer's role, shared by the same layer of every repeated block: its name with the numeric path components
    *before the last one* (block indices) replaced. The last component stays: in ``nn.Sequential`` / ``ModuleList``
    stacks (``mlp.0``, ``mlp.2``) it tells different layers apart, as do digits inside a name (``fc1``, ``fc2``),
    whose measured/predicted ratios differ by several times.

    Example:
        >>> layer_role("blocks.3.mlp.fc1"), layer_role("blocks.3.mlp.fc2"), layer_role("layers.0"), layer_role("3.up")
        ('blocks.#.mlp.fc1', 'blocks.#.mlp.fc2', 'layers.0', '#.up')
    """
    return re.sub(r"(?<![^.])\d+(?=\.)", "#", target)


def measure_probe(rank: int, limit: float, run: Callable[[int], Any], batches: Sequence[Any], config: Dwain,
                  compared: Callable[[Any], torch.Tensor] | None) -> Probe:
    """ptdeco's measurements of one rank on every metric batch (every rank's, under torch.distributed): the mean
    ``ppl_diff`` against the current model (each of ``batches`` has the loader's batch ``.raw`` and the current
    model's ``.output`` and ``.loss`` on it) and, with ``compared`` (an
    ``nsr_final_threshold``), the mean final-output NSR; ``run(i)`` is the model's output on metric batch ``i``
    with the rank applied. With ``config.predict`` the scout stops a rank whose first metric batch alone is
    :data:`SCOUT` times over ``limit``."""
    outputs, losses, diffs, nsrs = [], [], [], []
    for index, b in enumerate(batches):
        out = run(index)
        loss = float(config.loss_fn(out, b.raw).reshape(()))
        outputs.append(out)
        losses.append(loss)
        # exp(a) / exp(b) - 1 without overflowing for large losses (expm1 raises OverflowError above ~709)
        rise = loss - b.loss
        diffs.append(math.expm1(rise) if math.isfinite(loss) and rise < 700.0 else math.inf)
        if compared is not None:  # else measured for the accepted rank only (for the report): it decides nothing
            nsrs.append(rows_nsr(compared(b.output), compared(out)))
        if config.predict and index == 0 and len(batches) > 1:
            # the scout: a rank whose first metric batch (every rank's first, under torch.distributed) already
            # exceeds SCOUT times its limit is not measured on the others
            first = distributed.means([(diffs[0], 1)])[0]
            if first >= SCOUT * limit:
                return Probe(rank, first, math.nan, outputs, losses, batches=1)
    # the means over every rank's metric batches (this rank's alone outside torch.distributed)
    ppl_diff, nsr = distributed.means([(sum(diffs), len(diffs)), (sum(nsrs), len(nsrs))])
    return Probe(rank, ppl_diff, nsr, outputs, losses, batches=len(diffs))


def removed_params(site: Site, rank: int) -> int:
    """Weights a rank removes, as ptdeco counts them: ``out * in - rank * (in + out)`` (biases unchanged)."""
    return site.out_features * site.in_features - site.factor_params(rank)


@dataclasses.dataclass
class Substitute:
    """What a replay does at a decomposed layer's nodes: Linear layers are computed factored from their input
    (``replacements``: cheaper than the dense layer); Conv2d layers project the dense output (``overrides``)."""

    overrides: dict[str, Callable[[torch.Tensor], Any]]
    replacements: dict[str, tuple[str, Callable[[torch.Tensor], Any]]]


def substitute(graph: torch.fx.GraphModule, site: Site, nodes: list[str], spec: Spectrum, bias: torch.Tensor | None,
               rank: int) -> Substitute:
    """How a replay computes ``site`` (at each of its ``nodes``) at ``rank``: exactly what the factored layer does."""
    if site.kind != "linear":
        project = output_projection(site, spec, bias, rank)
        return Substitute({name: project for name in nodes}, {})
    first, second = projection_factors(site, fetch_attr(graph, site.weight), spec, rank)
    new_bias = centred_bias(spec, bias, rank)
    if new_bias is None and bias is not None:
        new_bias = bias.detach().reshape(-1)
    weight = fetch_attr(graph, site.weight)
    first, second = first.to(weight).contiguous(), second.to(weight).contiguous()  # (rank, in), (out, rank)
    new_bias = new_bias.to(weight) if new_bias is not None else None

    def factored(x: torch.Tensor) -> torch.Tensor:
        # F.linear, not x @ first.T: a batched matmul with a transposed operand runs 2-3x slower on a CPU
        return torch.nn.functional.linear(torch.nn.functional.linear(x, first), second, new_bias)

    by_name = {n.name: n for n in graph.graph.nodes}
    return Substitute({}, {name: (site_input(by_name[name]).name, factored) for name in nodes})


def _loss_moments(gm: torch.fx.GraphModule, sites: list[Site], flats: Sequence[Sequence[Any]], raws: Sequence[Any],
                  loss_fn: Callable[[Any, Any], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per site, ``Σ_rows g gᵀ`` of the loss gradient at its output, averaged over the metric batches (every
    rank's, under torch.distributed)."""
    moments: dict[str, torch.Tensor] = {}
    for index, (flat, raw) in enumerate(zip(flats, raws)):
        interp = SensitivityInterpreter(gm, sites, output_fn=lambda out, raw=raw, i=index: check_loss(
            loss_fn, out, raw, i), moments=moments, random_projection=False)
        interp.run(*fresh_inputs(flat))
    if distributed.current() is not None:
        moments = distributed.all_sum_tensors(moments)
        return {t: m / distributed.all_sum([len(flats)])[0] for t, m in moments.items()}
    return {t: m / len(flats) for t, m in moments.items()}


def dwain(prepared: Any, config: Dwain) -> tuple[dict[str, Factorization], list[LayerDecision], dict[str, Any],
                                                 torch.fx.GraphModule | None]:
    """dwain on a calibrated :class:`fxdeco.PreparedModel` (see the module docstring).

    Returns the plan, the per-layer decisions (``ppl_diff``, ``nsr_final`` and
    ``probes`` measured at the accepted rank), a summary of the work done, and
    the decomposed graph when ``finetune_fn`` trained it (else None: the plan
    applies to the original graph).
    """
    wanted = config.num_metric_batches
    if config.finetune_fn is not None and distributed.world() > 1:
        # each rank would train its own graph on its own data and the ranks' models would drift apart
        raise ValueError("dwain's finetune_fn trains the graph on each process separately, so the ranks of "
                         "torch.distributed would end with different models: pass process_group=False to "
                         "fxdeco.convert/transform and run dwain with finetune_fn in one process (e.g. on rank 0 "
                         "after fxdeco.distributed.all_reduce_statistics), or drop finetune_fn")
    if len(prepared.kept_inputs) < wanted or len(prepared.kept_raw) < wanted:
        raise ValueError(f"num_metric_batches={wanted} but only {min(len(prepared.kept_inputs), len(prepared.kept_raw))}"
                         f" calibration batch(es) were kept: give at least {wanted} batches, through fxdeco.transform or "
                         f"fxdeco.calibrate (they keep the loader's batches for loss_fn; with fxdeco.prepare: "
                         f"keep_batches={wanted})")
    gm, all_sites = prepared.gm, list(prepared.sites)
    targets = unique_targets(all_sites)
    work = [s for s in targets if not matches_any(s.target, config.skip)]
    flats, raws = prepared.kept_inputs[:wanted], prepared.kept_raw[:wanted]
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    nodes_of: dict[str, list[str]] = {}
    for s in all_sites:
        nodes_of.setdefault(s.target, []).append(s.node)
    first_node = {s.target: min(nodes_of[s.target], key=order.__getitem__) for s in work}
    with eval_mode(gm):
        moments = _loss_moments(gm, all_sites, flats, raws, config.loss_fn) if config.predict else {}
        with torch.no_grad():
            state = _State(gm, all_sites, flats, raws, config)
            state.record([first_node[s.target] for s in work])
            plan, decisions, summary = _search_all(prepared, state, work, first_node, nodes_of, moments)
    by_target = {d.target: d for d in decisions}
    ordered = [by_target.get(s.target) or decision(s, prepared.statistics[s.target], None, None, "skipped by pattern")
               for s in targets]
    return plan, ordered, summary, state.finish()


class _State:
    """The graph dwain works on, the accepted layers not yet factored into it, and the metric batches' runs.

    Without ``finetune_fn`` the graph is the original throughout and every
    accepted layer is an override of its output (a projection) in the
    replays. With it, each accepted layer is factored into the graph, the
    callback trains that graph, and the metric batches are recorded again on
    it (the callback may have changed anything downstream).
    """

    def __init__(self, gm: torch.fx.GraphModule, sites: list[Site], flats: Sequence[Sequence[Any]],
                 raws: Sequence[Any], config: Dwain) -> None:
        self.graph, self.sites, self.flats, self.raws, self.config = gm, sites, flats, raws, config
        self.pending: dict[str, Factorization] = {}  # accepted, not yet factored into self.graph
        self.overrides: dict[str, Callable[[torch.Tensor], Any]] = {}  # how replays compute them, by node
        self.replacements: dict[str, tuple[str, Callable[[torch.Tensor], Any]]] = {}
        self.accepted: list[str] = []
        self.tuned = False
        self.warned_upstream = False  # finetune_fn changed weights that the layers still to be tried depend on
        self.batches: list[_Batch] = []
        self.replayed_macs = 0

    def record(self, starts: list[str]) -> None:
        """Run every metric batch through the current graph once, keeping what replays from ``starts`` read."""
        self.replayed_macs += sum(b.run.replayed_macs for b in self.batches)
        self.batches = []
        for index, (flat, raw) in enumerate(zip(self.flats, self.raws)):
            run = RecordedRun(self.graph, flat, starts=starts)
            loss = float(check_loss(self.config.loss_fn, run.result, raw, index))
            self.batches.append(_Batch(raw, run, run.result, loss))

    def accept(self, site: Site, fact: Factorization, sub: Substitute, probe: Probe,
               remaining_starts: list[str]) -> None:
        """Make ``site`` at ``fact`` part of the current model; with ``finetune_fn``, factor it in and train."""
        self.accepted.append(site.target)
        self.pending[site.target] = fact
        self.overrides.update(sub.overrides)
        self.replacements.update(sub.replacements)
        for b, out, loss in zip(self.batches, probe.outputs, probe.losses):
            b.output, b.loss = out, loss  # the current model is now the one with this layer decomposed
        if self.config.finetune_fn is None:
            return
        graph = self._factored()
        with torch.enable_grad():
            tuned = self.config.finetune_fn(graph, list(self.accepted))
        if tuned is not None and not isinstance(tuned, torch.fx.GraphModule):
            raise TypeError(f"finetune_fn must return the graph it was given (or a GraphModule, or None), got "
                            f"{type(tuned).__name__}")
        tuned = tuned if tuned is not None else graph
        if not self.warned_upstream:
            self.warned_upstream = _warn_if_upstream_changed(self.graph, tuned, remaining_starts)
        self.graph = tuned.eval()
        self.pending, self.overrides, self.replacements, self.tuned = {}, {}, {}, True
        if remaining_starts:
            self.record(remaining_starts)

    def _factored(self) -> torch.fx.GraphModule:
        sites = [s for s in self.sites if s.target in self.pending]
        return factorize_sites(self.graph, sites, self.pending)

    def finish(self) -> torch.fx.GraphModule | None:
        """The decomposed graph when the callback trained it (None: apply the plan to the original graph)."""
        return self._factored() if self.tuned else None


def _warn_if_upstream_changed(before: torch.fx.GraphModule, after: torch.fx.GraphModule,
                               remaining: list[str]) -> bool:
    """Warn, and return True, when ``finetune_fn`` changed a parameter that a layer still to be tried depends on.

    Those layers' factors come from statistics calibrated on the original weights: fxdeco reads the loader once
    and does not recompute them (ptdeco does, at the cost of a pass over the data per layer). A ``finetune_fn``
    that trains only the decomposed layers (LoRA on them, ptdeco's example) changes nothing upstream.
    """
    nodes = {n.name: n for n in after.graph.nodes}
    upstream: set[torch.fx.Node] = set()
    stack = [nodes[name] for name in remaining if name in nodes]
    while stack:  # the remaining layers' nodes and everything they read from
        node = stack.pop()
        if node not in upstream:
            upstream.add(node)
            stack.extend(node.all_input_nodes)
    targets = {str(n.target) for n in upstream if n.op in ("call_module", "get_attr")}
    old = dict(before.named_parameters())
    changed = sorted(name for name, p in after.named_parameters()
                     if any(name == t or name.startswith(t + ".") for t in targets)
                     and name in old and old[name].shape == p.shape and not torch.equal(old[name], p))
    if changed:
        warn_user(f"dwain's finetune_fn changed {', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''}, "
                  "which layers still to be tried depend on: their factors come from statistics calibrated on the "
                  "original weights (the loader is read once), so they fit those layers' old inputs. Train only "
                  "the decomposed layers in finetune_fn (e.g. LoRA on them) to keep the statistics exact")
    return bool(changed)


def _search_all(prepared: Any, state: _State, work: list[Site], first_node: dict[str, str],
                nodes_of: dict[str, list[str]], moments: dict[str, torch.Tensor]
                ) -> tuple[dict[str, Factorization], list[LayerDecision], dict[str, Any]]:
    gm, statistics, config = prepared.gm, prepared.statistics, state.config
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    limits = Thresholds(config.trade_off_factor, config.max_accepted_ppl_diff, config.nsr_final_threshold,
                        prepared.params_original)
    strict = math.isfinite(config.nsr_final_threshold)

    def compared(output: Any) -> torch.Tensor:
        return select_output(output, prepared.output_fn) if strict or prepared.output_fn else default_logits(output)

    plan: dict[str, Factorization] = {}
    decisions: list[LayerDecision] = []
    scale_by_role: dict[str, float] = {}
    probes = skipped = scouted = 0
    reverse = sorted(work, key=lambda s: order[first_node[s.target]], reverse=True)
    for position, site in enumerate(progress(reverse, desc="dwain: layers, last first", enabled=config.show_progress)):
        stats = statistics[site.target]
        spec = spectrum(stats, config.damping, config.center)
        bias = fetch_attr(state.graph, site.bias) if site.bias else None
        candidates = sorted(config.candidate_ranks(site))  # smallest first: the first to pass is the smallest
        predicted = _predicted_loss_increase(spec, moments.get(site.target), stats, prepared.batches)
        role = layer_role(site.target)

        def measure(rank: int, limit: float) -> Probe:
            sub = substitute(state.graph, site, nodes_of[site.target], spec, bias, rank)
            overrides = {**state.overrides, **sub.overrides}
            replacements = {**state.replacements, **sub.replacements}
            return measure_probe(rank, limit, lambda i: state.batches[i].run.replay_from(
                first_node[site.target], overrides, replacements), state.batches, config, compared if strict else None)

        accepted: Probe | None = None
        count = 0
        for rank in candidates:
            removed = removed_params(site, rank)
            if predicted is not None and role in scale_by_role:
                guess = math.expm1(min(scale_by_role[role] * float(predicted[rank]), 700.0))
                if guess > SCREEN * limits.ppl_limit(removed):
                    skipped += 1
                    continue
            probe = measure(rank, limits.ppl_limit(removed))
            log.debug("%s rank %d: ppl_diff %.4g measured on %d batch(es) (limit %.4g), predicted %s", site.target,
                      rank, probe.ppl_diff, probe.batches, limits.ppl_limit(removed),
                      "-" if predicted is None or role not in scale_by_role else
                      f"{math.expm1(scale_by_role[role] * float(predicted[rank])):.4g}")
            count += 1
            scouted += probe.batches < len(state.batches)
            if predicted is not None and float(predicted[rank]) > 0 and probe.ppl_diff > -1:
                scale_by_role[role] = math.log1p(max(probe.ppl_diff, 0.0)) / float(predicted[rank]) or 1e-12
            if limits.accepts(probe, removed):
                accepted = probe
                break
        probes += count
        if accepted is None:
            reason = ("no candidate rank passes the loss criterion" if candidates
                      else f"no rank from min_rank={config.min_rank} saves parameters")
            decisions.append(dataclasses.replace(decision(site, stats, None, None, reason), probes=count))
            continue
        rank = accepted.rank
        if math.isnan(accepted.nsr):
            accepted.nsr = distributed.means([(sum(rows_nsr(compared(b.output), compared(out))
                                                   for b, out in zip(state.batches, accepted.outputs)),
                                               len(state.batches))])[0]
        first_factor, second = projection_factors(site, fetch_attr(state.graph, site.weight), spec, rank)
        new_bias = centred_bias(spec, bias, rank)
        meta = {"ppl_diff": accepted.ppl_diff, "nsr_final": accepted.nsr, "probes": count}
        plan[site.target] = Factorization(first_factor, second, meta, new_bias)
        state.accept(site, plan[site.target], substitute(state.graph, site, nodes_of[site.target], spec, bias, rank),
                     accepted, [first_node[s.target] for s in reverse[position + 1:]])
        d = decision(site, stats, rank, None, "decomposed", adds_bias=new_bias is not None)
        decisions.append(dataclasses.replace(d, nsr_final=accepted.nsr, ppl_diff=accepted.ppl_diff, probes=count))
        log.debug("%s: rank %d/%d, ppl_diff %.4g (limit %.4g), nsr %.4g, %d probes", site.target, rank,
                  site.full_rank, accepted.ppl_diff, limits.ppl_limit(removed_params(site, rank)), accepted.nsr, count)
    total_macs = graph_macs(gm)
    replayed = state.replayed_macs + sum(b.run.replayed_macs for b in state.batches)
    summary = {
        "probes": probes,
        "ranks_screened_out": skipped,
        "probes_stopped_by_the_scout": scouted,
        "metric_batches": len(state.batches) * distributed.world(),  # each rank measures on its own
        # the probes' cost in whole forward passes of one metric batch (MACs replayed / MACs of the graph)
        "probe_forward_equivalents": replayed / total_macs if total_macs else None,
    }
    log.info("dwain: %d of %d layers decomposed with %d probes (%d ranks screened out; %.1f forward passes of a "
             "metric batch)", len(plan), len(work), probes, skipped, summary["probe_forward_equivalents"] or math.nan)
    return plan, decisions, summary


def _predicted_loss_increase(spec: Spectrum, moment: torch.Tensor | None, stats: SiteStatistics,
                             batches: int) -> torch.Tensor | None:
    """Per rank, ``½ R tr(G Σ_δ(k))``: the loss increase the rank-k projection is predicted to cause (None
    without the loss gradient's moment, e.g. ``predict=False`` or a layer the loss does not reach)."""
    if moment is None:
        return None
    rows = float(stats.weight if stats.weight is not None else stats.rows) / max(batches, 1)
    return 0.5 * rows * output_error_by_rank(spec, moment)
