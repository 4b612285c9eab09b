"""The calibration stage: a captured graph that collects statistics while it runs.

``fxdeco.prepare`` returns a :class:`PreparedModel`; calling it like the
original model runs the graph through :class:`passes.StatsInterpreter` (in eval
mode, without gradients) and returns the model's outputs, so users with their
own data loops can calibrate before ``fxdeco.convert``.

Padded text batches: a *statistics mask* (the attention mask, ``(batch,
tokens)``) keeps padding positions out of the statistics of every Linear whose
rows are ``(batch, tokens, channels)``; see :meth:`PreparedModel.forward` and
:meth:`PreparedModel.calibrate_batch`.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from fxdeco.batches import as_call, check_not_empty, leading_dim, misfit_hint
from fxdeco.errors import CalibrationError
from fxdeco.interrupts import interrupts_deferred
from fxdeco.metadata import OriginalTotals, original_totals, set_original_totals
from fxdeco.modes import eval_mode
from fxdeco.outputs import OutputFn, select_output
from passes import (CostProp, LeadingDimWeights, Site, SiteStatistics, SkippedSite, StatsInterpreter, flatten_inputs,
                    fresh_inputs,
                    graph_macs)
from passes.capture import optional_tensor_inputs
from passes.sensitivity import SensitivityInterpreter
from passes.stats import ActivationOverflowError, ActivationStatistics, NonFiniteActivationError

log = logging.getLogger(__name__)


def _describe(node: torch.fx.Node | None) -> str:
    """``layer 'blocks.0.fc1'`` for a module call, else the node, plus the model source line when known."""
    if node is None:
        return "the graph's start"
    if node.op == "call_function" and getattr(node.target, "__name__", "").startswith("_assert"):
        return "the graph's input checks"
    if node.op == "call_module" and node.target == "_guards_fn":
        return "the input checks of the exported graph (the batch differs from the example in a fixed dimension)"
    where = f"layer {node.target!r}" if node.op == "call_module" else f"node {node.format_node()}"
    lines = [line.strip() for line in (node.stack_trace or "").strip().splitlines() if line.strip()]
    frames = [(lines[i], lines[i + 1]) for i in range(len(lines) - 1)
              if lines[i].startswith("File ") and not lines[i + 1].startswith("File ")]
    user = [f for f in frames if "/torch/" not in f[0]]  # the model's own code, not torch's
    return f"{where} ({user[-1][0]}: {user[-1][1]})" if user else where


def model_macs(other_macs: float, sites: Any, statistics: Any) -> float:
    """MACs per sample of a model whose decomposable layers are ``sites`` (each counted on its statistics' rows per
    sample; a layer called twice once) and whose other operations cost ``other_macs`` per sample."""
    from fxdeco.plan import dense_macs, unique_targets  # plan imports passes only; here for the module's order

    return other_macs + sum(dense_macs(s, statistics[s.target]) for s in unique_targets(sites)
                            if s.target in statistics)


RowWeights = Callable[[Site, torch.Tensor], "torch.Tensor | None"]
# batch (as the loader yields it, after input_fn) -> (batch, tokens) mask of the rows to count, or None
StatMaskFn = Callable[[Any], "torch.Tensor | None"]


def check_stat_mask(mask: Any, index: int) -> torch.Tensor:
    """Validate a statistics mask and return it as float64 on the CPU (raises :class:`CalibrationError`).

    Example:
        >>> check_stat_mask(torch.tensor([[1, 1, 0]]), 0)
        tensor([[1., 1., 0.]], dtype=torch.float64)
        >>> check_stat_mask(torch.tensor([[1, -1]]), 3)
        Traceback (most recent call last):
        ...
        fxdeco.errors.CalibrationError: the statistics mask of calibration batch 3 has a negative weight (-1); \
