"""Split a graph into consecutive blocks of sites, and run it one block at a time.

Block-sequential calibration (GPTQ-style pipelines, SVD-LLM) processes a model
one transformer layer (or ResNet block) at a time: the calibration batches'
values at a *boundary* (what the rest of the graph reads of what came before)
are cached, the next block runs on them, and only that block's statistics
exist at once. Memory then grows with the largest block, not with depth.

:func:`find_blocks` cuts the graph's node order into segments, one per block
of sites. A site's block is read from its qualified module name, cut after
the first numeric component (``model.layers.3.self_attn.q_proj`` ->
``model.layers.3``, ``layer2.0.downsample.0`` -> ``layer2.0``, ``blocks.7``);
a site without one (``lm_head``, a stem ``conv1``) is its own block; or the
caller names the block scopes. A layer called from two blocks merges every
block between its calls (its statistics must see all its calls).

:class:`BlockRun` runs one block's segment on a batch's boundary values and
returns the next boundary: only values read after the segment survive, so a
boundary holds what a plain forward pass would hold at that point (on a
transformer: the residual stream). A caller can observe the nodes as they run
(statistics) and override node outputs (a factored layer's output).

Example:
    >>> import torch
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = torch.nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return x + self.fc(x).relu()
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(Block(), Block(), torch.nn.Linear(4, 2)))
    >>> from passes.sites import find_sites
    >>> sites, _ = find_sites(gm)
    >>> [(b.name, b.sites) for b in find_blocks(gm, sites)]
    [('0', ('0.fc',)), ('1', ('1.fc',)), ('2', ('2',))]
    >>> run = BlockRun(gm, find_blocks(gm, sites))
    >>> x = torch.randn(3, 4)
    >>> env = run.start([x])
    >>> for index in range(len(run.blocks)):
    ...     env = run.run_block(index, env)
    >>> torch.allclose(run.graph_output(env), gm(x))
    True
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx

from passes.replay import GraphWalk, Override
from passes.sites import Site, has_side_effects

# (node, its value, the values it read) -> None: called for every node a block runs, after it ran (e.g. to
# accumulate statistics)
Observer = Callable[[torch.fx.Node, Any, Mapping[torch.fx.Node, Any]], None]


@dataclasses.dataclass(frozen=True)
class Block:
    """A segment of the graph's node order holding some sites.

    ``start``/``end`` are positions in ``gm.graph.nodes`` (inclusive); segments
    of consecutive blocks tile the graph from its first node to its output.
    """

    name: str  # the block's scope (``model.layers.3``) or, for a site of its own, the site's name
    start: int
    end: int
    sites: tuple[str, ...]  # site targets, in graph order


def block_scope(target: str, scopes: Sequence[str] | None = None) -> str:
    """The block a site belongs to: the longest of ``scopes`` containing it, else its name cut after the first
    numeric component, else the site itself.

    Example:
        >>> block_scope("model.layers.3.self_attn.q_proj"), block_scope("layer2.0.downsample.0"), block_scope("fc")
        ('model.layers.3', 'layer2.0', 'fc')
        >>> block_scope("encoder.layer.1.attention.self.query", scopes=["encoder"])
        'encoder'
    """
    if scopes is not None:
        inside = [s for s in scopes if _holds(s, target)]
        return max(inside, key=len) if inside else target
    parts = target.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return target


def _holds(scope: str, target: str) -> bool:
    """Whether the module ``scope`` holds the layer ``target`` (or is it)."""
    return target == scope or target.startswith(scope + ".")


def unmatched_scopes(sites: Iterable[Site], scopes: Sequence[str]) -> dict[str, list[str]]:
    """Each of ``scopes`` that holds no site, with up to three scopes that do hold one, closest first.

    The candidates are every module path above a site (``model``, ``model.layers``, ``model.layers.1``, ...):
    a misspelt scope is otherwise silently no block at all, and its layers become blocks of their own.

    Example:
        >>> from passes.sites import Site
        >>> sites = [Site(f"n{i}", "linear", f"model.layers.{i}.up", "w", None, (4, 4)) for i in range(2)]
        >>> unmatched_scopes(sites, ["model.layers.0", "model.layer.1"])
        {'model.layer.1': ['model.layers.1', 'model.layers.0', 'model.layers']}
    """
    targets = [s.target for s in sites]
    held = dict.fromkeys(".".join(t.split(".")[: i + 1]) for t in targets for i in range(t.count(".") + 1))
    return {scope: difflib.get_close_matches(scope, list(held), n=3)
            for scope in dict.fromkeys(scopes) if not any(_holds(scope, t) for t in targets)}


def check_scopes(sites: Sequence[Site], scopes: Sequence[str]) -> None:
    """Raise ValueError naming every one of ``scopes`` that holds no site (see :func:`unmatched_scopes`), or
    saying that none was given."""
    example = block_scope(sites[0].target) if sites else "model.layers.0"
    if not scopes:
        raise ValueError(f"blocks: no block scope was given; give qualified module names such as {example!r}, or "
                         "None for automatic blocks")
    missing = unmatched_scopes(sites, scopes)
    if missing:
        named = "; ".join(f"no layer is inside {scope!r}" + (f" (closest: {', '.join(map(repr, close))})"
                                                             if close else "") for scope, close in missing.items())
        raise ValueError(f"blocks: {named}; give qualified module names that hold decomposable layers, such as "
                         f"{example!r}")


def _node_scopes(node: torch.fx.Node) -> list[str]:
    """Every module path in the node's recorded module stack (``call_module`` nodes: their target too)."""
    paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values() if isinstance(path, str)]
    if node.op == "call_module":
        paths.append(str(node.target))
    return paths


