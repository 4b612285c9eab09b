"""Graph passes that add, remove and substitute chains of ``call_module`` nodes at a site.

* :func:`insert_parallel_chain` runs a chain of modules on a node's input beside
  the node and merges both results with one more module whose output replaces
  the node's everywhere (a "tap" that can pass the original through);
* :func:`remove_parallel_chain` undoes it;
* :func:`replace_sites_with_chains` replaces every call of a layer by a chain of
  modules installed at the layer's own name (``fc`` -> ``fc.0``, ``fc.1``, ...),
  for factorizations whose layers are not the two of :func:`passes.factorize_sites`.

They know nothing of decomposition policy; callers own the modules.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.fx
from torch import nn

from passes.capture import copy_graph
from passes.rewrite import FACTORED, FactoredLayer, _drop_unused_attrs, _install, _remove_orphans
from passes.sites import Site, site_input

_COPIED_META = ("stack_trace", "nn_module_stack", "source_fn_stack")


def insert_parallel_chain(gm: torch.fx.GraphModule, node: torch.fx.Node, chain: Sequence[str], merge: str,
                          role: str = "parallel") -> torch.fx.Node:
    """Add ``merge(node, chain[-1](...chain[0](x)))`` after ``node``; route ``node``'s users to it.

    ``x`` is the node's input (:func:`passes.sites.site_input`). Every new node
    gets ``meta["chain_role"] = role``. The graph is modified in place; call
    ``gm.recompile()`` after the last insertion.

    Example:
        >>> class Keep(nn.Module):
        ...     def forward(self, original, other):
        ...         return original
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
        >>> gm.add_submodule("side", nn.Linear(4, 4)); gm.add_submodule("keep", Keep())
        True
        True
        >>> fc = next(n for n in gm.graph.nodes if n.target == "0")
        >>> _ = insert_parallel_chain(gm, fc, ["side"], "keep"); _ = gm.recompile()
        >>> [n.target for n in gm.graph.nodes if n.op == "call_module"]
        ['0', 'side', 'keep', '1']
    """
    graph = gm.graph
    created: list[torch.fx.Node] = []
    anchor, out = node, site_input(node)
    for path in chain:
        with graph.inserting_after(anchor):
            out = anchor = graph.call_module(path, (out,))
        created.append(out)
    with graph.inserting_after(anchor):
        merged = graph.call_module(merge, (node, out))
    created.append(merged)
    node.replace_all_uses_with(merged, delete_user_cb=lambda user: user is not merged)
    for n in created:
        n.meta["chain_role"] = role
        for key in _COPIED_META:
            if key in node.meta:
                n.meta[key] = node.meta[key]
    return merged


def remove_parallel_chain(gm: torch.fx.GraphModule, merged: torch.fx.Node) -> torch.fx.Node:
    """Undo :func:`insert_parallel_chain`: users of ``merged`` get the original node back.

    Chain nodes left without users are erased; the original node is returned.
    """
    original = merged.args[0]
    merged.replace_all_uses_with(original)
    inputs = [n for n in merged.all_input_nodes if n is not original]
    gm.graph.erase_node(merged)
    for n in inputs:
        _erase_chain(gm.graph, n)
    return original


def _erase_chain(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    while node.op == "call_module" and not node.users and node.meta.get("chain_role"):
        parent = node.args[0]
        graph.erase_node(node)
        if not isinstance(parent, torch.fx.Node):
            return
        node = parent


def replace_sites_with_chains(gm: torch.fx.GraphModule, sites: Sequence[Site],
                              chains: Mapping[str, nn.Sequential],
                              meta: Mapping[str, FactoredLayer] | None = None) -> torch.fx.GraphModule:
    """Return a copy of ``gm`` in which each site whose ``target`` is in ``chains`` calls that chain.

    The ``nn.Sequential`` is installed at the layer's name (replacing the layer's
    module when it holds nothing else), each call of the layer becomes calls of
    its children in order, and the layer's weight/bias attributes are dropped.
    ``meta[target]``, the layer's record, goes into the last node's ``meta[FACTORED]`` (``passes.rewrite``).

    Example:
        >>> from passes.sites import find_sites
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(4, 6, 3)))
        >>> sites, _ = find_sites(gm)
        >>> chain = nn.Sequential(nn.Conv2d(4, 2, 1, bias=False), nn.Conv2d(2, 6, 3))
        >>> new = replace_sites_with_chains(gm, sites, {"0": chain})
        >>> [n.target for n in new.graph.nodes if n.op == "call_module"]
        ['0.0', '0.1']
    """
    unknown = set(chains) - {s.target for s in sites}
    if unknown:
        raise KeyError(f"chains name layers that are not sites of this graph: {sorted(unknown)}")
    new = copy_graph(gm)
    nodes = {n.name: n for n in new.graph.nodes}
    dropped: set[str] = set()
    installed: dict[str, str] = {}
    for site in sites:
        if site.target not in chains:
            continue
        if site.target not in installed:
            installed[site.target] = _install(new, site, chains[site.target])
            dropped |= {site.weight} | ({site.bias} if site.bias else set())
        path = installed[site.target]
        _rewrite(new.graph, nodes[site.node], path, len(chains[site.target]), (meta or {}).get(site.target))
    _drop_unused_attrs(new, dropped)
    new.graph.lint()
    new.recompile()
    return new


def _rewrite(graph: torch.fx.Graph, node: torch.fx.Node, path: str, length: int, info: FactoredLayer | None) -> None:
    x = site_input(node)
    out = x
    with graph.inserting_before(node):
        for i in range(length):
            out = graph.call_module(f"{path}.{i}", (out,))
            for key in _COPIED_META:
                if key in node.meta:
                    out.meta[key] = node.meta[key]
    if info is not None:
        out.meta[FACTORED] = info
    node.replace_all_uses_with(out)
    inputs = list(node.all_input_nodes)
    graph.erase_node(node)
    _remove_orphans(graph, [n for n in inputs if n is not x])