use 0 for positions to ignore (padding) and 1, or any positive weight, for positions to count
    """
    where = f"the statistics mask of calibration batch {index}"
    if not isinstance(mask, torch.Tensor):
        raise CalibrationError(f"{where} must be a tensor shaped like the (batch, tokens) leading dimensions of the "
                               f"layers' inputs (e.g. the attention mask), got {type(mask).__name__}")
    if mask.dim() == 0 or mask.is_complex():
        raise CalibrationError(f"{where} must be a real tensor with at least one dimension, e.g. (batch, tokens); "
                               f"got {mask.dtype} of shape {tuple(mask.shape)}")
    weights = mask.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(weights).all()):
        raise CalibrationError(f"{where} holds NaN or Inf")
    if weights.numel() and float(weights.min()) < 0:
        raise CalibrationError(f"{where} has a negative weight ({float(weights.min()):g}); use 0 for positions to "
                               "ignore (padding) and 1, or any positive weight, for positions to count")
    return weights


def _both(first: RowWeights, second: RowWeights) -> RowWeights:
    """Row weights that multiply two hooks' weights (either may return None: all ones)."""
    def weights(site: Site, tensor: torch.Tensor) -> torch.Tensor | None:
        a, b = first(site, tensor), second(site, tensor)
        return b if a is None else a if b is None else a.reshape(-1).double().cpu() * b.reshape(-1).double().cpu()
    return weights


