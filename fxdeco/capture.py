"""``fxdeco.trace``: symbolic tracing first, ``torch.export`` where tracing cannot follow."""

from __future__ import annotations

import contextlib
import inspect
import logging
import operator
import sys
import traceback
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from fxdeco.batches import as_call, leading_dim
from fxdeco.errors import warn_user
from fxdeco.metadata import CaptureRecord, set_capture_record
from fxdeco.modes import eval_mode
from passes import CaptureError, export_capture, symbolic_capture, training_mode_nodes
from passes.capture import optional_tensor_inputs, require_inputs, reword_constant_checks

log = logging.getLogger(__name__)


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm's registries of modules/functions that must not be traced through.

    Read only when timm is already imported: a timm model's modules import it,
    and importing it for any other model costs about 2 s (it pulls in
    torchvision and torch._dynamo).
    """
    if "timm" not in sys.modules:
        return (), ()
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
    # the top-level config and every other one a submodule holds (T5's decoder stack has its own copy)
    configs = {id(c): c for c in (config, *(getattr(m, "config", None) for m in model.modules()))
               if getattr(c, "use_cache", None) is True}
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs.values():
            c.use_cache = True


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
    explicitly; recorded in ``fxdeco.metadata.capture_record(gm)``), and inputs
    that default to None but were traced as tensors are required on every
    call. Either graph fails at once, with the remedy, when called the other
    way.

    Example:
        >>> import torch, fxdeco
        >>> gm = fxdeco.trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
        >>> from fxdeco.metadata import capture_record
        >>> capture_record(gm).kind
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
            hooks = _root_hooks(model)
            if hooks:  # the tracer calls forward itself, not model(...): the graph would silently lack them
                raise RuntimeError(f"{type(model).__name__} has {hooks} on the model itself, which symbolic tracing "
                                   "does not run (it calls forward directly); torch.export runs them")
            # Tracing runs Python code: ``self.training`` read there is baked into the graph, so trace in eval mode.
            constants = dict(constant_inputs) if constant_inputs is not None \
                else _left_out_constant_inputs(model, example_inputs)
            with eval_mode(model), state_restored(model) as changed:
                gm = symbolic_capture(model, (*leaf_modules, *timm_modules), (*autowrap_functions, *timm_functions),
                                      concrete_args=constants)
            if changed:  # the graph would hold the value the buffer had while tracing, for ever
                raise RuntimeError(f"forward changes {', '.join(changed)} in place, which symbolic tracing records "
                                   "as a constant")
            _guard_optional_inputs(gm, knew_batch=example_inputs is not None or constant_inputs is not None)
            set_capture_record(gm, CaptureRecord("symbolic", constants))
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
        with eval_mode(model), torch.no_grad(), _without_kv_cache(model, kwargs), state_restored(model):
            gm = export_capture(model, args, kwargs)
    except Exception as exc:
        raise CaptureError(
            f"{type(model).__name__} could be captured neither by symbolic tracing ({symbolic_error}) "
            f"nor by torch.export ({_failing_construct(exc)}).\n"
            "Remedies: mark the failing module/function as leaf_modules=(...)/autowrap_functions=(...) for "
            "symbolic tracing, or make the forward exportable (see torch.export's error above)."
        ) from exc
    set_capture_record(gm, CaptureRecord("export"))
    _warn_training_behaviour(gm, model)
    _guard_batch_of_one(model, gm, args, kwargs)
    return gm


def _root_hooks(model: nn.Module) -> str:
    """The forward hooks and pre-hooks registered on ``model`` itself, described (empty: none).

    Example:
        >>> m = nn.Linear(2, 2)
        >>> _root_hooks(m)
        ''
        >>> _ = m.register_forward_pre_hook(lambda mod, args: None)
        >>> _root_hooks(m)
        'a forward pre-hook'
    """
    kinds = [what for what, hooks in (("a forward hook", model._forward_hooks),
                                      ("a forward pre-hook", model._forward_pre_hooks)) if hooks]
    return " and ".join(kinds)


@contextlib.contextmanager
def state_restored(model: nn.Module) -> Iterator[list[str]]:
    """Give back every buffer the block changes in place; the list yielded names them after the block.

    Capture runs the model's Python code on its real tensors: ``self.count += 1``
    in ``forward`` would change the caller's model (and be recorded as a
    constant by symbolic tracing).

    Example:
        >>> class Counter(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.register_buffer("count", torch.zeros(1))
        ...     def forward(self, x):
        ...         self.count += 1
        ...         return x
        >>> m = Counter()
        >>> with state_restored(m) as changed:
        ...     _ = m(torch.ones(1))
        >>> changed, m.count
        (["buffer 'count'"], tensor([0.]))
    """
    buffers = [(name, b, b._version, b.detach().clone()) for name, b in model.named_buffers()]
    changed: list[str] = []
    try:
        yield changed
    finally:
        with torch.no_grad():
            for name, buffer, version, value in buffers:
                if buffer._version != version:
                    buffer.copy_(value)
                    changed.append(f"buffer {name!r}")


def _guard_batch_of_one(model: nn.Module, gm: torch.fx.GraphModule, args: tuple, kwargs: dict[str, Any]) -> None:
    """torch.export assumes every dynamic size is at least 2 and drops branches such as ``if x.shape[0] == 1`` (a
    batch of one) or ``if x.shape[1] == 1`` (a one-token step) without a guard. For each dimension the graph keeps
    dynamic, run the model and the graph on the example cut to 1 along it (in every input that has it at the same
    place with the same size: input_ids and attention_mask together): where they differ, the graph refuses size 1
    there with the reason, instead of computing something else."""
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(leaves) != len(placeholders):  # not the flat inputs of an exported graph: nothing to compare
        return
    # (dimension, example size) -> the (input, dimension) pairs there that the graph keeps dynamic; by place, not
    # by size alone: a (16, 16, 32) example's batch and sequence dimensions are cut one at a time
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, (node, value) in enumerate(zip(placeholders, leaves)):
        fake = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or not isinstance(fake, torch.Tensor) or fake.dim() != value.dim():
            continue
        for d, size in enumerate(fake.shape):
            if isinstance(size, torch.SymInt) and value.shape[d] >= 2:
                groups.setdefault((d, int(value.shape[d])), []).append((i, d))
    n = leading_dim(args, kwargs)
    for (dim, size), dims in sorted(groups.items(), key=lambda item: item[0] != (0, n)):  # the batch first
        cut = list(leaves)
        for i, d in dims:
            cut[i] = cut[i].narrow(d, 0, 1)
        args1, kwargs1 = pytree.tree_unflatten(cut, spec)
        try:
            with eval_mode(model), torch.no_grad(), _without_kv_cache(model, kwargs1), state_restored(model):
                expected = model(*args1, **kwargs1)
        except Exception:  # the model itself does not take size 1 there: nothing to protect
            continue
        batch = (dim, size) == (0, n)
        try:  # the exported graph may hold the model's own buffers: a forward that updates them must leave no trace
            with torch.no_grad(), state_restored(model), state_restored(gm):
                same = _same_tensors(gm(*args1, **kwargs1), expected)
        except Exception:  # the graph refuses that size itself (export's own shape guards); a batch gets our reason
            same = not batch
        if not same:
            _refuse_size_one(model, gm, placeholders, dims, batch=batch)


def _refuse_size_one(model: nn.Module, gm: torch.fx.GraphModule, placeholders: list[torch.fx.Node],
                     dims: list[tuple[int, int]], batch: bool) -> None:
    """Make ``gm`` fail on size 1 along the first of ``dims``, which the model computes differently (warned)."""
    i, d = dims[0]
    if batch:
        warn_user(f"{type(model).__name__} computes differently for a batch of one than the graph torch.export "
                  "captured (export assumes sizes of at least 2); the decomposed graph refuses batches of one")
        message = (f"this graph was captured with torch.export, which assumes a batch of at least 2, and "
                   f"{type(model).__name__} computes differently for a batch of one; pass at least 2 samples")
    else:
        where = ", ".join(f"dimension {dim} of input {placeholders[k].target!r}" for k, dim in dims)
        warn_user(f"{type(model).__name__} computes differently when {where} is 1 than the graph torch.export "
                  "captured (export assumes sizes of at least 2); the decomposed graph refuses size 1 there")
        message = (f"this graph was captured with torch.export, which assumes sizes of at least 2, and "
                   f"{type(model).__name__} computes differently when {where} is 1; pass a size of at least 2 "
                   "there, or use the model itself (fxdeco.apply) for that case")
    with gm.graph.inserting_after(placeholders[-1]):
        size = gm.graph.call_method("size", (placeholders[i], d))
        with gm.graph.inserting_after(size):
            ok = gm.graph.call_function(operator.ge, (size, 2))
        with gm.graph.inserting_after(ok):
            gm.graph.call_function(torch._assert, (ok, message))
    gm.recompile()


def _same_tensors(got: Any, expected: Any) -> bool:
    """Whether two outputs hold the same tensors, up to rounding (looser for 16-bit floats, whose kernels may
    round differently in the graph and in eager mode)."""
    a = [t for t in pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    b = [t for t in pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return False
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return False
            continue
        tolerance = 2e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-4
        if not torch.allclose(x.float(), y.float(), rtol=tolerance, atol=tolerance / 10):
            return False
    return True


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
