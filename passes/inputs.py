"""Bind a call's ``(args, kwargs)`` to a GraphModule's placeholders.

``torch.fx.Interpreter.run`` takes the placeholders' values positionally, while
users call models with keyword arguments (``input_ids=..., attention_mask=...``)
and ``torch.export`` graphs flatten their inputs with a pytree spec. This module
turns any call into the flat positional list an Interpreter expects.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
import torch.fx
import torch.utils._pytree as pytree


def flatten_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
    """Return the values of ``gm``'s placeholders for the call ``gm(*args, **kwargs)``.

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(3, 2))
        >>> [t.shape for t in flatten_inputs(gm, (), {"input": torch.ones(1, 3)})]
        [torch.Size([1, 3])]
    """
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is not None:  # torch.export flavour: inputs are a pytree of (args, kwargs)
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != in_spec:
            raise TypeError(
                f"inputs do not match the structure the graph was exported with: expected {_call_shape(in_spec)}, "
                f"got {_call_shape(spec)}"
            )
        return leaves
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    except TypeError as exc:
        names = [p.target for p in placeholders]
        raise TypeError(f"inputs do not match the graph's inputs {names}: {exc}") from exc
    bound.apply_defaults()
    flat: list[Any] = []
    for node in placeholders:
        name = node.target.lstrip("*")
        value = bound.arguments.get(name, node.args[0] if node.args else None)
        if node.target.startswith("**"):
            raise TypeError("graphs with **kwargs placeholders are not supported")
        if node.target.startswith("*"):
            flat.extend(value)
        else:
            flat.append(value)
    return flat


def fresh_inputs(flat: Sequence[Any]) -> list[Any]:
    """Copies of a graph's tensor input values, for one run of the graph.

    A forward may change an input in place (``x.sub_(mean)``, ``nn.ReLU(inplace=True)`` on the input): run
    on the values themselves, it changes them for every later run on the same batch (the caller's batch, the
    kept metric batches), which then computes on other data.

    Example:
        >>> x = torch.ones(2)
        >>> copy, flag = fresh_inputs([x, None])
        >>> copy.mul_(3), x, flag
        (tensor([3., 3.]), tensor([1., 1.]), None)
    """
    return [v.detach().clone() if isinstance(v, torch.Tensor) else v for v in flat]


def unflatten_inputs(gm: torch.fx.GraphModule, flat: list[Any]) -> tuple[tuple, dict[str, Any]]:
    """The call ``(args, kwargs)`` whose :func:`flatten_inputs` is ``flat``: how to call ``gm`` itself (not an
    Interpreter) on placeholder values, e.g. to time it.

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(3, 2))
        >>> args, kwargs = unflatten_inputs(gm, [torch.ones(1, 3)])
        >>> gm(*args, **kwargs).shape
        torch.Size([1, 2])
    """
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is not None:
        args, kwargs = pytree.tree_unflatten(list(flat), in_spec)
        return tuple(args), dict(kwargs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any(n.target.startswith("*") for n in placeholders):
        raise TypeError("graphs with *args/**kwargs placeholders cannot be called from their flat inputs")
    if len(flat) != len(placeholders):
        raise TypeError(f"{len(flat)} values for the graph's {len(placeholders)} inputs")
    return tuple(flat), {}


def _call_shape(spec: pytree.TreeSpec) -> str:
    """``2 positional inputs and keywords ['mask']`` for an ``(args, kwargs)`` spec: readable, unlike the
    TreeSpec repr (the raw spec is appended when the positional inputs are themselves nested)."""
    try:
        positional, keywords = spec.child(0), spec.child(1)
        text = f"{positional.num_children} positional input(s) and keywords {list(keywords.context)}"
        nested = any(positional.child(i).num_children for i in range(positional.num_children))
        return f"{text} ({spec})" if nested else text
    except Exception:  # another pytree layout: fall back to the raw spec
        return str(spec)
