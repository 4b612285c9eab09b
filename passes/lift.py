"""Turn parameters that a graph receives as inputs into constants of the graph.

Dynamo (``torch.compile``) hands a backend a GraphModule whose module
parameters are graph inputs: a placeholder such as
``L_self_modules_fc_parameters_weight_`` per parameter, with the ``Parameter``
itself among the example inputs. Analysis passes that look for layers with a
*constant* weight (:mod:`passes.sites`) see nothing in such a graph.
:func:`lift_parameters` binds each parameter placeholder to an attribute of a
new GraphModule (a ``get_attr`` node), named after the parameter's place in the
original model (``fc.weight``, ``blocks.0.mlp.fc1.weight``), so the lifted graph
looks like a symbolically traced or exported one. The values are frozen: the
lifted graph shares the parameters' storage and never sees later
reassignments.

Only ``nn.Parameter`` inputs are lifted. Buffers, plain tensors read from
globals, sizes (``SymInt``) and the real inputs stay placeholders, because
they may legitimately change between calls.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Sequence

import torch
import torch.fx
from torch import nn

# "L['self']._modules['fc']._parameters['weight']" -> ["fc", "weight"]
_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]")
# "L_self_modules_fc_parameters_weight_" -> ["fc", "weight"] (when the node carries no Dynamo source)
_TARGET_PART = re.compile(r"_(?:modules|parameters|buffers)_(.+?)(?=_(?:modules|parameters|buffers)_|_$)")


def parameter_name(node: torch.fx.Node) -> str | None:
    """The dotted name a Dynamo parameter placeholder had in the original model, if it can be told.

    Example:
        >>> graph = torch.fx.Graph()
        >>> node = graph.placeholder("L_self_modules_blocks_modules_0_parameters_weight_")
        >>> parameter_name(node)
        'blocks.0.weight'
    """
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is not None:
        text = source.name() if callable(source.name) else source.name
        parts = _SOURCE_PART.findall(str(text))
        if parts:
            return ".".join(parts)
    parts = _TARGET_PART.findall(str(node.target))
    return ".".join(parts) if parts else None


def _free(root: nn.Module, qualname: str) -> bool:
    """True when ``qualname`` can be created in ``root``: every prefix is absent or a plain holder module."""
    obj: Any = root
    parts = qualname.split(".")
    for part in parts[:-1]:
        if not part.isidentifier() and not part.isdigit():
            return False
        obj = getattr(obj, part, None)
        if obj is None:
            return True
        if not isinstance(obj, nn.Module):
            return False
    return parts[-1].isidentifier() and not hasattr(obj, parts[-1])


def _register(root: nn.Module, qualname: str, value: torch.Tensor) -> None:
    owner = root
    *prefix, name = qualname.split(".")
    for part in prefix:
        if getattr(owner, part, None) is None:
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    # Frozen for inference: same storage as the model's parameter, no gradient.
    owner.register_parameter(name, nn.Parameter(value.detach(), requires_grad=False))


def _attribute_name(root: nn.Module, node: torch.fx.Node) -> str:
    """A readable, unused attribute path for the parameter behind ``node``."""
    name = parameter_name(node)
    if name and _free(root, name):
        return name
    base = re.sub(r"\W", "_", str(node.target)).strip("_") or "param"
    candidate, i = f"lifted_{base}", 0
    while not _free(root, candidate):
        i += 1
        candidate = f"lifted_{base}_{i}"
    return candidate


def lift_parameters(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
) -> tuple[torch.fx.GraphModule, list[int]]:
    """Return a copy of ``gm`` with its ``nn.Parameter`` inputs as ``get_attr`` constants, and the kept inputs.

    ``example_inputs`` are the values of ``gm``'s placeholders, in order (what
    Dynamo passes to a backend). The second result lists the positions of the
    placeholders that remain inputs: call the lifted graph with
    ``[args[i] for i in kept]``. ``gm`` is not modified.

    Example:
        >>> gm = torch.fx.symbolic_trace(lambda x, w: torch.nn.functional.linear(x, w))
        >>> lifted, kept = lift_parameters(gm, [torch.randn(2, 3), nn.Parameter(torch.randn(4, 3))])
        >>> kept, [n.op for n in lifted.graph.nodes]
        ([0], ['placeholder', 'get_attr', 'call_function', 'output'])
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ValueError(f"the graph has {len(placeholders)} inputs but {len(example_inputs)} example inputs were "
                         "given; pass one value per placeholder, in order")
    if any(str(n.target).startswith("*") for n in placeholders):
        raise ValueError("graphs with *args/**kwargs placeholders cannot be lifted; pass one placeholder per input")
    graph = copy.deepcopy(gm.graph)
    # GraphModule(root=gm, ...) copies the submodules and attributes the graph already reads.
    lifted = torch.fx.GraphModule(gm, graph, type(gm).__name__)
    lifted.meta.update(gm.meta)
    kept: list[int] = []
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    for index, (node, value) in enumerate(zip([n for n in graph.nodes if n.op == "placeholder"], example_inputs)):
        if not isinstance(value, nn.Parameter):
            kept.append(index)
            continue
        qualname = _attribute_name(lifted, node)
        _register(lifted, qualname, value)
        with graph.inserting_before(first_op):
            constant = graph.get_attr(qualname)
        constant.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "example_value")})
        node.replace_all_uses_with(constant)
        graph.erase_node(node)
    graph.lint()
    lifted.recompile()
    return lifted, kept
