"""``fxdeco.trace``: symbolic tracing first, ``torch.export`` where tracing cannot follow."""

from __future__ import annotations

import logging
import traceback
from typing import Any, Callable, Iterable

import torch
import torch.fx
from torch import nn

from fxdeco.batches import as_call
from fxdeco.modes import eval_mode
from passes import CaptureError, export_capture, symbolic_capture

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


def trace(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
    capture: str = "auto",
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

    Example:
        >>> import torch, fxdeco
        >>> gm = fxdeco.trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
        >>> gm.meta["fxdeco_capture"]
        'symbolic'
    """
    if isinstance(model, torch.fx.GraphModule):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module or a GraphModule, got {type(model).__name__}")
    if capture not in ("auto", "symbolic", "export"):
        raise ValueError(f"capture must be 'auto', 'symbolic' or 'export', got {capture!r}")
    symbolic_error = "not tried (capture='export')"
    if capture != "export":
        timm_modules, timm_functions = _timm_notrace()
        try:
            gm = symbolic_capture(model, (*leaf_modules, *timm_modules), (*autowrap_functions, *timm_functions))
            gm.meta["fxdeco_capture"] = "symbolic"
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
        with eval_mode(model), torch.no_grad():
            gm = export_capture(model, args, kwargs)
    except Exception as exc:
        raise CaptureError(
            f"{type(model).__name__} could be captured neither by symbolic tracing ({symbolic_error}) "
            f"nor by torch.export ({_failing_construct(exc)}).\n"
            "Remedies: mark the failing module/function as leaf_modules=(...)/autowrap_functions=(...) for "
            "symbolic tracing, or make the forward exportable (see torch.export's error above)."
        ) from exc
    gm.meta["fxdeco_capture"] = "export"
    return gm