def find_blocks(gm: torch.fx.GraphModule, sites: Iterable[Site], scopes: Sequence[str] | None = None) -> list[Block]:
    """Cut ``gm``'s nodes into consecutive blocks of ``sites`` (see the module docstring).

    A block's segment ends at the last node its scope recorded (its residual
    add, its last norm), before the next block's first site; the last block's
    segment runs to the output. ``scopes`` (qualified module names, e.g. the
    transformer layers) override the automatic blocks; a site in none of them
    is a block of its own; a scope that holds no site is refused (ValueError,
    :func:`check_scopes`).
    """
    nodes = list(gm.graph.nodes)
    position = {n.name: i for i, n in enumerate(nodes)}
    sites = sorted(sites, key=lambda s: position[s.node])
    if scopes is not None:
        check_scopes(sites, scopes)
    if not sites:
        return []
    runs: list[tuple[str, list[Site]]] = []
    for site in sites:
        key = block_scope(site.target, scopes)
        if runs and runs[-1][0] == key:
            runs[-1][1].append(site)
        else:
            runs.append((key, [site]))
    runs = _merge_shared_layers(runs)
    owner: dict[str, int] = {}  # the last position of any node recorded in each scope
    for i, node in enumerate(nodes):
        for path in _node_scopes(node):
            for key, _ in runs:
                if path == key or path.startswith(key + "."):
                    owner[key] = i
    blocks: list[Block] = []
    start = 0
    for index, (key, members) in enumerate(runs):
        last_site = max(position[s.node] for s in members)
        if index + 1 == len(runs):
            end = len(nodes) - 1
        else:
            next_first = min(position[s.node] for s in runs[index + 1][1])
            end = min(max(owner.get(key, last_site), last_site), next_first - 1)
        blocks.append(Block(key, start, end, tuple(dict.fromkeys(s.target for s in members))))
        start = end + 1
    return blocks


def _merge_shared_layers(runs: list[tuple[str, list[Site]]]) -> list[tuple[str, list[Site]]]:
    """Merge the runs between two calls of one layer (its statistics must see every call), and runs of one scope
    separated by others (a scope's segment must be contiguous)."""
    merged = True
    while merged:
        merged = False
        first: dict[str, int] = {}
        for index, (key, members) in enumerate(runs):
            names = [s.target for s in members] + [key]
            seen = [first[n] for n in names if n in first and first[n] < index]
            if seen:
                lo = min(seen)
                name = runs[lo][0]
                runs = runs[:lo] + [(name, [s for _, m in runs[lo: index + 1] for s in m])] + runs[index + 1:]
                merged = True
                break
            for n in names:
                first.setdefault(n, index)
    return runs


class BlockRun(GraphWalk):
    """Run ``gm`` one block's segment at a time on boundary values (see the module docstring).

    A boundary is a ``{node: value}`` dict: the values computed before the
    segment that it or a later one reads. :meth:`start` makes the first one from
    the placeholder values; :meth:`run_block` never changes the dict it is given
    (an in-place operation in the segment works on a copy of a boundary value),
    so the same boundary can be run twice (statistics, then the factored block).
    """

    def __init__(self, gm: torch.fx.GraphModule, blocks: Sequence[Block]) -> None:
        super().__init__(gm, [])
        self.blocks = list(blocks)
        self.placeholders = [n for n in self.order if n.op == "placeholder"]

    def start(self, flat_inputs: Sequence[Any]) -> dict[torch.fx.Node, Any]:
        """The boundary before the first block: the graph's inputs (``passes.inputs.flatten_inputs``)."""
        if len(flat_inputs) != len(self.placeholders):
            raise ValueError(f"the graph has {len(self.placeholders)} inputs, got {len(flat_inputs)} values")
        env = dict(zip(self.placeholders, flat_inputs))
        return {n: v for n, v in env.items() if self.last_use[n] > self.position[n]}

    def run_block(self, index: int, boundary: Mapping[torch.fx.Node, Any], *,
                  overrides: Mapping[str, Override] | None = None, observe: Observer | None = None
                  ) -> dict[torch.fx.Node, Any]:
        """Run block ``index``'s segment on ``boundary``; return the next boundary (the output after the last).

        ``overrides`` replace node outputs (node name -> function of the value
        computed); ``observe(node, value, env)`` sees every node's value as
        computed (before its override), with ``env`` holding the values the
        node read.
        """
        block = self.blocks[index]
        env = dict(boundary)
        for node in self.order[block.start: block.end + 1]:
            if node.op == "placeholder":
                continue  # given by start()
            if has_side_effects(node):  # an in-place op must not change the caller's boundary: it works on a copy
                for used in node.all_input_nodes:
                    if used in boundary and env.get(used) is boundary[used] and isinstance(env[used], torch.Tensor):
                        env[used] = env[used].clone()
            self.env = env
            try:
                value = self.run_node(node)
            finally:
                self.env = {}
            env[node] = value
            if observe is not None:
                observe(node, value, env)
            if overrides and node.name in overrides:
                env[node] = overrides[node.name](value)
            for used in node.all_input_nodes:  # drop what no later node reads
                if self.last_use[used] <= self.position[node] and used in env:
                    del env[used]
            if not node.users and node.op != "output":
                del env[node]  # read by nothing (its observer has seen it)
        return env

    def graph_output(self, boundary: Mapping[torch.fx.Node, Any]) -> Any:
        """The graph's output, from the boundary after the last block."""
        out = next(n for n in reversed(self.order) if n.op == "output")
        return self.module.graph._codegen.process_outputs(boundary[out])


def values_in(boundary: Mapping[torch.fx.Node, Any]) -> int:
    """Bytes held by the tensors of a boundary."""
    return sum(v.numel() * v.element_size() for v in boundary.values() if isinstance(v, torch.Tensor))
