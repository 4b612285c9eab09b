"""An FX graph as a networkx ``DiGraph``, with each node's module scope.

Graph viewers, reports and analyses want plain data, not ``torch.fx.Node``
objects. :func:`to_networkx` gives one networkx node per FX node (keyed by the
FX node's unique name) and one edge per data dependency, in graph order, with
these node attributes:

* ``op`` (``placeholder``, ``call_module``, ``call_function``, ...), ``target``
  (a readable string) and ``index`` (position in the FX graph);
* ``module_type``: the class name of a ``call_module`` node's module;
* ``shape``: the output shape when a pass recorded one (``tensor_meta``,
  ``val`` or a cost pass's ``cost``), else ``None``;
* ``scope``: the chain of enclosing *blocks*, outermost first, as qualified
  module names (``("layer1.0",)``, ``("blocks.3", "blocks.3.attn")``);
* ``module``: the innermost module whose code created the node (for an
  ``aten.conv2d`` of an export graph, the ``Conv2d``'s name), or ``None``.

A block is a module of the model's own code (torchvision's ``BasicBlock``,
timm's ``Block``, a Hugging Face ``BertLayer``), read from
``node.meta["nn_module_stack"]``, which both symbolic tracing and
``torch.export`` record. Modules defined by ``torch.nn`` itself are not blocks:
containers (``Sequential``, ``ModuleList``) only group blocks, and layers
(``Conv2d``, ``Linear``) are the nodes themselves. Nodes without a recorded
stack fall back to their dotted module path, cut after each numeric component
(``layer1.0.conv1`` -> ``("layer1.0",)``), and operations to the blocks all
their inputs share.

Example:
    >>> import torch
    >>> block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    >>> g = to_networkx(torch.fx.symbolic_trace(torch.nn.Sequential(block, torch.nn.Linear(4, 2))))
    >>> list(g.nodes)
    ['input_1', '_0_0', '_0_1', '_1', 'output']
    >>> g.nodes["_0_0"]["op"], g.nodes["_0_0"]["target"], g.nodes["_0_0"]["module_type"]
    ('call_module', '0.0', 'Linear')
    >>> sorted(g.successors("input_1"))
    ['_0_0']
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import torch
import torch.fx

# Module classes from these packages are layers or containers, not blocks.
_NOT_BLOCKS = ("torch.nn.modules.", "torch.ao.nn.")
# The stack entry torch.export gives nodes it made itself (sizes, guards).
_EXPORT_MARKER = "_empty_nn_module_stack"


def to_networkx(gm: torch.fx.GraphModule, *, max_depth: int = 2, min_block_nodes: int = 3) -> nx.DiGraph:
    """Return ``gm``'s graph as a ``DiGraph`` (see the module docstring for the attributes).

    ``max_depth`` bounds how many nested blocks a node's ``scope`` holds (the
    outermost ones are kept); blocks with fewer than ``min_block_nodes`` nodes
    (parameter reads not counted) are not worth a box and are left out of
    ``scope``. The graph attribute ``scopes`` maps every block name that
    remains to its class name (``"BasicBlock"``, or ``""`` when unknown).

    Example:
        >>> import torch
        >>> g = to_networkx(torch.fx.symbolic_trace(torch.nn.Linear(3, 2)))  # x, weight, bias, linear, output
        >>> g.number_of_nodes(), g.number_of_edges()
        (5, 4)
    """
    graph = nx.DiGraph()
    scopes: dict[str, str] = {}
    for index, node in enumerate(gm.graph.nodes):
        scope, kinds = node_scope(node, max_depth=max_depth)
        if not scope and not node.meta.get("nn_module_stack") and node.op in ("call_function", "call_method"):
            scope = _shared_scope([graph.nodes[a.name]["scope"] for a in node.all_input_nodes])
        scopes.update(kinds)
        graph.add_node(node.name, op=node.op, target=_target_name(node), index=index,
                       module_type=_module_type(gm, node), shape=_shape(node), scope=scope,
                       module=_innermost_module(node))
    for node in gm.graph.nodes:
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    small = _small_blocks(graph, min_block_nodes)
    for _, attrs in graph.nodes(data=True):
        attrs["scope"] = tuple(s for s in attrs["scope"] if s not in small)
    graph.graph["scopes"] = {s: kind for s, kind in scopes.items() if s not in small}
    return graph


def _shared_scope(chains: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The blocks all ``chains`` share: an op without a recorded stack is placed among its inputs."""
    if not chains:
        return ()
    shared = chains[0]
    for chain in chains[1:]:
        n = 0
        while n < min(len(shared), len(chain)) and shared[n] == chain[n]:
            n += 1
        shared = shared[:n]
    return shared


