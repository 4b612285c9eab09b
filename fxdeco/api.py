"""The public pipeline: ``prepare`` -> calibrate -> ``convert``, and ``transform`` for both."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
import warnings
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from fxdeco import distributed
from fxdeco.batches import adapt_batch, check_input_fn, check_loader, no_batches
from fxdeco.capture import trace
from fxdeco.checks import check_flag
from fxdeco.errors import CalibrationError, NoSitesError, warn_user
from fxdeco.methods.falor.local import check_budget_reachable, falor
from fxdeco.methods import Dwain, Falor, Lockd, MethodConfig, method_config
from fxdeco.memory import memory_figures, free_reference_cycles, statistics_bytes
from fxdeco.metadata import ModelRecord, capture_record, model_record, original_totals, set_model_record
from fxdeco.train.finetune import TrainingBatches
from fxdeco.plan import LayerDecision, matches_any, warn_unmatched_patterns
from fxdeco.outputs import OutputFn, select_output
from fxdeco.prepared import PreparedModel, RowWeights, StatMaskFn
from fxdeco.progress import length_of, progress
from fxdeco.io.apply import FactoredConv2d, FactoredLinear, apply, check_swappable, swap_module
from passes import Factorization, Site, SkippedSite, factorize_sites, find_sites, remove_dead_sites
from passes.capture import copy_graph
from passes.rewrite import factored_module
from passes.sites import fetch_attr

log = logging.getLogger(__name__)

def _dwain(prepared: PreparedModel, config: Any) -> tuple[dict, list, dict, torch.fx.GraphModule | None]:
    from fxdeco.methods.dwain.search import dwain  # only when asked for

    return dwain(prepared, config)


# What runs each method's config on a calibrated PreparedModel: (plan, decisions, summary), and optionally the
# decomposed graph when the method trained it.
RUNNERS: dict[str, Callable[[PreparedModel, Any], tuple]] = {"falor": falor, "dwain": _dwain}


def _skip_patterns(skip: Iterable[str]) -> tuple[str, ...]:
    if isinstance(skip, str):  # tuple("head") would be four one-letter patterns that skip nothing
        raise TypeError(f"skip must be a list of glob patterns, got the string {skip!r}; write skip=[{skip!r}]")
    return tuple(skip)


def _check_model(model: Any) -> None:
    """Refuse what is not a model fxdeco can capture, before anything else (a loader's batch) is read."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"the model is a TorchScript module ({type(model).__name__}), which neither symbolic tracing "
                        "nor torch.export can capture: pass the original nn.Module (before torch.jit.script/trace)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model must be an nn.Module (or a torch.fx.GraphModule), got {type(model).__name__}")


def _check_stat_mask_fn(stat_mask_fn: Any) -> None:
    if stat_mask_fn is not None and not callable(stat_mask_fn):
        raise TypeError(f"stat_mask_fn must be a function of the batch, got {type(stat_mask_fn).__name__}; "
                        "write stat_mask_fn=lambda batch: batch['attention_mask']")


