"""``fxdeco.trace``: symbolic tracing first, ``torch.export`` where tracing cannot follow."""

from __future__ import annotations

import contextlib
import inspect
import logging
import traceback
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx
from torch import nn

from fxdeco.batches import as_call
from fxdeco.errors import warn_user
from fxdeco.modes import eval_mode
from passes import CaptureError, export_capture, symbolic_capture, training_mode_nodes
from passes.capture import optional_tensor_inputs, require_inputs, reword_constant_checks

log = logging.getLogger(__name__)


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm's registries of modules/functions that must not be traced through."""
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return (), ()
    return tuple(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())


def _failing_construct(exc: BaseException) -> str:
    """Describe where tracing failed: the innermost frame outside torch, and the message."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    where = f" at {frames[-1].filename}:{frames[-1].lineno} ({(frames[-1].line or '').strip()})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _warn_unit_dims(args: tuple, kwargs: dict[str, Any]) -> None:
    """torch.export specialises dimensions of size 1: the graph would accept only that size."""
    for name, value in [*enumerate(args), *kwargs.items()]:
        if isinstance(value, torch.Tensor) and 1 in value.shape[:-1]:
            log.warning("example input %s has shape %s: torch.export fixes dimensions of size 1, so the captured "
                        "graph will only accept that size there; use an example with batch size and sequence "
                        "length >= 2", name, tuple(value.shape))


@contextlib.contextmanager
def _without_kv_cache(model: nn.Module, kwargs: dict[str, Any]) -> Iterator[None]:
    """Capture a Hugging Face model with ``config.use_cache`` off, restoring the caller's config after.

    A causal LM returns its key/value cache by default; torch.export cannot
    flatten the cache object, and a decomposed graph has no use for it (the
    logits are the same with and without). A batch that passes ``use_cache``
    itself decides.
    """
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False) is not True or "use_cache" in kwargs:
        yield
        return
    log.info("capturing %s with config.use_cache=False: the graph returns no key/value cache",
             type(model).__name__)
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def trace(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
    capture: str = "auto",
    constant_inputs: dict[str, Any] | None = None,
) -> torch.fx.GraphModule:
    """Capture ``model`` as a GraphModule.

    ``capture="auto"`` (default) tries symbolic tracing, then export;
    ``"symbolic"`` or ``"export"`` force one path. Export sees inside modules
    that symbolic tracing keeps as leaves (timm's MobileViT blocks, torchvision's
    shifted-window attention), at the price of a slower capture.

    Symbolic tracing is tried first (with ``leaf_modules``, ``autowrap_functions``
    and, when timm is installed, timm's no-trace registries). When it fails and
    ``example_inputs`` are given (a tensor, a tuple of positional inputs or a
    dict of keyword inputs), the model is captured with
    ``torch.export(strict=False)`` in eval mode, every dimension dynamic. The
    symbolic graph shares parameters with ``model``; nothing is modified.
    Both captures see the model in eval mode (each module's mode is restored
    after), so code that reads ``self.training`` (``F.dropout(x, p,
    self.training)``, stochastic depth) is captured as at inference. A Hugging
    Face model is captured without its key/value cache (``use_cache=False``).

    Optional inputs (``forward(x, mask=None, causal=False)``): tracing cannot
    follow ``if mask is not None`` both ways, so inputs with a constant default
    (None, a bool, a number, a string) that ``example_inputs`` leaves out are
    traced as that default (``constant_inputs`` names them and their values
    explicitly; recorded in ``gm.meta["fxdeco_constant_inputs"]``), and inputs
    that default to None but were traced as tensors are required on every
    call. Either graph fails at once, with the remedy, when called the other
    way.

    Example:
        >>> import torch, fxdeco
        >>> gm = fxdeco.trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
        >>> gm.meta["fxdeco_capture"]
        'symbolic'
    """
    if isinstance(model, torch.fx.GraphModule):
        _refuse_training_graph(model)
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module or a GraphModule, got {type(model).__name__}")
    if capture not in ("auto", "symbolic", "export"):
        raise ValueError(f"capture must be 'auto', 'symbolic' or 'export', got {capture!r}")
    symbolic_error = "not tried (capture='export')"
    if capture != "export":
        timm_modules, timm_functions = _timm_notrace()
        try:
            # Tracing runs Python code: ``self.training`` read there is baked into the graph, so trace in eval mode.
            constants = dict(constant_inputs) if constant_inputs is not None \
                else _left_out_constant_inputs(model, example_inputs)
            with eval_mode(model):
                gm = symbolic_capture(model, (*leaf_modules, *timm_modules), (*autowrap_functions, *timm_functions),
                                      concrete_args=constants)
            _guard_optional_inputs(gm, knew_batch=example_inputs is not None or constant_inputs is not None)
            gm.meta["fxdeco_capture"] = "symbolic"
            gm.meta["fxdeco_constant_inputs"] = constants
            _warn_training_behaviour(gm, model)
            return gm
        except Exception as exc:  # tracing errors come in every type
            symbolic_error = _failing_construct(exc)
            if capture == "symbolic":
                raise CaptureError(f"symbolic tracing of {type(model).__name__} failed: {symbolic_error}") from exc
        log.info("symbolic tracing failed (%s); trying torch.export", symbolic_error)
    if example_inputs is None and capture == "export":
        raise CaptureError("capture='export' needs example_inputs=... (a batch the model accepts)")
    if example_inputs is None:
        raise CaptureError(
            f"symbolic tracing of {type(model).__name__} failed: {symbolic_error}.\n"
            "Remedies: pass example_inputs=... so fxdeco can capture the model with torch.export, "
            "or mark the module/function that fails as leaf_modules=(...)/autowrap_functions=(...)."
        )
    args, kwargs = as_call(example_inputs)
    _warn_unit_dims(args, kwargs)
    try:
        with eval_mode(model), torch.no_grad(), _without_kv_cache(model, kwargs):
            gm = export_capture(model, args, kwargs)
    except Exception as exc:
        raise CaptureError(
            f"{type(model).__name__} could be captured neither by symbolic tracing ({symbolic_error}) "
            f"nor by torch.export ({_failing_construct(exc)}).\n"
            "Remedies: mark the failing module/function as leaf_modules=(...)/autowrap_functions=(...) for "
            "symbolic tracing, or make the forward exportable (see torch.export's error above)."
        ) from exc
    gm.meta["fxdeco_capture"] = "export"
    _warn_training_behaviour(gm, model)
    return gm


def _left_out_constant_inputs(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    """``forward``'s inputs with a constant default (None, bool, number, string) that the example batch leaves out,
    with those defaults: the values the model sees when the batches leave them out."""
    if example_inputs is None:
        return {}
    try:
        params = list(inspect.signature(model.forward).parameters.values())
        args, kwargs = as_call(example_inputs)
    except (TypeError, ValueError):
        return {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    given = {p.name for p in positional[:len(args)]} | set(kwargs)
    return {p.name: p.default for p in params if p.name not in given
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and (p.default is None or type(p.default) in (bool, int, float, str))}


def _guard_optional_inputs(gm: torch.fx.GraphModule, knew_batch: bool) -> None:
    """Make a call that passes an optional input the other way than it was traced fail first, with the remedy."""
    reword_constant_checks(gm, lambda name, value: (
        f"input {name!r} was not in the calibration batches, so fxdeco traced the model with its default "
        f"{name}={value!r} and this graph computes only that case; to decompose the model for other values of "
        f"{name!r}, calibrate with batches that pass it"))
    # Only where the batches showed the input is given: without an example, tracing had to guess, and graphs
    # whose traced branch also accepts None (a mask handed on to scaled_dot_product_attention) keep working.
    required = optional_tensor_inputs(gm) if knew_batch else []
    if required:
        require_inputs(gm, {name: f"input {name!r} defaults to None but the calibration batches passed it, so this "
                                  f"graph computes the model's branch that uses it and needs it on every call; for "
                                  f"the branch without it, calibrate with batches that leave it out"
                            for name in required})


def _node_list(nodes: list[torch.fx.Node]) -> str:
    return ", ".join(n.format_node() or n.name for n in nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3
                                                                       else "")


def _refuse_training_graph(gm: torch.fx.GraphModule) -> None:
    """A graph captured from a model in train mode computes dropout for ever: calibrating it, or handing it back
    decomposed, would give a model that computes something else than the trained model at inference."""
    found = training_mode_nodes(gm)
    if found:
        raise CaptureError(
            f"this GraphModule computes as in training ({_node_list(found)}: dropout, stochastic depth or "
            "batch norm with training=True): it was "
            "captured from a model in train mode, and tracing recorded self.training=True as a constant. Capture "
            "it from the model in eval mode (model.eval() before torch.fx.symbolic_trace or torch.export), or "
            "pass the nn.Module itself (fxdeco captures it in eval mode)")


def _warn_training_behaviour(gm: torch.fx.GraphModule, model: nn.Module) -> None:
    found = training_mode_nodes(gm)
    if found:
        warn_user(
            f"{type(model).__name__} computes as in training even in eval mode ({_node_list(found)}; e.g. "
            "F.dropout(x, p) without training=self.training drops values at random): its statistics and its "
            "decomposed graph do so too")