class PreparedModel(nn.Module):
    """A captured model that accumulates per-site statistics on every call.

    Attributes:
        gm: the captured graph (a private copy of its modules and buffers, dead layers removed; its parameters
            are the model's own tensors, only read).
        sites: the layers that will be considered for decomposition.
        skipped: layers that will not be, with reasons.
        removed: layers dropped as dead code.
        collected: the raw, mergeable sums (:class:`passes.stats.ActivationStatistics`).
        statistics: ``{layer name: SiteStatistics}`` of each layer's output, merged over all calls.
        batches: number of calibration calls so far.
        stat_mask_fn: ``batch -> mask | None`` given to ``prepare``, applied by :meth:`calibrate_batch`.
        row_weights: ``(site, tensor) -> weights | None``, a lower-level hook given to ``prepare``.
        distributed_world: the number of processes whose statistics these are: 1 for this process's own,
            more for a copy summed over a process group (:func:`fxdeco.distributed.all_reduce_statistics`).
    """

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        sites: list[Site],
        skipped: list[SkippedSite],
        removed: list[str],
        params_original: int,
        row_weights: RowWeights | None = None,
        stat_mask_fn: StatMaskFn | None = None,
        sensitivity: bool = False,
        output_fn: OutputFn | None = None,
        keep_batches: int = 2,
        stat_dtype: torch.dtype | None = None,
        sensitivity_loss: Callable[[Any, Any], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.stat_dtype = stat_dtype  # precision of each batch's products (passes.stats.SiteStatistics.update)
        self.output_fn = output_fn
        # the first calibration batches (flat placeholder values), falor's metric batches in final-output mode
        self.keep_batches = keep_batches
        self.kept_inputs: list[list[Any]] = []
        # the same batches as the loader yielded them, before input_fn (calibrate_batch keeps them): what a loss
        # function reads its targets from (dwain's loss_fn). kept_raw[i] is always the batch of kept_inputs[i]
        # (kept together, when the batch succeeds); a batch run without one (a direct call) ends the raw list
        self.kept_raw: list[Any] = []
        # output-gradient moments per layer (passes.sensitivity): one extra backward pass per batch
        self.sensitivity_moments: dict[str, torch.Tensor] | None = {} if sensitivity else None
        self.sensitivity_samples = 0
        # with a loss (loss_fn(output, batch) -> scalar), the moments are the loss gradient's (an empirical Fisher)
        # instead of those of random projections of the output; calibrate_batch then needs the loader's batch
        self.sensitivity_loss = sensitivity_loss
        self._projections = torch.Generator().manual_seed(0)
        self.gm = gm
        # the buffers as the model had them: a forward that updates a buffer (a counter, a running average) updates
        # the graph's on every calibration batch and measurement; the decomposed model gets these values back
        self.initial_buffers = {name: b.detach().clone() for name, b in gm.named_buffers()}
        self.sites = sites
        self.skipped = skipped
        self.removed = removed
        self.params_original = params_original
        # what convert's methods need to know of the original model (budgets are fractions of it)
        set_original_totals(gm, OriginalTotals(params_original))
        self.row_weights = row_weights
        self.stat_mask_fn = stat_mask_fn
        self._warned_unmatched_mask = False
        self.collected = ActivationStatistics()
        self._per_site: dict[str, SiteStatistics] | None = None  # derived lazily from ``collected``
        self.batches = 0
        self.macs_per_sample: float | None = None
        self.last_samples: int | None = None  # the last calibration batch's samples (its first input's dim 0)
        self.distributed_world = 1  # > 1: a copy whose sums were all-reduced over that many processes

    def forward(self, *args: Any, stat_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Run one calibration batch like the original model, add its statistics, return the model's outputs.

        ``stat_mask`` (keyword only) keeps padding out of the statistics: a tensor
        shaped like the leading dimensions of the layers' rows, ``(batch, tokens)``
        for a text model (its attention mask), 0 for positions to ignore and 1 for
        positions to count. It applies to every Linear whose input/output is
        ``(batch, tokens, ..., channels)``; other layers (Conv2d, a classifier
        after pooling) are unmasked. Weights other than 0/1 are allowed and weight
        each row's contribution to the moments (they are normalised by the sum of
        weights); negative weights are an error. A mask that fits no layer is
        warned about once and ignored. A prepared model made with
        ``stat_mask_fn=`` must be fed through :meth:`calibrate_batch` (or given
        ``stat_mask=`` here).

        Example:
            >>> import torch, fxdeco
            >>> class Tagger(torch.nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.embed, self.fc = torch.nn.Embedding(100, 16), torch.nn.Linear(16, 16)
            ...     def forward(self, input_ids, attention_mask):
            ...         return self.fc(self.embed(input_ids)) * attention_mask.unsqueeze(-1)
            >>> prepared = fxdeco.prepare(Tagger())
            >>> batch = {"input_ids": torch.randint(0, 100, (2, 5)),
            ...          "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
            >>> out = prepared(**batch, stat_mask=batch["attention_mask"])   # the model's output
            >>> out.shape, prepared.statistics["fc"].rows, prepared.statistics["fc"].weight
            (torch.Size([2, 5, 16]), 10, 8.0)
        """
        if stat_mask is None and self.stat_mask_fn is not None:
            raise CalibrationError(
                f"calibration batch {self.batches}: this model was prepared with stat_mask_fn, which reads whole "
                "loader batches; call prepared.calibrate_batch(batch) (or fxdeco.calibrate), or pass the mask "
                "yourself: prepared(..., stat_mask=batch['attention_mask'])")
        return self._run(args, kwargs, stat_mask, None)

    def calibrate_batch(self, batch: Any, loss_batch: Any = None) -> Any:
        """Run one batch as the loader yields it (after any ``input_fn``); return the model's outputs.

        A tensor is the positional input, a tuple/list the positional inputs, a
        dict the keyword inputs (as in :func:`fxdeco.calibrate`); the statistics
        mask is ``stat_mask_fn(batch)`` when ``prepare`` was given one.

        Example:
            >>> import torch, fxdeco
            >>> class Tagger(torch.nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.embed, self.fc = torch.nn.Embedding(100, 16), torch.nn.Linear(16, 16)
            ...     def forward(self, input_ids, attention_mask):
            ...         return self.fc(self.embed(input_ids)) * attention_mask.unsqueeze(-1)
            >>> prepared = fxdeco.prepare(Tagger(), stat_mask_fn=lambda batch: batch["attention_mask"])
            >>> loader = [{"input_ids": torch.randint(0, 100, (2, 5)),
            ...            "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}]
            >>> for batch in loader:
            ...     _ = prepared.calibrate_batch(batch)
            >>> prepared.statistics["fc"].weight   # 8 real tokens of 10
            8.0
        """
        mask = None
        if self.stat_mask_fn is not None:
            try:
                mask = self.stat_mask_fn(batch)
            except Exception as exc:
                raise CalibrationError(f"stat_mask_fn failed on calibration batch {self.batches}: "
                                       f"{type(exc).__name__}: {exc}") from exc
        args, kwargs = as_call(batch)
        return self._run(args, kwargs, mask, batch if loss_batch is None else loss_batch)

    def _row_weights(self, mask: Any, index: int) -> tuple[RowWeights | None, LeadingDimWeights | None]:
        if mask is None:
            return self.row_weights, None
        by_mask = LeadingDimWeights(check_stat_mask(mask, index))
        return (by_mask if self.row_weights is None else _both(self.row_weights, by_mask)), by_mask

    def _warn_unmatched(self, by_mask: LeadingDimWeights | None) -> None:
        if by_mask is None or by_mask.matched or self._warned_unmatched_mask:
            return
        self._warned_unmatched_mask = True
        shapes = ", ".join(f"{name!r} {shape}" for name, shape in list(by_mask.unmatched.items())[:3])
        warnings.warn(f"the statistics mask of shape {tuple(by_mask.mask.shape)} fits no layer (a mask must equal "
                      "the leading dimensions of a Linear's input/output, e.g. (batch, tokens); seen: "
                      f"{shapes}); the statistics are unmasked", UserWarning, stacklevel=4)

    def _run(self, args: tuple, kwargs: dict[str, Any], stat_mask: Any, loss_batch: Any) -> Any:
        """Run one batch; its statistics are added all at once at the end, or not at all.

        Every pass over the batch (statistics, the first batch's cost analysis,
        output-gradient moments) runs first with its results held back; only
        when all succeeded are they added, with Ctrl-C held off for that moment.
        An error or an interrupt anywhere before leaves the statistics of the
        earlier batches exactly as they were.
        """
        index = self.batches
        check_not_empty(args, kwargs, index)
        keep = len(self.kept_inputs) < self.keep_batches
        # cloned before the run (a loader may reuse its buffers), kept only if the batch succeeds: a batch that
        # failed and was kept anyway would pair its targets with the next batch's inputs in the metric batches
        raw = pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), loss_batch) \
            if keep and loss_batch is not None and len(self.kept_raw) == len(self.kept_inputs) else None
        try:
            flat = flatten_inputs(self.gm, args, kwargs)
        except TypeError as exc:
            raise CalibrationError(f"calibration batch {index} does not fit the model's inputs: {exc}"
                                   f"{misfit_hint(self.input_names, args, kwargs)}") from exc
        row_weights, by_mask = self._row_weights(stat_mask, index)
        with eval_mode(self.gm), torch.no_grad():
            self._per_site = None
            interpreter = StatsInterpreter(self.gm, self.sites, self.collected, row_weights,
                                           product_dtype=self.stat_dtype, defer_commit=True)
            interpreter.batch_index = index
            interpreter.samples = leading_dim(args, kwargs)  # MACs per sample: a layer's rows may be batch x tokens
            self.last_samples = interpreter.samples
            interpreter.extra_traceback = False  # we name the node ourselves, without torch's tlparse footer
            try:
                out = interpreter.run(*fresh_inputs(flat))
            except NonFiniteActivationError as exc:
                remedy = ""
                if isinstance(exc, ActivationOverflowError):
                    remedy = "; scale the inputs to an ordinary range"
                    if exc.dtype != torch.float64:  # float64 products would not overflow
                        remedy = "; pass stat_dtype=torch.float64 to fxdeco.prepare/transform, or scale the inputs"
                raise NonFiniteActivationError(f"{exc}{remedy}{self._kept(index)}") from exc
            except Exception as exc:
                raise CalibrationError(
                    f"calibration batch {index} could not be run through the model, at "
                    f"{_describe(interpreter.current_node)}: {exc}{self._dtype_hint(args, kwargs, exc)}"
                    f"{self._none_hint(flat)}{self._guard_hint(exc)}{self._kept(index)}"
                ) from exc
            macs = None
            if self.macs_per_sample is None:
                # After the statistics pass, so a bad batch is reported by the pass that names the layer.
                try:
                    macs = self._measure_cost(fresh_inputs(flat), leading_dim(args, kwargs), commit=False)
                except Exception as exc:
                    raise CalibrationError(f"cost analysis of calibration batch {index} failed: {exc}") from exc
        sensitivity = None
        if self.sensitivity_moments is not None:
            with eval_mode(self.gm):
                if self.sensitivity_loss is None:
                    sensitivity = SensitivityInterpreter(self.gm, self.sites, generator=self._projections,
                                                         moments=self.sensitivity_moments, defer_commit=True,
                                                         output_fn=lambda out: select_output(out, self.output_fn))
                else:
                    from fxdeco.methods.dwain.search import check_loss  # the loss's checks, named by batch

                    if loss_batch is None:
                        raise CalibrationError("this model was prepared with a loss (sensitivity_loss), which reads "
                                               "the loader's batches: feed it with fxdeco.calibrate or "
                                               "prepared.calibrate_batch(batch)")
                    sensitivity = SensitivityInterpreter(
                        self.gm, self.sites, moments=self.sensitivity_moments, defer_commit=True,
                        random_projection=False,
                        output_fn=lambda out: check_loss(self.sensitivity_loss, out, loss_batch, index,
                                                             "calibration batch"))
                sensitivity.run(*fresh_inputs(flat))
        with interrupts_deferred():
            interpreter.commit()
            if sensitivity is not None:
                sensitivity.commit()
                self.sensitivity_samples += sensitivity.samples
            if macs is not None:
                self.macs_per_sample = original_totals(self.gm).macs = macs[0]
                original_totals(self.gm).other_macs = macs[1]
            if keep:
                if raw is not None:
                    self.kept_raw.append(raw)
                self.kept_inputs.append(fresh_inputs(flat))
            self.batches += 1
            self._per_site = None
        self._warn_unmatched(by_mask)
        return out  # Interpreter.run already rebuilt the model's output structure

    def _measure_cost(self, flat: list[Any], batch_size: int, commit: bool = True) -> Any:
        """MACs per sample of the graph, from one cost pass on a batch (also fills ``node.meta["cost"]``).

        With ``commit``, they are recorded as the model's (``macs_per_sample`` and :class:`OriginalTotals`) and
        returned; without, ``(all, all but the decomposable layers)`` is returned for the caller to record.
        """
        CostProp(self.gm).run(*flat)
        layers = {s.node for s in self.sites}
        in_layers = sum(n.meta["cost"].macs for n in self.gm.graph.nodes if n.name in layers and "cost" in n.meta)
        total, other = graph_macs(self.gm) / batch_size, (graph_macs(self.gm) - in_layers) / batch_size
        if not commit:
            return total, other
        self.macs_per_sample = original_totals(self.gm).macs = total
        original_totals(self.gm).other_macs = other
        return total

    def settle_macs(self) -> float | None:
        """The model's MACs per sample on all the calibration batches so far, recorded as its total (budgets in
        MACs are fractions of it), or None before the first batch.

        The cost pass runs on the first batch only, but the layers' MACs are counted on the rows per sample of
        every batch (their statistics): with sequence lengths that vary between batches, a total from the first
        batch alone put the two on other rows (keep_macs=0.6 kept 0.755 of the MACs, reported as 0.595). The
        decomposable layers' part of the total is therefore counted as they are; the rest (attention products,
        layers kept out of the statistics) stays the first batch's.
        """
        totals = original_totals(self.gm)
        if totals.other_macs is None or self.batches == 0:
            return self.macs_per_sample
        statistics = self.statistics
        macs = model_macs(totals.other_macs, self.sites, statistics)
        self.macs_per_sample = totals.macs = macs
        return macs

    @property
    def input_names(self) -> list[str]:
        """The graph's inputs, in order (``*args`` / ``**kwargs`` starred)."""
        return [n.target for n in self.gm.graph.nodes if n.op == "placeholder"]

    @staticmethod
    def _kept(index: int) -> str:
        if index == 0:
            return ""
        return (f"\nThis batch added nothing; the statistics of the {index} earlier batch{'es' if index > 1 else ''} "
                "are kept, so you can go on calibrating without it.")

    def _none_hint(self, flat: list[Any]) -> str:
        """A remedy for an optional input left out of the batch although tracing took the branch that uses it."""
        names = [n.target for n in self.gm.graph.nodes if n.op == "placeholder"]
        given_none = {name for name, value in zip(names, flat) if value is None}
        traced = [name for name in optional_tensor_inputs(self.gm) if name in given_none]
        if not traced:
            return ""
        return (f"\nInput {traced[0]!r} is None in this batch, but the graph was traced with it as a tensor (the "
                "model's branch that uses it: tracing saw no example batch). Pass example_inputs=... (a batch "
                f"without {traced[0]!r}) to fxdeco.prepare so the branch without it is traced.")

    def _guard_hint(self, exc: Exception) -> str:
        """A remedy for torch.export's fixed sizes: a first batch with a dimension of 1 fixes it there."""
        text = str(exc)
        if "Guard failed" not in text and "guard" not in text.lower():
            return ""
        first = "a first calibration batch (the example torch.export captured the model from)"
        return (f"\nThe model was captured with torch.export, whose graph accepts only inputs like {first} where "
                "it fixed a size: export fixes every dimension of size 1 and any size the model's code depends on. "
                "Use a first batch (or example_inputs=) with batch size and sequence length of at least 2 and "
                "sizes like the others'.")

    def _dtype_hint(self, args: tuple, kwargs: dict[str, Any], exc: Exception) -> str:
        """A remedy for the common mistakes of feeding integer tensors, or floats of another precision (NumPy's
        float64), to a float model (only on a dtype error: integer token ids are the right input of a model that
        starts with an embedding)."""
        if not any(word in str(exc) for word in ("dtype", "scalar type", "Float", "Long", "Int")):
            return ""
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        floats = {p.dtype for p in self.gm.parameters() if p.is_floating_point()}
        if not tensors or not floats:
            return ""
        wanted = ", ".join(sorted(str(d) for d in floats))
        # floating-point inputs of another precision than the model's (float64 from NumPy arrays, half inputs to a
        # float32 model): say which, with the conversion
        other = sorted({str(t.dtype) for t in tensors if t.is_floating_point() and t.dtype not in floats})
        if other and len(floats) == 1:
            cast = {torch.float32: "float", torch.float64: "double", torch.float16: "half",
                    torch.bfloat16: "bfloat16"}.get(next(iter(floats)))
            remedy = f", e.g. input_fn=lambda b: b.{cast}()" if cast else ""
            return (f"\nThe batch holds {', '.join(other)} tensors but the model computes in {wanted}: convert the "
                    f"inputs to the model's dtype{remedy} (NumPy arrays become float64 tensors).")
        if any(t.is_floating_point() or t.is_complex() for t in tensors):
            return ""
        given = ", ".join(sorted({str(t.dtype) for t in tensors}))
        return (f"\nThe batch holds only integer tensors ({given}) but the model computes in {wanted}: convert the "
                "inputs to floating point, e.g. input_fn=lambda b: b.float().")

    @property
    def statistics(self) -> dict[str, SiteStatistics]:
        """Each layer's output statistics (input-side sums mapped through the weights)."""
        if self._per_site is None:
            self._per_site = self.collected.per_site(self.gm, self.sites)
            for target, moment in (self.sensitivity_moments or {}).items():
                if target in self._per_site:
                    self._per_site[target].sensitivity = moment / max(self.sensitivity_samples, 1)
        return self._per_site