# prepare and convert build modules: under a caller's torch.inference_mode() their parameters would be inference
# tensors, which autograd refuses (budget mode's gradient pass, fine-tuning the result), so they leave it.
@torch.inference_mode(False)
def prepare(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    skip: Iterable[str] = (),
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
    capture: str = "auto",
    stat_mask_fn: StatMaskFn | None = None,
    row_weights: RowWeights | None = None,
    sensitivity: bool = False,
    output_fn: OutputFn | None = None,
    keep_batches: int = 2,
    stat_dtype: torch.dtype | None = None,
    sensitivity_loss: Callable[[Any, Any], torch.Tensor] | None = None,
) -> PreparedModel:
    """Capture ``model`` and return a :class:`PreparedModel` that collects statistics when called.

    ``skip`` holds glob patterns on layer names (``"head"``, ``"blocks.*.attn.qkv"``)
    for layers to keep dense. The caller's model is never modified.

    ``stat_mask_fn`` keeps padding out of the statistics of padded text batches:
    it maps a batch (as the loader yields it, after ``input_fn``) to a
    ``(batch, tokens)`` tensor, 0 at padding and 1 at real tokens, typically
    ``stat_mask_fn=lambda batch: batch["attention_mask"]``. It applies to every
    Linear whose rows are ``(batch, tokens, ..., channels)``; Conv2d layers and
    Linears of other shapes (after pooling) are unmasked. Non-negative weights
    other than 0/1 weight each position's contribution. Feed such a prepared
    model with :func:`calibrate` or :meth:`PreparedModel.calibrate_batch`; a
    direct call takes the mask as ``prepared(..., stat_mask=mask)``.
    ``row_weights(site, tensor) -> weights | None`` is the lower-level hook
    (one weight per row of ``tensor``), multiplied with the mask when both are given.
    ``sensitivity=True`` also collects, with one backward pass per batch, how much
    each layer's output moves the final output (``passes.sensitivity``); falor's
    budget mode then allocates ranks by predicted final-output error
    (:func:`transform` turns it on by itself in budget mode). With
    ``sensitivity_loss=loss_fn`` (``loss_fn(output, batch) -> scalar``, ``batch``
    as the loader yields it) the moments are those of that loss's gradient
    instead (an empirical Fisher): the budget then weighs layers by how much they
    raise the loss (``fxdeco.Falor(keep_params=..., loss_fn=...)``).
    ``output_fn(output) -> tensor`` selects the tensor that final-output criteria
    compare when the model returns a tuple, dict or ``ModelOutput``
    (``output_fn=lambda out: out.logits``). The first ``keep_batches``
    calibration batches are kept (cloned) as the metric batches of falor's
    final-output mode (``nsr_final_threshold``). ``stat_dtype`` is the precision
    of each batch's activation products (summed in float64 either way); by
    default float32 (float64 for a float64 model). float32 is 2-3x faster than
    float64 on a CPU, with a noise floor near 1e-7 of a layer's largest
    variance; ``torch.float64`` resolves exactly low-rank outputs, for
    layer-NSR thresholds under about 1e-6.

    Example:
        >>> import torch, fxdeco
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> prepared = fxdeco.prepare(model)
        >>> for _ in range(4):
        ...     _ = prepared(torch.randn(8, 16))
        >>> small = fxdeco.convert(prepared, nsr_threshold=0.5)
        >>> isinstance(small, torch.fx.GraphModule)
        True
    """
    _check_model(model)
    _check_stat_mask_fn(stat_mask_fn)
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"output_fn must be a function of the model's output, got {type(output_fn).__name__}")
    if stat_dtype not in (None, torch.float32, torch.float64):
        raise ValueError(f"stat_dtype must be None, torch.float32 or torch.float64, got {stat_dtype!r}")
    if isinstance(keep_batches, bool) or not isinstance(keep_batches, int) or keep_batches < 0:
        raise ValueError(f"keep_batches must be an integer >= 0, got {keep_batches!r}")
    params_original = sum(p.numel() for p in model.parameters())
    traced = trace(model, example_inputs, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                   capture=capture)
    # A private copy of the graph, its modules and buffers (calibration must not change the caller's model: a
    # forward may update a buffer); the parameters stay the model's, read only (nothing here writes a weight, and
    # the decomposed result gets its own copy from the rewrite), so a large model is not held twice.
    model_storage = {p.data_ptr() for p in model.parameters()}
    gm = copy_graph(traced, {id(p): p for p in traced.parameters()  # inference tensors cannot be differentiated:
                             if p.data_ptr() in model_storage and not p.is_inference()})  # those are copied
    gm.eval()  # the private copy computes as at inference (BatchNorm running statistics, no dropout)
    removed = remove_dead_sites(gm)
    sites, skipped = find_sites(gm)
    for k in skipped:
        if k.reason.startswith(("weight tied", "weight also used")):  # shared weights: say so, once per layer
            warnings.warn(f"layer {k.target!r} is not decomposed: {k.reason}", stacklevel=2)
    # passes/ names the remedy for layers inside untraced modules in torch's terms; add fxdeco's switch for it
    skipped = [dataclasses.replace(k, reason=f"{k.reason} (capture='export')") if "does not trace into" in k.reason
               else k for k in skipped]
    skip = _skip_patterns(skip)
    warn_unmatched_patterns("skip", skip, [*(s.target for s in sites), *(k.target for k in skipped), *removed])
    skipped += [SkippedSite(s.node, s.target, "skipped by pattern") for s in sites if matches_any(s.target, skip)]
    sites = [s for s in sites if not matches_any(s.target, skip)]
    if not sites:
        reasons = "; ".join(list(dict.fromkeys([*(f"{k.target}: {k.reason}" for k in skipped),
                                                 *(f"{t}: its output is never used" for t in removed)]))[:5]) \
            or "no Linear or Conv2d layer found"
        raise NoSitesError(f"{type(model).__name__} has no decomposable Linear/Conv2d layer ({reasons})")
    log.info("prepared %d layers for calibration (%d skipped, %d dead)", len({s.target for s in sites}),
             len(skipped), len(removed))
    if sensitivity_loss is not None and not callable(sensitivity_loss):
        raise TypeError(f"sensitivity_loss must be a function (output, batch) -> scalar, got "
                        f"{type(sensitivity_loss).__name__}")
    return PreparedModel(gm, sites, skipped, removed, params_original, row_weights, stat_mask_fn,
                         sensitivity or sensitivity_loss is not None, output_fn=output_fn, keep_batches=keep_batches,
                         stat_dtype=stat_dtype, sensitivity_loss=sensitivity_loss)


