"""The calibration stage: a captured graph that collects statistics while it runs.

``fxdeco.prepare`` returns a :class:`PreparedModel`; calling it like the
original model runs the graph through :class:`passes.StatsInterpreter` (in eval
mode, without gradients) and returns the model's outputs, so users with their
own data loops can calibrate before ``fxdeco.convert``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.fx
from torch import nn

from fxdeco.batches import leading_dim
from fxdeco.errors import CalibrationError
from fxdeco.modes import eval_mode
from passes import CostProp, Site, SiteStatistics, SkippedSite, StatsInterpreter, flatten_inputs, graph_macs
from passes.stats import NonFiniteActivationError

log = logging.getLogger(__name__)

RowWeights = Callable[[Site, torch.Tensor], "torch.Tensor | None"]


class PreparedModel(nn.Module):
    """A captured model that accumulates per-site statistics on every call.

    Attributes:
        gm: the captured graph (a private copy; dead layers removed).
        sites: the layers that will be considered for decomposition.
        skipped: layers that will not be, with reasons.
        removed: layers dropped as dead code.
        statistics: ``{layer name: SiteStatistics}``, merged over all calls.
        batches: number of calibration calls so far.
    """

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        sites: list[Site],
        skipped: list[SkippedSite],
        removed: list[str],
        params_original: int,
        row_weights: RowWeights | None = None,
    ) -> None:
        super().__init__()
        self.gm = gm
        self.sites = sites
        self.skipped = skipped
        self.removed = removed
        self.params_original = params_original
        self.row_weights = row_weights
        self.statistics: dict[str, SiteStatistics] = {}
        self.batches = 0
        self.macs_per_sample: float | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            flat = flatten_inputs(self.gm, args, kwargs)
        except TypeError as exc:
            raise CalibrationError(f"calibration batch {self.batches} does not fit the model's inputs: {exc}") from exc
        with eval_mode(self.gm), torch.no_grad():
            if self.macs_per_sample is None:
                self._measure_cost(flat, leading_dim(args, kwargs))
            interpreter = StatsInterpreter(self.gm, self.sites, self.statistics, self.row_weights)
            interpreter.batch_index = self.batches
            try:
                out = interpreter.run(*flat)
            except NonFiniteActivationError:
                self._reset()
                raise
            except Exception as exc:
                self._reset()
                raise CalibrationError(
                    f"calibration batch {self.batches} could not be run through the model: {exc}; "
                    "statistics collected so far were discarded"
                ) from exc
        self.batches += 1
        return self.gm.graph._codegen.process_outputs(out)

    def _measure_cost(self, flat: list[Any], batch_size: int) -> None:
        try:
            CostProp(self.gm).run(*flat)
        except Exception as exc:
            raise CalibrationError(f"calibration batch 0 could not be run through the model: {exc}") from exc
        self.macs_per_sample = graph_macs(self.gm) / batch_size

    def _reset(self) -> None:
        self.statistics.clear()
        self.batches = 0
