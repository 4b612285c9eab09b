"""Budget mode, measured: rescale each layer's predicted final-output error by a probe at its allocated rank.

falor's budget mode allocates ranks across layers by the *predicted* final-output
error of every rank (output-gradient moments, ``fxdeco.methods.falor.lowrank.output_error_by_rank``).
That prediction is first order: it is good at mild compression and misjudges how
much a layer matters once its error is large (on the Fashion-MNIST ViT at 7% of
the parameters it was worse than ptdeco's equal-threshold allocation by 15
accuracy points). A refinement round measures, for every layer the allocation
decomposed, the final-output NSR with only that layer decomposed at its allocated
rank (a suffix replay, as in final-output mode, on the first calibration batch),
scales the layer's whole predicted curve so it passes through the measurement,
and allocates again. One round is about one probe per layer.

Example:
    >>> scales = measured_scales({"a": 0.02, "b": 0.0}, {"a": 0.01, "b": 0.5})
    >>> scales["a"], scales["b"] > 0   # a measured zero is clamped to a small positive scale
    (2.0, True)
"""

from __future__ import annotations

import logging
import statistics as stats_lib
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx

from fxdeco import distributed
from fxdeco.methods.falor.final import Probe, metric_references
from fxdeco.methods.falor.lowrank import Spectrum
from fxdeco.modes import eval_mode
from fxdeco.outputs import OutputFn
from passes import Site, fresh_inputs
from passes.cost import graph_macs
from passes.replay import GraphWalk
from passes.sites import fetch_attr

log = logging.getLogger(__name__)

# How far one layer's scale may stray from the median scale: a measurement of (almost) zero
# must not make a layer look free at every rank.
_SCALE_SPREAD = 100.0


def measured_scales(measured: Mapping[str, float], predicted: Mapping[str, float]) -> dict[str, float]:
    """``measured / predicted`` per layer, clamped to within ``_SCALE_SPREAD`` of the median ratio."""
    ratios = {t: measured[t] / predicted[t] for t in measured if predicted.get(t, 0.0) > 0}
    if not ratios:
        return {}
    centre = stats_lib.median(r for r in ratios.values() if r > 0) if any(r > 0 for r in ratios.values()) else 1.0
    low, high = centre / _SCALE_SPREAD, centre * _SCALE_SPREAD
    return {t: min(max(r, low), high) for t, r in ratios.items()}


class FinalNsrMeter:
    """Measures final-output NSRs of single layers at given ranks on fixed metric batches.

    The reference outputs are computed once; each :meth:`measure` call walks the
    graph once per metric batch and replays, per layer, only the nodes after it.
    """

    def __init__(self, gm: torch.fx.GraphModule, sites: Sequence[Site], metric_inputs: Sequence[Sequence[Any]],
                 output_fn: OutputFn | None) -> None:
        self.gm, self.metric_inputs, self.output_fn = gm, list(metric_inputs), output_fn
        self.order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        self.nodes_of: dict[str, list[str]] = {}
        self.site_of: dict[str, Site] = {}
        for s in sites:
            self.nodes_of.setdefault(s.target, []).append(s.node)
            self.site_of.setdefault(s.target, s)
        with eval_mode(gm), torch.no_grad():
            self.references = self._references()
        self.probes = 0
        self.replayed_macs = 0.0  # MACs the probes' replays ran (passes.replay.GraphWalk), for cost accounting
        # errors measured so far, by (layer, rank): a latency budget allocates several times over the same spectra
        self.known: dict[tuple[str, int], float] = {}

    def _references(self) -> list[Any]:
        """What the error is measured against, per metric batch: the original's output."""
        return metric_references(self.gm, self.metric_inputs, self.output_fn)

    def _error(self, probe: Probe, rank: int) -> float:
        """The error of one layer at ``rank`` (its walks stopped at the layer): the final NSR (averaged over every
        rank's metric batches by :meth:`Probe.measure`)."""
        return probe.measure(rank).nsr

    def measure(self, ranks: Mapping[str, int], spectra: Mapping[str, Spectrum]) -> dict[str, float]:
        """``{layer: its error with only that layer at ranks[layer]}`` (mean over the metric batches).

        Under torch.distributed (:mod:`fxdeco.distributed`) each rank measures on its own metric batches and each
        error is the mean over every rank's (reduced by :meth:`_error`), the same on all ranks: the budget's next
        allocation depends on it. A (layer, rank) measured before is not measured again (``spectra`` must be the
        same for the meter's whole life, as within one plan).
        """
        result = {t: self.known[(t, r)] for t, r in ranks.items() if (t, r) in self.known}
        ranks = {t: r for t, r in ranks.items() if t not in result}
        if not ranks:
            return result
        first = {t: min(self.nodes_of[t], key=self.order.__getitem__) for t in ranks}
        with eval_mode(self.gm), torch.no_grad():
            walks = [GraphWalk(self.gm, flat) for flat in self.metric_inputs]
            for target in sorted(ranks, key=lambda t: self.order[first[t]]):
                for walk in walks:
                    walk.advance_to(first[target])
                site = self.site_of[target]
                bias = fetch_attr(self.gm, site.bias) if site.bias else None
                probe = Probe(site, self.nodes_of[target], spectra[target], bias, walks, self.references,
                              self.output_fn, 1.0, None)
                result[target] = self.known[(target, ranks[target])] = self._error(probe, ranks[target])
                self.probes += 1
            self.replayed_macs += sum(w.replayed_macs for w in walks)
        return result

    def forward_equivalents(self) -> float | None:
        """The probes' replays in whole forward passes over one metric batch (None before a cost pass)."""
        total = graph_macs(self.gm)
        return self.replayed_macs / total if total else None


class LossMeter(FinalNsrMeter):
    """Like :class:`FinalNsrMeter`, but measures how much a loss rises: ``loss_fn(output', batch) −
    loss_fn(output, batch)`` with only the layer decomposed (falor's budget with ``loss_fn``).

    ``batches`` are the loader's batches behind ``metric_inputs``, which ``loss_fn`` reads its targets from.
    """

    def __init__(self, gm: torch.fx.GraphModule, sites: Sequence[Site], metric_inputs: Sequence[Sequence[Any]],
                 batches: Sequence[Any], loss_fn: Callable[[Any, Any], torch.Tensor]) -> None:
        self.batches, self.loss_fn = list(batches), loss_fn
        super().__init__(gm, sites, metric_inputs, None)

    def _references(self) -> list[float]:
        """The original's loss on each metric batch."""
        return [float(self.loss_fn(torch.fx.Interpreter(self.gm).run(*fresh_inputs(flat)), batch))
                for flat, batch in zip(self.metric_inputs, self.batches)]

    def _error(self, probe: Probe, rank: int) -> float:
        """The mean rise of the loss with the layer at ``rank``, over every rank's metric batches."""
        project = probe.projection(rank)
        rises = [float(self.loss_fn(walk.replay({name: project for name in probe.nodes}), batch)) - loss
                 for walk, batch, loss in zip(probe.walks, self.batches, self.references)]
        return distributed.means([(sum(rises), len(rises))])[0]