@torch.inference_mode(False)
def convert(prepared: PreparedModel, method: str | MethodConfig = "falor", *, process_group: Any = None,
            **options: Any) -> torch.fx.GraphModule:
    """Decompose a calibrated :class:`PreparedModel` with ``method``; return a new GraphModule.

    ``method`` is a method config (``fxdeco.Falor(keep_params=0.5)``), or a
    method's name with its options as keywords (``method="falor",
    keep_params=0.5``; see :class:`fxdeco.Falor` for falor's options).
    Per-layer records are on the graph's nodes (``fxdeco.metadata.factored_nodes``) and summarised by
    :func:`fxdeco.report`.

    Several processes (``torchrun``): with ``torch.distributed`` initialised, every rank calls ``convert`` on
    its own calibrated model; the statistics and every measured error are all-reduced first, so every rank
    gets the same plan (a mismatch raises ``fxdeco.distributed.DistributedError``). ``process_group``: None
    (the default group when one with several processes is initialised), a ``ProcessGroup``, or ``False``
    to plan from this process's data alone (:mod:`fxdeco.distributed`). Save on rank 0 only.

    Example:
        >>> import torch, fxdeco
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
        >>> prepared = fxdeco.calibrate(fxdeco.prepare(model), [torch.randn(64, 32) for _ in range(4)])
        >>> half = fxdeco.convert(prepared, keep_params=0.5)
        >>> sum(p.numel() for p in half.parameters()) <= 0.5 * sum(p.numel() for p in model.parameters())
        True
    """
    if not isinstance(prepared, PreparedModel):
        raise TypeError("convert() expects the result of fxdeco.prepare(...)")
    # every rank plans from the sums of all ranks' calibrations, in a copy: prepared keeps its own sums
    active = distributed.collective(process_group)
    if active is not None:
        prepared = distributed.all_reduce_statistics(prepared, active)
    if prepared.batches == 0:
        raise CalibrationError("no calibration batch was run through the prepared model; call it on your data first")
    prepared.settle_macs()  # the model's MACs on every batch's rows, as the layers' MACs are counted
    config = method_config(method, **options)
    if config.name not in RUNNERS:
        raise ValueError(f"{type(config).__name__} does not decompose from calibration statistics: run it with "
                         f"fxdeco.transform(model, loader, fxdeco.{type(config).__name__}(...))")
    if getattr(config, "sequential", False):
        raise ValueError("sequential=True calibrates while it decomposes, block by block: run it with "
                         f"fxdeco.transform(model, loader, fxdeco.{type(config).__name__}(..., sequential=True))")
    _warn_unmatched_skip(prepared, config)
    start = time.perf_counter()
    with distributed.reducing(active):  # the methods reduce what they measure over the same group
        plan, decisions, summary, *trained = RUNNERS[config.name](prepared, config)
        distributed.check_same_plan(decisions)  # never different models on different ranks
    _record_calibration_rows(decisions, prepared.statistics)
    return _factorized(prepared, config, plan, decisions, summary, trained[0] if trained else None, start)


def _warn_unmatched_skip(prepared: PreparedModel, config: MethodConfig) -> None:
    """Warn about a method's ``skip`` pattern that matches no layer of the prepared model (it would skip nothing)."""
    names = [*(s.target for s in prepared.sites), *(k.target for k in prepared.skipped), *prepared.removed]
    warn_unmatched_patterns("skip", getattr(config, "skip", ()), names)


def _factorized(prepared: PreparedModel, config: MethodConfig, plan: dict, decisions: list[LayerDecision],
                summary: dict, trained: torch.fx.GraphModule | None, start: float) -> torch.fx.GraphModule:
    """The decomposed GraphModule of a plan, with its model record."""
    # a method that trains the graph while it decomposes (dwain's finetune_fn) returns that graph, factored
    new = trained if trained is not None else factorize_sites(prepared.gm, prepared.sites, plan)
    new.delete_all_unused_submodules()
    _restore_buffers(new, prepared, trained is not None)
    _record(new, prepared, config, decisions, summary, start)
    return new


def _restore_buffers(new: nn.Module, prepared: PreparedModel, trained: bool) -> None:
    """Give the decomposed graph the buffers the model had when it was prepared.

    Calibration and a method's measurements run the graph's forward, and a forward
    may update buffers (a step counter, an exponential average): without this the
    result would start from the state those runs left, and compute something else
    than the model. A graph the method trained (dwain's ``finetune_fn``) keeps
    the buffers its training changed (a BatchNorm's running statistics in train
    mode): only those still as calibration left them are restored.
    """
    current = dict(prepared.gm.named_buffers())
    with torch.no_grad():
        for name, buffer in new.named_buffers():
            initial = prepared.initial_buffers.get(name)
            if initial is None or initial.shape != buffer.shape or torch.equal(buffer, initial.to(buffer)):
                continue
            if trained and not (name in current and torch.equal(buffer, current[name].to(buffer))):
                continue  # changed by the method's training
            buffer.copy_(initial)


def _record(new: nn.Module, prepared: PreparedModel, config: MethodConfig, decisions: list[LayerDecision],
            summary: dict, start: float) -> None:
    """Attach the model record of a decomposition to ``new`` (the decomposed graph, or the caller's model
    decomposed in place)."""
    saved_params = sum(d.params_before - d.params_after for d in decisions)
    saved_macs = sum(d.macs_before - d.macs_after for d in decisions)
    other = original_totals(prepared.gm).other_macs
    # the layers' MACs are counted on every batch's rows (sequential mode: the walk's), the model's must be too
    macs_before = prepared.macs_per_sample if other is None else other + sum(d.macs_before for d in decisions)
    captured = capture_record(prepared.gm)
    summary = {**summary, "memory": memory_figures(
        summary["sequential"]["peak_statistics_bytes"] if "sequential" in summary else
        statistics_bytes([*prepared.collected.outputs.values(), *prepared.collected.inputs.values()],
                         (prepared.sensitivity_moments or {}).values()))}
    set_model_record(new, ModelRecord(
        method=config.name, options=config.recorded_options(), capture=captured.kind, decisions=decisions,
        skipped=list(prepared.skipped), removed=list(prepared.removed), params_before=prepared.params_original,
        params_after=sum(p.numel() for p in new.parameters()), macs_before=macs_before,
        macs_after=None if macs_before is None else macs_before - saved_macs, constant_inputs=dict(captured.constant_inputs),
        calibration_batches=prepared.batches, summary=dict(summary)))
    log.info("%s decomposed %d of %d layers in %.2fs (%d parameters saved)", config.name,
             sum(d.decomposed for d in decisions), len(decisions), time.perf_counter() - start, saved_params)


