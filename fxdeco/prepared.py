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
from passes.stats import ActivationStatistics
from passes.stats import NonFiniteActivationError

log = logging.getLogger(__name__)


def _describe(node: torch.fx.Node | None) -> str:
    """``layer 'blocks.0.fc1'`` for a module call, else the node, plus the model source line when known."""
    if node is None:
        return "the graph's start"
    if node.op == "call_module" and node.target == "_guards_fn":
        return "the input checks of the exported graph (the batch differs from the example in a fixed dimension)"
    where = f"layer {node.target!r}" if node.op == "call_module" else f"node {node.format_node()}"
    lines = [line.strip() for line in (node.stack_trace or "").strip().splitlines() if line.strip()]
    frames = [(lines[i], lines[i + 1]) for i in range(len(lines) - 1)
              if lines[i].startswith("File ") and not lines[i + 1].startswith("File ")]
    user = [f for f in frames if "/torch/" not in f[0]]  # the model's own code, not torch's
    return f"{where} ({user[-1][0]}: {user[-1][1]})" if user else where


RowWeights = Callable[[Site, torch.Tensor], "torch.Tensor | None"]


class PreparedModel(nn.Module):
    """A captured model that accumulates per-site statistics on every call.

    Attributes:
        gm: the captured graph (a private copy; dead layers removed).
        sites: the layers that will be considered for decomposition.
        skipped: layers that will not be, with reasons.
        removed: layers dropped as dead code.
        collected: the raw, mergeable sums (:class:`passes.stats.ActivationStatistics`).
        statistics: ``{layer name: SiteStatistics}`` of each layer's output, merged over all calls.
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
        self.collected = ActivationStatistics()
        self._per_site: dict[str, SiteStatistics] | None = None  # derived lazily from ``collected``
        self.batches = 0
        self.macs_per_sample: float | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        index = self.batches  # taken before _reset() zeroes the counter, so errors name the real batch
        try:
            flat = flatten_inputs(self.gm, args, kwargs)
        except TypeError as exc:
            raise CalibrationError(f"calibration batch {index} does not fit the model's inputs: {exc}") from exc
        with eval_mode(self.gm), torch.no_grad():
            self._per_site = None
            interpreter = StatsInterpreter(self.gm, self.sites, self.collected, self.row_weights)
            interpreter.batch_index = index
            interpreter.extra_traceback = False  # we name the node ourselves, without torch's tlparse footer
            try:
                out = interpreter.run(*flat)
            except NonFiniteActivationError as exc:
                self._reset()  # the sites before the failing one were already updated
                raise NonFiniteActivationError(f"{exc}{self._discarded(index)}") from exc
            except Exception as exc:
                self._reset()
                raise CalibrationError(
                    f"calibration batch {index} could not be run through the model, at "
                    f"{_describe(interpreter.current_node)}: {exc}{self._dtype_hint(args, kwargs)}"
                    f"{self._discarded(index)}"
                ) from exc
            if self.macs_per_sample is None:
                # After the statistics pass, so a bad batch is reported by the pass that names the layer.
                try:
                    self._measure_cost(flat, leading_dim(args, kwargs))
                except Exception as exc:
                    self._reset()
                    raise CalibrationError(f"cost analysis of calibration batch {index} failed: {exc}") from exc
        self.batches += 1
        return self.gm.graph._codegen.process_outputs(out)

    def _measure_cost(self, flat: list[Any], batch_size: int) -> None:
        CostProp(self.gm).run(*flat)
        self.macs_per_sample = graph_macs(self.gm) / batch_size

    @staticmethod
    def _discarded(index: int) -> str:
        if index == 0:
            return ""
        return (f"\nThe statistics of the {index} earlier batch{'es' if index > 1 else ''} were discarded (a "
                "partly counted batch would skew them); calibrate again without this batch.")

    def _dtype_hint(self, args: tuple, kwargs: dict[str, Any]) -> str:
        """A remedy for the common mistake of feeding integer tensors to a float model (only on failure:
        integer token ids are the right input of a model that starts with an embedding)."""
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        floats = {p.dtype for p in self.gm.parameters() if p.is_floating_point()}
        if not tensors or any(t.is_floating_point() or t.is_complex() for t in tensors) or not floats:
            return ""
        given = ", ".join(sorted({str(t.dtype) for t in tensors}))
        wanted = ", ".join(sorted(str(d) for d in floats))
        return (f"\nThe batch holds only integer tensors ({given}) but the model computes in {wanted}: convert the "
                "inputs to floating point, e.g. input_fn=lambda b: b.float().")

    def _reset(self) -> None:
        """Forget every batch, leaving statistics consistent with ``batches``."""
        self.collected.clear()
        self._per_site = None
        self.batches = 0

    @property
    def statistics(self) -> dict[str, SiteStatistics]:
        """Each layer's output statistics (input-side sums mapped through the weights)."""
        if self._per_site is None:
            self._per_site = self.collected.per_site(self.gm, self.sites)
        return self._per_site