def _small_blocks(graph: nx.DiGraph, min_nodes: int) -> set[str]:
    counts: dict[str, int] = {}
    for _, attrs in graph.nodes(data=True):
        if attrs["op"] != "get_attr":
            for s in attrs["scope"]:
                counts[s] = counts.get(s, 0) + 1
    return {s for s, n in counts.items() if n < min_nodes} | {
        s for _, a in graph.nodes(data=True) for s in a["scope"] if s not in counts}


def node_scope(node: torch.fx.Node, *, max_depth: int = 2) -> tuple[tuple[str, ...], dict[str, str]]:
    """The enclosing blocks of ``node`` (outermost first) and ``{block: class name}``.

    Example:
        >>> import torch
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = torch.nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return self.fc(x).relu()
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(Block(), Block()))
        >>> [(n.name, node_scope(n)[0]) for n in gm.graph.nodes]  # doctest: +NORMALIZE_WHITESPACE
        [('input_1', ()), ('_0_fc', ('0',)), ('relu', ('0',)), ('_1_fc', ('1',)), ('relu_1', ('1',)), ('output', ())]
        >>> node_scope(next(iter(gm.graph.find_nodes(op="call_module"))))[1]
        {'0': 'Block'}
    """
    stack = node.meta.get("nn_module_stack")
    if stack:
        # torch.export marks nodes it created itself with a placeholder stack entry; it is no block.
        blocks = [(path, _class_name(kind)) for path, kind in stack.values()
                  if path and not path.startswith(_EXPORT_MARKER) and _is_block(kind)]
        # A call_module node is its own module, never its own block.
        blocks = [(p, k) for p, k in blocks if not (node.op == "call_module" and p == node.target)]
        blocks = blocks[:max_depth]
        return tuple(p for p, _ in blocks), dict(blocks)
    path = _module_path(node)
    if path is None:
        return (), {}
    parts = path.split(".")
    # Without types, a numeric component marks the end of a block (layer1.0, blocks.3, encoder.layer.11).
    cuts = [".".join(parts[: i + 1]) for i, part in enumerate(parts[:-1]) if part.isdigit()]
    cuts = cuts[:max_depth]
    return tuple(cuts), {c: "" for c in cuts}


def _innermost_module(node: torch.fx.Node) -> str | None:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    paths = [path for path, _ in (stack or {}).values() if path and not path.startswith(_EXPORT_MARKER)]
    return paths[-1] if paths else None


def _module_path(node: torch.fx.Node) -> str | None:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0] or None
    return None


def _is_block(kind: Any) -> bool:
    """Not a torch.nn layer or container, nor a subclass of a torch.nn layer (timm's ``LayerNorm``)."""
    if _qualified(kind).startswith(_NOT_BLOCKS):
        return False
    if isinstance(kind, type):  # export graphs hold only the class name; symbolic ones the class
        generic = (torch.nn.Module, torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
        return not any(_qualified(base).startswith(_NOT_BLOCKS) and base not in generic for base in kind.__mro__)
    return True


def _qualified(kind: Any) -> str:
    """``torch.nn.modules.conv.Conv2d`` whether the stack holds the class (symbolic) or its name (export)."""
    if isinstance(kind, type):
        return f"{kind.__module__}.{kind.__qualname__}"
    return str(kind)


def _class_name(kind: Any) -> str:
    return _qualified(kind).rpartition(".")[2]


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # aten.conv2d.default
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or str(target)
    return name if module in ("", "_operator", "builtins") else f"{module.rpartition('.')[2] or module}.{name}"


def _module_type(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    if node.op != "call_module":
        return None
    try:
        return type(gm.get_submodule(node.target)).__name__
    except AttributeError:
        return None


def _shape(node: torch.fx.Node) -> tuple[int | str, ...] | None:
    """The output shape a shape/cost pass or torch.export recorded, if any.

    Dynamic dimensions of export graphs are kept as their symbol names (``"s0"``).
    """
    meta = node.meta
    for value in (meta.get("tensor_meta"), meta.get("val"), getattr(meta.get("cost"), "shape", None)):
        # A cost pass stores a plain tuple; tensor_meta is a NamedTuple whose shape is a field.
        shape = value if isinstance(value, torch.Size) or type(value) is tuple else getattr(value, "shape", None)
        if isinstance(shape, tuple) and all(isinstance(d, (int, torch.SymInt)) for d in shape):
            return tuple(d if isinstance(d, int) else str(d) for d in shape)
    return None