def _record_calibration_rows(decisions: list[LayerDecision], statistics: dict[str, Any]) -> None:
    """Note in each decision how many rows its statistics saw, and warn about layers that saw too few.

    A layer whose statistics saw fewer rows than its full rank has a spectrum cut by the amount of data:
    its NSR reads 0 from that rank on, whatever the layer does on other inputs. (Sequential mode fills the rows in
    as it goes and passes its last block's statistics.)
    """
    for d in decisions:
        stats = statistics.get(d.target)
        if stats is not None:
            d.calib_rows = float(stats.weight if stats.weight is not None else stats.rows)
    starved = sorted((d for d in decisions if d.too_little_data), key=lambda d: d.calib_rows / d.full_rank)
    if not starved:
        return
    worst = starved[0]
    # samples seen (its rows per sample are tokens or pixels; 1 for a plain Linear)
    samples = statistics[worst.target].samples if worst.target in statistics else None
    needed = math.ceil(worst.full_rank * samples / worst.calib_rows) if worst.calib_rows > 0 and samples else None
    warn_user(
        f"too little calibration data: {len(starved)} of {len(decisions)} layers saw fewer rows than their full rank "
        f"(e.g. {worst.target!r}: {worst.calib_rows:.0f} rows for full rank {worst.full_rank}), so their spectra "
        "and NSR (which reads 0 past that point) describe the calibration set, not the layer; their ranks will not "
        "hold on other data. Calibrate on more samples"
        + (f" (at least {needed} samples for {worst.target!r}, more for reliable ranks)" if needed else "")
        + "; the report marks these layers TOO LITTLE DATA")


def calibrate(prepared: PreparedModel, calib_loader: Iterable[Any], *, input_fn: Callable[[Any], Any] | None = None,
              show_progress: bool | None = None) -> PreparedModel:
    """Run every batch of ``calib_loader`` through ``prepared`` (:meth:`PreparedModel.calibrate_batch`).

    ``input_fn`` adapts each batch first (``lambda b: b[0]`` for ``(x, y)``);
    the prepared model's ``stat_mask_fn``, if any, sees the adapted batch.

    Example:
        >>> import torch, fxdeco
        >>> prepared = fxdeco.prepare(torch.nn.Linear(4, 4))
        >>> fxdeco.calibrate(prepared, [torch.randn(2, 4)] * 3).batches
        3
    """
    check_input_fn(input_fn)
    check_loader(calib_loader)
    _calibrate(prepared, calib_loader, input_fn, show_progress, length_of(calib_loader))
    return prepared


def _calibrate(prepared: PreparedModel, batches: Iterable[Any], input_fn: Callable[[Any], Any] | None,
               show_progress: bool | None, total: int | None,
               after_first: Callable[[Any, Any, int], None] | None = None) -> None:
    """The calibration loop: each batch (adapted by ``input_fn``) through ``prepared``, with progress.

    ``after_first(output, batch, index)`` runs once the first batch is in, and again after each later batch kept as
    a metric batch (``prepared.keep_batches``), for checks that need those batches and must not wait for all of them.
    """
    seen = 0
    for batch in progress(batches, desc="calibrating", total=total, enabled=show_progress):
        out = prepared.calibrate_batch(adapt_batch(batch, input_fn, prepared.batches), loss_batch=batch)
        if seen < max(1, prepared.keep_batches) and after_first is not None:
            after_first(out, prepared.kept_raw[seen] if len(prepared.kept_raw) > seen else batch, seen)
        seen += 1
    if seen == 0:
        raise no_batches(batches)
    log.info("calibrated on %d batches", seen)


def _calibrate_agreeing(prepared: PreparedModel, batches: Iterable[Any], input_fn: Callable[[Any], Any] | None,
                        show_progress: bool | None, total: int | None,
                        after_first: Callable[[Any, Any, int], None] | None,
                        active: distributed.Collective | None) -> None:
    """:func:`_calibrate`; under torch.distributed, a rank whose calibration fails tells the others.

    Without this, a bad batch on one rank left the others waiting in the
    statistics' all-reduce until the process group's timeout (30 minutes by
    default), and then failing with gloo's "Connection closed by peer". The
    ranks agree twice: once after the first batch, before the first-batch
    checks (a latency budget's timing on rank 0 is a collective), and once
    after the last. A rank that failed joins the agreement it had not passed
    yet, so the gathers match on every rank; ranks with more batches than the
    failing one finish theirs first. (Sequential mode: :func:`fxdeco.distributed.agreeing` around each block.)
    """
    if active is None:
        _calibrate(prepared, batches, input_fn, show_progress, total, after_first=after_first)
        return
    first, last = "calibrating on its first batch", "calibrating"
    pending = first  # the agreement this rank has not joined yet

    def agree_then_check(output: Any, batch: Any, index: int) -> None:
        nonlocal pending
        if index == 0:
            distributed.agree(None, first, active)
            pending = last
        if after_first is not None:
            after_first(output, batch, index)

    with distributed.agreeing(lambda: pending, active):  # the one not joined yet, or after the last batch
        _calibrate(prepared, batches, input_fn, show_progress, total, after_first=agree_then_check)


