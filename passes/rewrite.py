"""The factorizing rewrite: each planned site becomes two smaller layers.

This is where a Linear becomes two Linears::

    y = linear(x, W, b)   ->   y = linear(linear(x, A), B, b)        A: (r, in), B: (out, r)

and a Conv2d (any kernel, stride, padding, dilation; groups=1) becomes a conv of
the same geometry to ``r`` channels followed by a 1x1 conv carrying the bias.

The two layers are installed as an ``nn.Sequential`` at the layer's own
qualified name, so ``blocks.3.mlp.fc1`` turns into ``blocks.3.mlp.fc1.0`` and
``blocks.3.mlp.fc1.1`` in the state_dict, and the graph calls them as two
``call_module`` nodes. The input GraphModule is never modified.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Callable, Mapping

import torch
import torch.fx
from torch import nn

from passes.capture import copy_graph
from passes.sites import Site, fetch_attr, site_input


# node.meta keys this pass writes: the record of a factored layer on its last node (a FactoredLayer), and the
# role of the first factor's node
FACTORED = "factored"
FACTOR_ROLE = "factor_role"


@dataclasses.dataclass(frozen=True)
class FactoredLayer:
    """The record of one layer on its last node (``node.meta[FACTORED]``).

    ``rank`` None records a layer a method considered and kept dense (lockd
    notes those); ``method_meta`` is what the method attached to its
    :class:`Factorization` (layer NSR, kept proportion, ...).

    Example:
        >>> FactoredLayer("fc", "linear", (8, 8), 2, 8, 72, 40).decomposed
        True
    """

    target: str
    kind: str
    weight_shape: tuple[int, ...]
    rank: int | None
    full_rank: int
    params_before: int
    params_after: int
    method_meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def decomposed(self) -> bool:
        return self.rank is not None


@dataclasses.dataclass
class Factorization:
    """Two factors replacing a site's weight: ``W ≈ second @ first``.

    ``first`` is ``(rank, in)`` for a Linear or ``(rank, in, kh, kw)`` for a
    Conv2d; ``second`` is ``(out, rank)`` (or ``(out, rank, 1, 1)``). ``bias``,
    when given, replaces the layer's bias on the second factor (a method may
    fold the mean of the discarded output directions into it); otherwise the
    layer's own bias is kept. ``meta`` becomes the ``method_meta`` of the layer's :class:`FactoredLayer`.
    """

    first: torch.Tensor
    second: torch.Tensor
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.first.shape[0]


def _check(site: Site, fact: Factorization) -> None:
    out, r = site.out_features, fact.rank
    first_ok = tuple(fact.first.shape) == (r, *site.weight_shape[1:]) if site.kind == "conv2d" else \
        tuple(fact.first.shape) == (r, site.in_features)
    second_ok = tuple(fact.second.shape) in ((out, r), (out, r, 1, 1)) if site.kind == "conv2d" else \
        tuple(fact.second.shape) == (out, r)
    if not (first_ok and second_ok) or r < 1:
        raise ValueError(
            f"factors for {site.target!r} have shapes {tuple(fact.first.shape)} and {tuple(fact.second.shape)}, "
            f"which do not fit its weight {site.weight_shape}"
        )


# How a layer of each kind splits into two, by factor order. "kxk-first" (the rewrite's order) keeps the
# layer's geometry on the first factor and a 1x1 second; lockd may train "1x1-first" convolutions instead.
FactorBuilder = Callable[[Site, int, bool, dict[str, Any]], tuple[nn.Module, nn.Module]]


def _linear_factors(site: Site, rank: int, bias: bool, like: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    return (nn.Linear(site.in_features, rank, bias=False, **like),
            nn.Linear(rank, site.out_features, bias=bias, **like))


def _conv_kxk_first(site: Site, rank: int, bias: bool, like: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    cin, kh, kw = site.weight_shape[1:]
    return (nn.Conv2d(cin, rank, (kh, kw), stride=site.stride, padding=site.padding, dilation=site.dilation,
                      bias=False, **like),
            nn.Conv2d(rank, site.out_features, 1, bias=bias, **like))


def _conv_1x1_first(site: Site, rank: int, bias: bool, like: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    cin, kh, kw = site.weight_shape[1:]
    return (nn.Conv2d(cin, rank, 1, bias=False, **like),
            nn.Conv2d(rank, site.out_features, (kh, kw), stride=site.stride, padding=site.padding,
                      dilation=site.dilation, bias=bias, **like))


FACTOR_BUILDERS: dict[tuple[str, str], FactorBuilder] = {
    ("linear", "kxk-first"): _linear_factors,
    ("linear", "1x1-first"): _linear_factors,  # a Linear has one order
    ("conv2d", "kxk-first"): _conv_kxk_first,
    ("conv2d", "1x1-first"): _conv_1x1_first,
}


def factor_layers(site: Site, rank: int, *, order: str = "kxk-first", bias: bool = True,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> nn.Sequential:
    """``Sequential(first, second)``: the empty two-layer form of ``site`` at ``rank``, the bias on the second.

    Example:
        >>> site = Site("c", "conv2d", "c", "c.weight", None, (16, 8, 3, 3), padding=1)
        >>> [tuple(m.weight.shape) for m in factor_layers(site, 4, order="1x1-first")]
        [(4, 8, 1, 1), (16, 4, 3, 3)]
    """
    try:
        build = FACTOR_BUILDERS[(site.kind, order)]
    except KeyError:
        raise ValueError(f"no factor order {order!r} for a {site.kind} layer; known: "
                         f"{sorted({o for k, o in FACTOR_BUILDERS if k == site.kind})}") from None
    return nn.Sequential(*build(site, rank, bias, {"dtype": dtype, "device": device}))


def factored_module(site: Site, fact: Factorization, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Sequential:
    """Build the two-layer replacement, holding ``fact``'s factors, with the original's dtype and device."""
    if fact.bias is not None:
        bias = fact.bias.reshape(site.out_features)
    # Built on the meta device and given uninitialised storage: every value is overwritten below, and nn.Linear's
    # and nn.Conv2d's random initialisation would draw from the caller's global RNG (transform changed what
    # torch.rand gave next) and spend time on large layers for values that are thrown away.
    module = factor_layers(site, fact.rank, bias=bias is not None, dtype=weight.dtype,
                           device="meta").to_empty(device=weight.device)
    first, second = module
    with torch.no_grad():
        first.weight.copy_(fact.first.reshape(first.weight.shape))
        second.weight.copy_(fact.second.reshape(second.weight.shape))
        if bias is not None:
            second.bias.copy_(bias)
    return module


def _install(gm: torch.fx.GraphModule, site: Site, module: nn.Module) -> str:
    """Put ``module`` at the layer's name; return the qualified name used.

    The layer's own module (``nn.Linear``, or the parameter holder of an export
    graph) is replaced when it holds nothing but this layer's weight and bias;
    otherwise the factors go beside it as ``<name>_lowrank``.
    """
    prefix, _, name = site.target.rpartition(".")
    parent = gm.get_submodule(prefix) if prefix else gm
    existing = getattr(parent, name, None)
    if isinstance(existing, nn.Module) and _holds_only_layer(existing, site):
        delattr(parent, name)
    elif existing is not None:
        name += "_lowrank"
    setattr(parent, name, module)
    return f"{prefix}.{name}" if prefix else name


def _holds_only_layer(module: nn.Module, site: Site) -> bool:
    tensors = [*module.named_parameters(), *module.named_buffers()]
    own = {f"{site.target}.{n}" for n, _ in tensors}
    return not any(True for _ in module.children()) and own <= {site.weight, site.bias}


def _remove_orphans(graph: torch.fx.Graph, nodes: list[Any]) -> None:
    """Erase weight/bias/transpose nodes the rewritten site no longer uses."""
    for node in nodes:
        if isinstance(node, torch.fx.Node) and node.graph is graph and not node.users:
            inputs = list(node.all_input_nodes)
            graph.erase_node(node)
            _remove_orphans(graph, inputs)


def _drop_unused_attrs(gm: torch.fx.GraphModule, names: set[str]) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for qualname in sorted(names - used):
        prefix, _, name = qualname.rpartition(".")
        try:
            owner = gm.get_submodule(prefix) if prefix else gm
        except AttributeError:
            continue  # the owner itself was replaced
        if hasattr(owner, name) and not isinstance(getattr(owner, name), nn.Module):
            delattr(owner, name)


def factorize_sites(
    gm: torch.fx.GraphModule, sites: list[Site], plan: Mapping[str, Factorization]
) -> torch.fx.GraphModule:
    """Return a copy of ``gm`` in which every site whose ``target`` is in ``plan`` is factored.

    Example:
        >>> from passes.sites import find_sites
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(6, 5)))
        >>> sites, _ = find_sites(gm)
        >>> new = factorize_sites(gm, sites, {"0": Factorization(torch.randn(2, 6), torch.randn(5, 2))})
        >>> [n.target for n in new.graph.nodes if n.op == "call_module"]
        ['0.0', '0.1']
    """
    unknown = set(plan) - {s.target for s in sites}
    if unknown:
        raise KeyError(f"plan names layers that are not sites of this graph: {sorted(unknown)}")
    by_target: dict[str, list[Site]] = defaultdict(list)
    for s in sites:
        if s.target in plan:
            _check(s, plan[s.target])
            by_target[s.target].append(s)

    # the copy skips the weights about to be replaced (an empty tensor of their dtype and device stands in): a
    # LLaMA-sized graph is not held twice over while it is rewritten
    memo: dict[int, Any] = {}
    for group in by_target.values():
        dense = fetch_attr(gm, group[0].weight)
        memo[id(dense)] = type(dense)(torch.empty(0, dtype=dense.dtype, device=dense.device), dense.requires_grad) \
            if isinstance(dense, nn.Parameter) else torch.empty(0, dtype=dense.dtype, device=dense.device)
    new = copy_graph(gm, memo)
    nodes = {n.name: n for n in new.graph.nodes}
    dropped: set[str] = set()
    for target, group in by_target.items():
        fact, site = plan[target], group[0]
        weight = fetch_attr(new, site.weight)
        bias = fetch_attr(new, site.bias) if site.bias else None
        module = factored_module(site, fact, weight.detach(), None if bias is None else bias.detach())
        # a frozen layer's factors stay frozen for a fine-tune after (a frozen weight with a trainable bias, as
        # BitFit trains: the second factor's bias stays trainable)
        module.requires_grad_(weight.requires_grad)
        if bias is not None and module[-1].bias is not None:
            module[-1].bias.requires_grad_(bias.requires_grad)
        path = _install(new, site, module)
        for s in group:
            _rewrite_node(new.graph, nodes[s.node], s, path, fact)
        dropped |= {site.weight} | ({site.bias} if site.bias else set())
    _drop_unused_attrs(new, dropped)
    new.graph.lint()
    new.recompile()
    return new


def _rewrite_node(graph: torch.fx.Graph, node: torch.fx.Node, site: Site, path: str, fact: Factorization) -> None:
    x = site_input(node)
    with graph.inserting_before(node):
        hidden = graph.call_module(f"{path}.0", (x,))
        out = graph.call_module(f"{path}.1", (hidden,))
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in node.meta:
            hidden.meta[key] = out.meta[key] = node.meta[key]
    out.meta[FACTORED] = FactoredLayer(
        site.target, site.kind, site.weight_shape, fact.rank, site.full_rank, site.dense_params,
        site.factor_params(fact.rank) + (site.out_features if site.bias or fact.bias is not None else 0),
        dict(fact.meta))
    hidden.meta[FACTOR_ROLE] = "first"
    node.replace_all_uses_with(out)
    inputs = list(node.all_input_nodes)
    graph.erase_node(node)
    _remove_orphans(graph, [n for n in inputs if n is not x])
