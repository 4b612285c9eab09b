"""Capture an ``nn.Module`` as a ``torch.fx.GraphModule``.

Two flavours reach the rest of the passes:

* symbolic tracing with :class:`GraphTracer`, which honours user leaf modules and
  autowrapped functions (``call_module`` nodes for ``nn.Linear``/``nn.Conv2d``);
* ``torch.export(strict=False).module()``, an aten-level graph with weights as
  ``get_attr`` nodes, for models symbolic tracing cannot follow. Every tensor
  dimension is exported as ``Dim.AUTO`` so batch size and sequence length stay
  dynamic instead of being frozen to the example's.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Callable, Iterable

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn


class CaptureError(RuntimeError):
    """Raised when a model cannot be captured as an FX graph."""


class GraphTracer(torch.fx.Tracer):
    """A symbolic Tracer with extra leaf module types and autowrapped functions.

    Example:
        >>> tracer = GraphTracer(leaf_modules=(torch.nn.Sequential,))
        >>> graph = tracer.trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        >>> [n.op for n in graph.nodes]
        ['placeholder', 'call_module', 'output']
    """

    def __init__(
        self,
        leaf_modules: Iterable[type[nn.Module]] = (),
        autowrap_functions: Iterable[Callable[..., Any]] = (),
    ) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.leaf_modules = tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_modules and isinstance(m, self.leaf_modules):
            return True
        return super().is_leaf_module(m, module_qualified_name)


# the names torch.fx's Tracer.create_arg gives the tensors it stores on the traced module
_TRACER_CONSTANT = re.compile(r"_tensor_constant\d+")


def symbolic_capture(
    model: nn.Module,
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
    concrete_args: dict[str, Any] | None = None,
) -> torch.fx.GraphModule:
    """Symbolically trace ``model``; the result shares parameters with it.

    ``concrete_args`` fixes inputs to constants while tracing (``{"mask": None}``
    traces the ``mask is None`` branch; the graph then checks that the input
    stays None).

    Example:
        >>> gm = symbolic_capture(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()))
        >>> gm(torch.ones(1, 2)).shape
        torch.Size([1, 3])
    """
    tracer = GraphTracer(leaf_modules, autowrap_functions)
    before = set(vars(model))
    try:
        graph = tracer.trace(model, concrete_args=concrete_args or None)
        for node in graph.nodes:  # torch.fx renames an input fixed by concrete_args (mask -> mask_1): keep its keyword
            base = node.target.rsplit("_", 1)[0] if node.op == "placeholder" else None
            if base in (concrete_args or {}) and node.target not in (concrete_args or {}):
                node.target = base
        name = model.__class__.__name__
        return torch.fx.GraphModule(tracer.root, graph, name)  # copies the constants the graph reads
    finally:
        # torch.fx stores each tensor it computed while tracing (``self.index.view(-1)`` on a buffer) on the traced
        # model itself, as ``_tensor_constant<N>`` numbered after those already there: the caller's model would
        # grow an attribute per trace, and each capture of it would name its constants differently.
        for key in set(vars(model)) - before:
            if _TRACER_CONSTANT.fullmatch(key):
                delattr(model, key)


def optional_tensor_inputs(gm: torch.fx.GraphModule) -> list[str]:
    """Graph inputs that default to None but were traced as values (``forward(x, mask=None)`` traced with a proxy
    ``mask``): the graph computes the ``mask is not None`` branch, so calling it with None fails.

    Example:
        >>> class Net(nn.Module):
        ...     def forward(self, x, mask=None):
        ...         return x if mask is None else x * mask
        >>> optional_tensor_inputs(torch.fx.symbolic_trace(Net()))
        ['mask']
    """
    return [n.target for n in gm.graph.nodes
            if n.op == "placeholder" and n.args and n.args[0] is None and n.users
            and not any(u.target is torch.fx._symbolic_trace._assert_is_none for u in n.users)]


def require_inputs(gm: torch.fx.GraphModule, messages: dict[str, str]) -> None:
    """Make the graph fail with ``messages[name]`` when input ``name`` is None (checks placed first, then recompiled).

    Example:
        >>> class Net(nn.Module):
        ...     def forward(self, x, mask=None):
        ...         return x if mask is None else x * mask
        >>> gm = torch.fx.symbolic_trace(Net())
        >>> require_inputs(gm, {"mask": "this graph needs a mask"})
        >>> gm(torch.ones(1))
        Traceback (most recent call last):
        ...
        AssertionError: this graph needs a mask
    """
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        for name, message in messages.items():
            given = gm.graph.call_function(operator.is_not, (placeholders[name], None))
            gm.graph.call_function(torch._assert, (given, message))
    gm.recompile()


def reword_constant_checks(gm: torch.fx.GraphModule, message: Callable[[str, Any], str]) -> None:
    """Replace torch.fx's message for an input traced as a constant (``concrete_args``) by ``message(name, value)``.

    torch.fx guards such inputs with ``_assert_is_none(x, msg)`` (None) or ``torch._assert(x == value, msg)``;
    its message says the input "has been specialized", not why nor what to do.
    """
    for node in gm.graph.nodes:
        if node.op != "call_function" or len(node.args) != 2 or not isinstance(node.args[1], str) \
                or "has been specialized to have value" not in node.args[1]:
            continue
        if node.target is torch.fx._symbolic_trace._assert_is_none:
            source, value = node.args[0], None
        elif node.target is torch._assert and isinstance(node.args[0], torch.fx.Node) and node.args[0].args:
            source, value = node.args[0].args[0], node.args[0].args[1]  # the ``x == value`` node
        else:
            continue
        name = source.target if isinstance(source, torch.fx.Node) else str(source)  # the input's keyword
        node.args = (node.args[0], message(name, value))
    gm.recompile()


def _auto_dynamic_shapes(args: tuple, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """Mark every dimension of every tensor input ``Dim.AUTO``.

    ``Dim.AUTO`` lets export keep a dimension symbolic when the model allows it
    and specialise it silently when it does not, so the captured graph accepts
    other batch sizes and sequence lengths than the example's.
    """
    auto = torch.export.Dim.AUTO

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {i: auto for i in range(x.dim())}
        return None

    return pytree.tree_map(spec, args), pytree.tree_map(spec, kwargs)


def export_capture(model: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None) -> torch.fx.GraphModule:
    """Capture ``model`` with ``torch.export(strict=False)`` and dynamic dimensions.

    Example:
        >>> gm = export_capture(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
        >>> gm(torch.randn(5, 4)).shape   # another batch size than the example's
        torch.Size([5, 2])
    """
    kwargs = dict(kwargs or {})
    dyn_args, dyn_kwargs = _auto_dynamic_shapes(tuple(args), kwargs)
    dynamic_shapes = {**_positional_dynamic(model, dyn_args), **dyn_kwargs}
    program = torch.export.export(model, tuple(args), kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    gm = program.module()
    # first, before torch.export's own checks (whose message names no remedy)
    gm.register_forward_pre_hook(CapturedInputs.of(gm), with_kwargs=True, prepend=True)
    return gm


class CapturedInputs:
    """A forward pre-hook of an exported graph: a call with other inputs than the calibration batches passed
    fails with the reason and the remedy, not torch's bare ``unexpected keyword argument``.

    torch.export records the inputs one call passed, and its graph takes exactly
    those: an optional input the batches left out has no place in it, and one
    they passed is required on every call. The check costs a comparison of
    names per call (``passes.rewrite`` carries the hook to the decomposed graph).

    Example:
        >>> hook = CapturedInputs(("x", "mask"))
        >>> hook(None, (1,), {"mask": 2}) is None
        True
        >>> hook(None, (1,), {"shift": 2})
        Traceback (most recent call last):
        ...
        TypeError: this graph was captured by torch.export from calls with the inputs (x, mask) and takes exactly those; this call passed 'shift' (not among them) and left out 'mask'. Calibrate with batches that pass the inputs you will call it with, or decompose the model itself (fxdeco.decompose_, or fxdeco.apply onto the model) to keep its own forward
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = tuple(names)

    @classmethod
    def of(cls, gm: torch.fx.GraphModule) -> "CapturedInputs":
        import inspect

        return cls(tuple(inspect.signature(gm.forward).parameters))

    @staticmethod
    def carry(source: nn.Module, target: nn.Module) -> None:
        """Register ``source``'s hook on ``target`` too (a copy of a GraphModule drops its hooks)."""
        for hook in source._forward_pre_hooks.values():
            if isinstance(hook, CapturedInputs):
                target.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)

    def __call__(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        positional = self.names[:len(args)]
        if len(args) <= len(self.names) and len(args) + len(kwargs) == len(self.names) \
                and all(k in self.names and k not in positional for k in kwargs):
            return None
        given = [*positional, *kwargs]
        unknown = [k for k in kwargs if k not in self.names]
        missing = [n for n in self.names if n not in given]
        problems = []
        if len(args) > len(self.names):
            problems.append(f"passed {len(args)} positional inputs")
        if unknown:
            problems.append(f"passed {', '.join(map(repr, unknown))} (not among them)")
        if missing:
            problems.append(f"left out {', '.join(map(repr, missing))}")
        raise TypeError(
            f"this graph was captured by torch.export from calls with the inputs ({', '.join(self.names)}) and takes "
            f"exactly those; this call {' and '.join(problems) or 'passed one of them twice'}. Calibrate with "
            "batches that pass the inputs you will call it with, or decompose the model itself (fxdeco.decompose_, "
            "or fxdeco.apply onto the model) to keep its own forward")


def _positional_dynamic(model: nn.Module, dyn_args: tuple) -> dict[str, Any]:
    """Name positional dynamic-shape specs after ``model.forward``'s parameters (``*args`` takes the rest, as a
    tuple: torch.export matches dynamic shapes to the signature's structure)."""
    import inspect

    named: dict[str, Any] = {}
    rest = list(dyn_args)
    for p in inspect.signature(model.forward).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            named[p.name] = tuple(rest)
            break
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and rest:
            named[p.name] = rest.pop(0)
    return named


# Functions that behave differently in training when their ``training``/``train`` argument is true: dropout
# drops values at random, batch norm normalises by the batch's own statistics (and updates the running ones).
_TRAINING_FUNCTIONS = ("dropout", "stochastic_depth", "batch_norm")


def training_mode_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The function calls in ``gm`` that were captured with training behaviour switched on.

    Symbolic tracing and ``torch.export`` record ``self.training`` as a
    constant, so a graph captured from a model in train mode keeps dropout,
    stochastic depth and batch-statistics normalisation on for ever. These are
    the dropout-like calls (``F.dropout``, ``torch.dropout``, ``aten.dropout``,
    torchvision's ``stochastic_depth``, ...) with a true training flag and a
    non-zero ``p``, and batch-norm calls (``F.batch_norm``, the aten batch-norm
    ops of an exported graph) with a true training flag. ``nn.Dropout`` and
    ``nn.BatchNorm2d`` modules kept as leaves are not listed: they follow the
    module's mode when the graph runs.

    Example:
        >>> class Net(nn.Module):
        ...     def forward(self, x):
        ...         return torch.nn.functional.dropout(x, 0.1, self.training)
        >>> [n.name for n in training_mode_nodes(torch.fx.symbolic_trace(Net().train()))]
        ['dropout']
        >>> training_mode_nodes(torch.fx.symbolic_trace(Net().eval()))
        []
    """
    found = []
    for node in gm.graph.nodes:
        name = _target_name(node.target)
        if node.op != "call_function" or not any(s in name for s in _TRAINING_FUNCTIONS):
            continue
        try:
            normalized = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
        except Exception:  # a signature torch cannot bind: judge by what was passed
            normalized = None
        kwargs = normalized.kwargs if normalized is not None else node.kwargs
        training = kwargs.get("training", kwargs.get("train"))
        if training is True and ("batch_norm" in name or kwargs.get("p", 0.5) != 0):
            found.append(node)
    return found


def _target_name(target: Any) -> str:
    return str(getattr(target, "__name__", None) or target).lower()


def copy_graph(gm: torch.fx.GraphModule, memo: dict[int, Any] | None = None) -> torch.fx.GraphModule:
    """``copy.deepcopy(gm, memo)``, keeping its :class:`CapturedInputs` check (a copied GraphModule loses its
    forward hooks).

    Example:
        >>> gm = export_capture(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
        >>> any(isinstance(h, CapturedInputs) for h in copy_graph(gm)._forward_pre_hooks.values())
        True
    """
    import copy

    new = copy.deepcopy(gm, memo)
    CapturedInputs.carry(gm, new)
    return new