def _warn_if_not_batch_first(selected: torch.Tensor, samples: int | None) -> None:
    """Warn when the compared output's dimension 0 is not the batch's samples.

    The final-output NSR takes dimension 0 of the output as the samples and every other element as a channel. On a
    model fed single unbatched samples (a dataset without a DataLoader: 1-D vectors, (C, H, W) images) dimension 0 is
    the classes or the channels: on a 1-D MLP the measured NSR read 0.005 where the held-out NSR was 0.22.
    """
    if samples is not None and selected.dim() > 0 and selected.shape[0] != samples:
        warn_user(f"the output compared by the final-output criteria has {selected.shape[0]} entries along dimension "
                  f"0, the calibration batch {samples} samples (dimension 0 of its first input): final-output NSR "
                  "takes dimension 0 of the output as the samples, so here it measures something else. Are the "
                  "calibration batches single unbatched samples? Batch them (e.g. a DataLoader), or select a "
                  "batch-first tensor with output_fn")


def _first_batch_checks(prepared: PreparedModel, config: MethodConfig) -> Callable[[Any, Any, int], None] | None:
    """What transform checks on the first batch's output (and the batch), and on each metric batch's, rather than
    after the whole calibration."""
    from fxdeco.methods.falor.final_metrics import check_metric_batch

    def check_compared(output: Any, index: int) -> None:
        # a tuple/dict/ModelOutput needs output_fn, and a metric batch needs 2 samples: say so now
        selected = select_output(output, prepared.output_fn)
        if index == 0:
            _warn_if_not_batch_first(selected, prepared.last_samples)
        check_metric_batch(selected, index, config.kept_batches)

    if isinstance(config, Dwain):
        from fxdeco.methods.dwain.search import check_loss

        def check_dwain(output: Any, batch: Any, index: int) -> None:
            if index == 0:
                check_loss(config.loss_fn, output, batch, 0)  # a bad loss_fn fails now, not after calibration
            if math.isfinite(config.nsr_final_threshold):
                check_compared(output, index)
        return check_dwain
    if not isinstance(config, Falor):
        return None

    def check(output: Any, batch: Any, index: int) -> None:
        if config.mode == "final-output":
            check_compared(output, index)
        if index == 0 and config.latency_batch is not None and prepared.kept_inputs:
            from fxdeco.methods.falor.speed import timing_inputs

            timing_inputs(prepared.kept_inputs[0], config.latency_batch)  # too few samples: said now
        if index == 0:
            check_budget_reachable(prepared, config)
    return check


def _run_lockd(model: nn.Module, loader: Iterable[Any], config: Lockd, *, example_inputs: Any,
               input_fn: Callable[[Any], Any] | None, leaf_modules: Iterable[type[nn.Module]],
               autowrap_functions: Iterable[Callable[..., Any]], capture: str, skip: tuple[str, ...]
               ) -> torch.fx.GraphModule:
    """lockd from one call: branches beside every layer, ``config.steps`` training batches, the pruned result."""
    from fxdeco.methods import lockd  # the training machinery, only when asked for

    batches = TrainingBatches(loader, what="calibration loader")
    first = batches.next()  # the example for capture; a one-shot loader's first batch must not be lost
    if example_inputs is None:
        example_inputs = adapt_batch(first, input_fn, 0)
    gm = lockd.prepare(model, example_inputs, skip=(*skip, *config.skip), init=config.init,
                       nsr_threshold=config.nsr_threshold, conv_order=config.conv_order, init_logit=config.init_logit,
                       temperature=config.temperature, leaf_modules=leaf_modules,
                       autowrap_functions=autowrap_functions, capture=capture)
    training = loader if not batches.one_shot else itertools.chain([first], loader)
    lockd.train(gm, training, steps=config.steps, lr=config.lr, logit_lr=config.logit_lr, lmbda=config.lmbda,
                entropy_weight=config.entropy_weight, input_fn=input_fn, amp=config.amp,
                eval_batches=config.eval_batches, show_progress=config.show_progress)
    small = lockd.finalize(gm, proportion_threshold=config.proportion_threshold)
    model_record(small).options = config.recorded_options()
    return small


def transform(
    model: nn.Module,
    calib_loader: Iterable[Any],
    config: MethodConfig | None = None,
    *,
    method: str = "falor",
    example_inputs: Any = None,
    input_fn: Callable[[Any], Any] | None = None,
    skip: Iterable[str] = (),
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
    capture: str = "auto",
    stat_mask_fn: StatMaskFn | None = None,
    output_fn: OutputFn | None = None,
    stat_dtype: torch.dtype | None = None,
    show_progress: bool | None = None,
    process_group: Any = None,
    **method_options: Any,
) -> torch.fx.GraphModule:
    """Capture, calibrate on ``calib_loader`` and decompose ``model`` in one call.

    ``config`` is the method and its options, ``fxdeco.Falor(keep_params=0.5)``;
    ``method="falor", keep_params=0.5`` builds the same config from keywords.
    It says what calibration it needs (gradient moments, kept batches), and a
    bad option fails before any batch is read.

    ``calib_loader`` is any iterable of batches: a tensor is the positional
    input, a tuple/list the positional inputs, a dict the keyword inputs;
    ``input_fn`` adapts other batches (``input_fn=lambda b: b[0]`` for ``(x, y)``).
    When symbolic tracing fails, the first batch (or ``example_inputs``) is used
    to capture the model with ``torch.export``. For padded text batches,
    ``stat_mask_fn=lambda batch: batch["attention_mask"]`` keeps padding out of
    the statistics (see :func:`prepare`). ``output_fn`` selects the output tensor
    that final-output criteria compare when the model does not return a tensor.
    ``stat_dtype`` is the precision of the activation products (see :func:`prepare`).
    Under ``torchrun``, give each rank its own shard of the data (``fxdeco.distributed.shard``): the
    statistics are all-reduced before any decision and every rank returns the same plan
    (``process_group``: see :func:`convert`).

    Example:
        >>> import torch, fxdeco
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
        >>> data = [torch.randn(32, 4) @ torch.randn(4, 16) for _ in range(4)]   # rank-4 inputs
        >>> small = fxdeco.transform(model, data, nsr_threshold=0.01)
        >>> print(fxdeco.report(small).totals["params_after"] < 2192)
        True
    """
    return _decompose(False, model, calib_loader, config, method=method, example_inputs=example_inputs,
                      input_fn=input_fn, skip=skip, leaf_modules=leaf_modules,
                      autowrap_functions=autowrap_functions, capture=capture, stat_mask_fn=stat_mask_fn,
                      output_fn=output_fn, stat_dtype=stat_dtype, show_progress=show_progress,
                      process_group=process_group, **method_options)


def decompose_(
    model: nn.Module,
    calib_loader: Iterable[Any],
    config: MethodConfig | None = None,
    *,
    method: str = "falor",
    example_inputs: Any = None,
    input_fn: Callable[[Any], Any] | None = None,
    skip: Iterable[str] = (),
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
    capture: str = "auto",
    stat_mask_fn: StatMaskFn | None = None,
    output_fn: OutputFn | None = None,
    stat_dtype: torch.dtype | None = None,
    show_progress: bool | None = None,
    process_group: Any = None,
    **method_options: Any,
) -> nn.Module:
    """Decompose ``model`` in place: :func:`transform`'s decomposition, with each decomposed layer of the model
    swapped for a :class:`fxdeco.io.apply.FactoredLinear` / ``FactoredConv2d`` module; returns ``model``.

    The model keeps its class and everything else (a Hugging Face causal LM
    keeps ``generate()``), as with :func:`fxdeco.apply`, but no copy of the model
    is made. With ``Falor(..., sequential=True)`` each block's layers are
    swapped as soon as the walk is past the block, and their dense weights
    are freed then, so the peak memory is the model and one block's
    statistics and activations: the way to decompose a model that does not
    fit in memory twice. ``fxdeco.report(model)`` works on the result.

    Every decomposable layer must be the call of an ``nn.Linear``,
    ``nn.Conv2d`` or transformers ``Conv1D`` module used nowhere else in the
    graph: this is checked after the capture, before any batch is read, and
    raises :class:`fxdeco.ApplyError` naming the first layer that is not
    (``skip`` it). In sequential mode an error in the middle of the walk (a
    batch that cannot run) leaves the blocks before it decomposed, each one
    a correct factored layer; the other modes change the model only at the
    end. lockd (which trains the whole graph) is refused: use
    ``fxdeco.apply(model, fxdeco.transform(...))``.

    Example:
        >>> import torch, fxdeco
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
        >>> data = [torch.randn(32, 4) @ torch.randn(4, 64) for _ in range(4)]   # rank-4 inputs
        >>> same = fxdeco.decompose_(model, data, fxdeco.Falor(nsr_threshold=0.01, sequential=True))
        >>> same is model, type(model[0]).__name__, model[0].rank
        (True, 'FactoredLinear', 16)
        >>> fxdeco.report(model).totals["params_after"], sum(p.numel() for p in model.parameters())
        (6144, 6144)
    """
    return _decompose(True, model, calib_loader, config, method=method, example_inputs=example_inputs,
                       input_fn=input_fn, skip=skip, leaf_modules=leaf_modules,
                       autowrap_functions=autowrap_functions, capture=capture, stat_mask_fn=stat_mask_fn,
                       output_fn=output_fn, stat_dtype=stat_dtype, show_progress=show_progress,
                       process_group=process_group, **method_options)


def _decompose(inplace: bool, model: nn.Module, calib_loader: Iterable[Any], config: MethodConfig | None = None, *,
               method: str = "falor", example_inputs: Any = None, input_fn: Callable[[Any], Any] | None = None,
               skip: Iterable[str] = (), leaf_modules: Iterable[type[nn.Module]] = (),
               autowrap_functions: Iterable[Callable[..., Any]] = (), capture: str = "auto",
               stat_mask_fn: StatMaskFn | None = None, output_fn: OutputFn | None = None,
               stat_dtype: torch.dtype | None = None, show_progress: bool | None = None, process_group: Any = None,
               **method_options: Any) -> nn.Module:
    """transform (``inplace=False``: returns the decomposed GraphModule) or decompose_ (``inplace=True``: returns
    ``model``, decomposed in place)."""
    # Before calibration: a typo must not cost a calibration run.
    _check_model(model)
    config = method_config(config if config is not None else method, **method_options)
    config, show_progress = _one_progress_setting(config, show_progress)
    active = distributed.collective(process_group)
    if active is not None and isinstance(config, Lockd):
        raise ValueError("lockd trains and does not all-reduce over torch.distributed, so the ranks would make "
                         "different models: pass process_group=False to run each process on its own (or wrap the "
                         "graph in DistributedDataParallel and call fxdeco.lockd.train)")
    skip = _skip_patterns(skip)
    _check_stat_mask_fn(stat_mask_fn)
    check_input_fn(input_fn)
    total = length_of(calib_loader)
    if total == 0 and active is None:  # said as such (and why, for a DataLoader that drops its only batch), not as
        raise no_batches(calib_loader)  # too few metric batches (under torch.distributed: below, told to every rank)
    # the metric batches of final-output mode and of dwain are the loader's first batches: too few fail now
    if total is not None and total < config.kept_batches and (getattr(config, "mode", None) == "final-output"
                                                               or isinstance(config, Dwain)):
        raise ValueError(f"num_metric_batches={config.kept_batches} but the calibration loader holds {total} "
                         "batch(es); lower num_metric_batches or give more batches")
    if isinstance(config, Lockd) and inplace:
        raise ValueError("decompose_ does not run lockd: it trains the whole graph, so the result is made at the end "
                         "anyway; use fxdeco.apply(model, fxdeco.transform(model, loader, fxdeco.Lockd(...)))")
    if isinstance(config, Lockd):
        unused = [name for name, value in (("stat_mask_fn", stat_mask_fn), ("output_fn", output_fn),
                                           ("stat_dtype", stat_dtype)) if value is not None]
        if unused:
            raise ValueError(f"{', '.join(unused)} apply to falor's statistics, not to lockd's training; drop them")
        return _run_lockd(model, calib_loader, config, example_inputs=example_inputs, input_fn=input_fn,
                          leaf_modules=leaf_modules, autowrap_functions=autowrap_functions, capture=capture,
                          skip=skip)
    # under torch.distributed, a rank whose loader is empty (or bad) says so to the others before they wait for it
    failure = None
    try:
        first, iterator = _first_batch(calib_loader)
    except (TypeError, ValueError) as exc:
        failure = exc
    if active is not None:
        distributed.agree(failure, "reading its calibration loader", active)
    if failure is not None:
        raise failure
    if example_inputs is None:
        example_inputs = adapt_batch(first, input_fn, 0)
    if getattr(config, "sequential", False):
        return _transform_sequential(model, itertools.chain([first], iterator), config, total=total,
                                     example_inputs=example_inputs, input_fn=input_fn, skip=skip,
                                     leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                                     capture=capture, stat_mask_fn=stat_mask_fn, stat_dtype=stat_dtype,
                                     show_progress=show_progress, active=active, inplace=inplace)
    prepared = prepare(model, example_inputs, skip=skip, leaf_modules=leaf_modules,
                       autowrap_functions=autowrap_functions, capture=capture, stat_mask_fn=stat_mask_fn,
                       sensitivity=config.needs_sensitivity, output_fn=output_fn, keep_batches=config.kept_batches,
                       stat_dtype=stat_dtype,
                       sensitivity_loss=getattr(config, "loss_fn", None) if config.needs_sensitivity else None)
    if inplace:  # before any batch is read: every layer that may be decomposed can be swapped in the model
        check_swappable(model, prepared.gm, _decomposable(prepared, config))
    with distributed.reducing(active):  # a latency budget checked on the first batch is timed on rank 0
        _calibrate_agreeing(prepared, itertools.chain([first], iterator), input_fn, show_progress, total,
                            _first_batch_checks(prepared, config), active)
    small = convert(prepared, config, process_group=active if active is not None else False)
    if not inplace:
        return small
    apply(model, small, inplace=True)
    record = dataclasses.replace(model_record(small), params_after=sum(p.numel() for p in model.parameters()))
    set_model_record(model, record)
    del small, prepared
    free_reference_cycles()  # the graphs held the dense weights the swap replaced
    return model


def _one_progress_setting(config: MethodConfig, show_progress: bool | None) -> tuple[MethodConfig, bool | None]:
    """``transform(show_progress=...)`` and the config's ``show_progress`` made one setting, so that
    ``show_progress=False`` silences the method's own loops (layer timing, budget rounds, lockd's steps) as well as
    calibration, and a config's setting governs calibration too. Given both ways and different: refused."""
    checked = check_flag("show_progress", show_progress, optional=True)
    own = getattr(config, "show_progress", None)
    if checked is None or not any(f.name == "show_progress" for f in dataclasses.fields(config)):
        return config, own if checked is None else checked
    if own is not None and own != checked:
        raise ValueError(f"show_progress={checked} was given to transform but the method config says "
                         f"show_progress={own}: give it once")
    return dataclasses.replace(config, show_progress=checked), checked


def _first_batch(calib_loader: Iterable[Any]) -> tuple[Any, Iterator[Any]]:
    """The loader's first batch and an iterator over the rest (a clear error for an empty or endless loader, or
    for something that is no loader)."""
    check_loader(calib_loader)  # lockd reads its steps from an endless loader; the other methods read all of it
    try:
        iterator = iter(calib_loader)
    except TypeError:
        raise TypeError(f"calib_loader must be an iterable of batches (a list, a DataLoader, a generator), got "
                        f"{type(calib_loader).__name__}") from None
    try:
        return next(iterator), iterator
    except StopIteration:
        raise no_batches(calib_loader) from None


def _decomposable(prepared: PreparedModel, config: MethodConfig) -> list[Site]:
    """The sites a method may decompose: the prepared ones its own ``skip`` patterns leave."""
    patterns = tuple(getattr(config, "skip", ()))
    return [s for s in prepared.sites if not matches_any(s.target, patterns)]


def _transform_sequential(model: nn.Module, batches: Iterable[Any], config: Falor | Dwain, *, total: int | None,
                          input_fn: Callable[[Any], Any] | None, show_progress: bool | None,
                          active: distributed.Collective | None, inplace: bool = False,
                          **prepare_options: Any) -> nn.Module:
    """transform with ``Falor(sequential=True)`` or ``Dwain(sequential=True)``: the batches cached, then each block
    calibrated and decomposed on the outputs of the ones before (``fxdeco.methods.falor.sequential``,
    ``fxdeco.methods.dwain.sequential``; dwain's metric batches are also kept as the loader gave them). Under torch.distributed (``active``) every
    rank's model, weights and blocks are compared first (before any batch is read), then each block's statistics
    are summed over the ranks before its ranks are decided. ``inplace``: each block's layers are swapped in
    ``model`` as soon as the walk is past the block (:func:`decompose_`), and ``model`` is returned."""
    from fxdeco.methods.dwain.sequential import dwain_sequential  # the block walks, only when asked for
    from fxdeco.methods.falor.sequential import falor_sequential
    from fxdeco.sequential import BlockCalibration
    from passes.blocks import find_blocks

    prepared = prepare(model, keep_batches=0, **prepare_options)
    _warn_unmatched_skip(prepared, config)  # before any batch is read: the walk reads the patterns block by block
    if active is not None:  # before any batch is read: another model, other weights or other blocks on one rank
        try:  # would sum two models' statistics, or put the per-block all-reduces out of step
            blocks: Any = find_blocks(prepared.gm, prepared.sites, config.blocks)
        except ValueError as exc:  # a scope that holds no layer: raised once the ranks compared, so none waits
            blocks = exc
        with distributed.reducing(active):
            distributed.check_same_model(prepared, blocks)
    budget = getattr(config, "budget", None)
    if budget is not None and budget[0] == "params":  # MACs need a block's rows: the walk checks
        check_budget_reachable(prepared, config)
    if inplace:  # before any batch is read
        check_swappable(model, prepared.gm, _decomposable(prepared, config))
        free_reference_cycles()  # else they hold the dense weights each block's swap frees
    start = time.perf_counter()
    raws: list[Any] = []  # dwain's metric batches, as the loader gave them (loss_fn reads its targets there)
    if isinstance(config, Dwain):
        batches = _keeping_first(batches, config.kept_batches, raws)
    # a rank whose batches cannot be cached (one that does not fit the model) tells the others before they wait
    with distributed.agreeing("caching its calibration batches", active):
        calibration = BlockCalibration(prepared, batches, input_fn=input_fn, scopes=config.blocks,
                                       spill_dir=config.spill_dir, show_progress=show_progress, total=total)
    swapped: list[str] = []  # the layers already factored in the caller's model (decompose_)
    on_block = _swap_into(model, prepared, calibration, swapped) if inplace else None
    try:
        with distributed.reducing(active):
            if active is not None:  # budgets in MACs are fractions of rank 0's count, as one process would have
                prepared.macs_per_sample = original_totals(prepared.gm).macs = active.broadcast(
                    prepared.macs_per_sample)
                original_totals(prepared.gm).other_macs = active.broadcast(original_totals(prepared.gm).other_macs)
                prepared.batches = int(distributed.all_sum([prepared.batches])[0])
            if isinstance(config, Dwain):
                plan, decisions, summary = dwain_sequential(calibration, config, raws, prepared.params_original,
                                                            on_block=on_block)
            else:
                plan, decisions, summary = falor_sequential(calibration, config, on_block=on_block)
            distributed.check_same_plan(decisions)
    except BaseException as exc:  # an error or Ctrl-C half-way: say what the caller's model now is
        if swapped:
            note = (f"decompose_ stopped after it had factored {len(swapped)} of {len({s.target for s in prepared.sites})}"
                    f" layers of the model in place ({', '.join(swapped[:6])}{', ...' if len(swapped) > 6 else ''}): "
                    "the model is left partly decomposed (each of those layers computes its factored form, the "
                    "others are dense, and it carries no fxdeco record); reload its weights to start again")
            warn_user(note)
            if hasattr(exc, "add_note"):
                exc.add_note(note)
        raise
    finally:
        calibration.close()
    _record_calibration_rows(decisions, {})
    if inplace:
        _record(model, prepared, config, decisions, summary, start)
        return model
    return _factorized(prepared, config, plan, decisions, summary, None, start)


def _keeping_first(batches: Iterable[Any], count: int, kept: list[Any]) -> Iterable[Any]:
    """``batches``, with the first ``count`` appended to ``kept`` as they pass (cloned: a loader may reuse its
    buffers)."""
    for batch in batches:
        if len(kept) < count:
            kept.append(pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), batch))
        yield batch


def _swap_into(model: nn.Module, prepared: PreparedModel, calibration: Any, swapped: list[str]
               ) -> Callable[[dict[str, Factorization]], None]:
    """What :func:`decompose_` does with each block's plan in sequential mode: the factored module goes into the
    caller's model and into the walk's graph in place of the dense one, whose weights nothing then holds (the
    walk never runs a finished block again). Each swapped layer's name is appended to ``swapped``."""
    sites = {s.target: s for s in prepared.sites}

    def swap(block_plan: dict[str, Factorization]) -> None:
        for target, fact in block_plan.items():
            site, dense = sites[target], model.get_submodule(target)
            bias = fetch_attr(prepared.gm, site.bias) if site.bias else None
            layers = factored_module(site, fact, dense.weight, bias)
            factored = (FactoredConv2d if site.kind == "conv2d" else FactoredLinear)(*layers).train(dense.training)
            factored.requires_grad_(dense.weight.requires_grad)
            swap_module(model, target, factored)
            swapped.append(target)
            calibration.replace_module(target, factored)
        block_plan.clear()  # the factors now live in the modules only

    return swap
