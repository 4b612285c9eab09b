"""``fxdeco.apply``: a decomposed graph's factors put back into a copy of the caller's own model.

fxdeco returns ``torch.fx.GraphModule``s. Users of Hugging Face causal LMs (and of
any model class with methods beyond ``forward``) need their own class back:
``generate()`` with its key/value cache (the captured graph has none), the
config, ``state_dict`` naming, PEFT wrapping. :func:`apply` builds that model:
a deep copy of the original in which each decomposed layer -- an
``nn.Linear``, an ``nn.Conv2d`` or transformers' ``Conv1D`` module -- is
replaced by a :class:`FactoredLinear` / :class:`FactoredConv2d` holding copies
of the graph's factor layers under the graph's names (``fc`` -> ``fc.0``,
``fc.1``), so it computes what the graph computes.

How graph names relate to the model's: both captures keep the model's
qualified names. Symbolic tracing installs the model's own modules under their
names; ``torch.export(...).module()`` rebuilds the module tree and reads each
weight with ``get_attr`` of its qualified name (tied weights appear under one
of their names). A factored layer's record (:class:`fxdeco.metadata.FactorInfo`)
names the layer (``target``); the rewrite keeps the original node's
``nn_module_stack``, whose innermost entry is the module whose call the site
was, so a site can be told apart from a functional ``F.linear`` on a
module's weight (whose innermost module is the caller, or none).

Example:
    >>> import torch, fxdeco
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> small = fxdeco.transform(model, [torch.randn(64, 4) @ torch.randn(4, 32)], nsr_threshold=0.01)
    >>> mine = fxdeco.apply(model, small)
    >>> type(mine).__name__, type(mine[0]).__name__, mine[0].rank
    ('Sequential', 'FactoredLinear', 4)
    >>> [k for k in mine.state_dict() if k.startswith("0.")]
    ['0.0.weight', '0.1.weight', '0.1.bias']
    >>> x = torch.randn(3, 32)
    >>> torch.allclose(mine(x), small(x), rtol=1e-5, atol=1e-6)
    True
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.fx
from torch import nn

from fxdeco.errors import warn_user
from fxdeco.metadata import capture_record, factored_layers, find_model_record
from passes import Site

__all__ = ["ApplyError", "FactoredConv2d", "FactoredLinear", "apply"]


class ApplyError(ValueError):
    """A decomposed graph cannot be put back into the model: a decomposed site is not a call of one of the model's
    Linear/Conv2d/Conv1D modules, or a graph tensor has no place in the model. The message names the first such
    layer or tensor."""


# ---------------------------------------------------------------------------------------------- the new modules


class FactoredLinear(nn.Sequential):
    """A Linear (or transformers' ``Conv1D``) computed as a chain of smaller Linears, ``second(first(x))``.

    The children keep the names the decomposed graph gave them (``0``, ``1``),
    so the state_dict keys are the graph's (``fc.0.weight``, ``fc.1.weight``,
    ``fc.1.bias``); ``first``, ``second``, ``rank``, ``in_features`` and
    ``out_features`` name what they hold.

    Example:
        >>> layer = FactoredLinear(nn.Linear(16, 4, bias=False), nn.Linear(4, 8))
        >>> layer.rank, layer.in_features, layer.out_features, layer(torch.randn(2, 3, 16)).shape
        (4, 16, 8, torch.Size([2, 3, 8]))
    """

    def __init__(self, *layers: nn.Linear) -> None:
        if not layers or not all(isinstance(layer, nn.Linear) for layer in layers):
            raise TypeError(f"FactoredLinear takes nn.Linear layers, got {[type(m).__name__ for m in layers]}")
        super().__init__(*layers)

    @property
    def first(self) -> nn.Linear:
        return self[0]

    @property
    def second(self) -> nn.Linear:
        return self[-1]

    @property
    def rank(self) -> int:
        return min(layer.out_features for layer in list(self)[:-1]) if len(self) > 1 else self.out_features

    @property
    def in_features(self) -> int:
        return self.first.in_features

    @property
    def out_features(self) -> int:
        return self.second.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        """The layer's bias: the last factor's (falor's centred bias included)."""
        return self.second.bias

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` matrix the factors multiply to (``(in, out)`` where the layer replaced a
        transformers ``Conv1D``), computed on every read, with a warning: for code that reads a layer's weight
        (T5's feed-forward reads ``self.wo.weight.dtype``), not for computing with."""
        _warn_dense_read(self)
        weight = self.first.weight
        for layer in list(self)[1:]:
            weight = layer.weight @ weight
        return weight.T if getattr(self, "_replaces_conv1d", False) else weight


class FactoredConv2d(nn.Sequential):
    """A Conv2d computed as a chain of smaller Conv2d layers, ``second(first(x))``.

    The layer's kernel, stride, padding and dilation sit on ``first`` with a
    1x1 ``second`` (falor, dwain, lockd's ``"kxk-first"``) or on ``second`` after a
    1x1 ``first`` (lockd's ``"1x1-first"``); the bias is on ``second``. Children
    are named as in the decomposed graph (``conv.0``, ``conv.1``).

    Example:
        >>> layer = FactoredConv2d(nn.Conv2d(3, 2, 1, bias=False), nn.Conv2d(2, 8, 3, padding=1))
        >>> layer.rank, layer.in_channels, layer.out_channels, layer(torch.randn(1, 3, 5, 5)).shape
        (2, 3, 8, torch.Size([1, 8, 5, 5]))
    """

    def __init__(self, *layers: nn.Conv2d) -> None:
        if not layers or not all(isinstance(layer, nn.Conv2d) for layer in layers):
            raise TypeError(f"FactoredConv2d takes nn.Conv2d layers, got {[type(m).__name__ for m in layers]}")
        super().__init__(*layers)

    @property
    def first(self) -> nn.Conv2d:
        return self[0]

    @property
    def second(self) -> nn.Conv2d:
        return self[-1]

    @property
    def rank(self) -> int:
        return min(layer.out_channels for layer in list(self)[:-1]) if len(self) > 1 else self.out_channels

    @property
    def in_channels(self) -> int:
        return self.first.in_channels

    @property
    def out_channels(self) -> int:
        return self.second.out_channels

    @property
    def bias(self) -> torch.Tensor | None:
        """The layer's bias: the last factor's."""
        return self.second.bias

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out, in, kh, kw)`` kernel the factors compose to, computed on every read, with a warning
        (see :attr:`FactoredLinear.weight`)."""
        _warn_dense_read(self)
        weight = self.first.weight
        for layer in list(self)[1:]:
            if layer.weight.shape[-2:] == (1, 1):
                weight = torch.einsum("or,rihw->oihw", layer.weight[:, :, 0, 0], weight)
            elif weight.shape[-2:] == (1, 1):
                weight = torch.einsum("orhw,ri->oihw", layer.weight, weight[:, :, 0, 0])
            else:
                raise AttributeError("this factored Conv2d chains two convolutions wider than 1x1: it has no "
                                     "single dense kernel")
        return weight


def _warn_dense_read(layer: nn.Module) -> None:
    warnings.warn(f"reading .weight of a {type(layer).__name__} multiplies its factors into the dense matrix on "
                  "every read (its time and memory); code that only needs the dtype or device can read them from "
                  "the first factor (layer.first.weight)", stacklevel=3)


# ---------------------------------------------------------------------------------------------- checks


@dataclasses.dataclass
class _Swap:
    """One module of the model to replace: where it is, where its factors are in the graph, and what it is."""

    module: str  # qualified name in the model
    factors: str  # qualified name of the factor chain's parent in the graph
    kind: str  # "linear", "conv1d" (transformers' Conv1D) or "conv2d"
    length: int  # number of factor layers
    node: str  # the graph node of the first call found (for messages)


def _conv1d_class() -> type | None:
    """transformers' ``Conv1D`` when transformers is already imported (a model using it has imported it)."""
    if "transformers" not in sys.modules:
        return None
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` or ``"conv2d"`` for a plain layer of those kinds (its own forward), else None."""
    cls = type(module)
    if isinstance(module, nn.Linear) and cls.forward is nn.Linear.forward:
        return "linear"
    if isinstance(module, nn.Conv2d) and cls.forward is nn.Conv2d.forward \
            and cls._conv_forward is nn.Conv2d._conv_forward:
        return "conv2d"
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d) and cls.forward is conv1d.forward:
        return "conv1d"
    return None


def _dense_shape(module: nn.Module, kind: str) -> tuple[int, ...]:
    """The layer's weight as fxdeco records it: ``(out, in)`` (Conv1D stores ``(in, out)``) or ``(out, in, kh, kw)``."""
    shape = tuple(module.weight.shape)
    return shape[::-1] if kind == "conv1d" else shape


def _innermost_module(node: torch.fx.Node) -> str | None:
    """The qualified name of the innermost module whose call produced ``node`` (``nn_module_stack``), or None
    when the node was not recorded inside any module call."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    entry = list(stack.values())[-1]
    path = entry[0] if isinstance(entry, (tuple, list)) and entry else None
    return path if isinstance(path, str) else None


def _factor_chain(gm: torch.fx.GraphModule, node: torch.fx.Node, what: str) -> tuple[str, list[torch.fx.Node]]:
    """The parent module of a factored layer's factors in the graph, and its chain of call nodes, first to last.

    The rewrite (``passes.rewrite``, ``passes.chains``) installs the factors as
    children ``0..k`` of one module and calls them in order, each on the
    previous one's output; anything else is not a chain :func:`apply` can copy.
    """
    if node.op != "call_module" or "." not in node.target:
        raise ApplyError(f"{what}: its last node is {node.format_node()}, not a call of a factor layer; was the "
                         "graph edited after fxdeco decomposed it?")
    parent, _, last = node.target.rpartition(".")
    if not last.isdigit():
        raise ApplyError(f"{what}: its last node calls {node.target!r}, not a numbered factor layer; was the graph "
                         "edited after fxdeco decomposed it?")
    chain = [node]
    for index in range(int(last) - 1, -1, -1):
        source = chain[0].args[0] if len(chain[0].args) == 1 and not chain[0].kwargs else None
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and source.target == f"{parent}.{index}"):
            raise ApplyError(f"{what}: factor {parent}.{index + 1} is not called on the output of {parent}.{index}; "
                             "was the graph edited after fxdeco decomposed it?")
        chain.insert(0, source)
    children = dict(gm.get_submodule(parent).named_children())
    if sorted(children) != sorted(str(i) for i in range(len(chain))):
        raise ApplyError(f"{what}: the graph's module {parent!r} holds {sorted(children)}, not just the "
                         f"{len(chain)} factor layers its calls use")
    return parent, chain


def _check_factors(gm: torch.fx.GraphModule, swap: _Swap, original: nn.Module, what: str) -> None:
    """The graph's factor layers are plain Linear/Conv2d layers that chain from the layer's inputs to its outputs."""
    layers = [gm.get_submodule(f"{swap.factors}.{i}") for i in range(swap.length)]
    wanted = nn.Conv2d if swap.kind == "conv2d" else nn.Linear
    odd = next((m for m in layers if _layer_kind(m) != ("conv2d" if wanted is nn.Conv2d else "linear")), None)
    if odd is not None:
        raise ApplyError(f"{what}: the graph's factor {type(odd).__name__} is not a plain {wanted.__name__} for a "
                         f"{swap.kind} layer; was the graph edited after fxdeco decomposed it?")
    out, cin = _dense_shape(original, swap.kind)[:2]
    if wanted is nn.Linear:
        ins, outs = layers[0].in_features, layers[-1].out_features
    else:
        ins, outs = layers[0].in_channels, layers[-1].out_channels
    if (ins, outs) != (cin, out):
        raise ApplyError(f"{what}: the graph's factors map {ins} to {outs} channels, the model's layer {cin} to "
                         f"{out}; give apply() the model the graph was made from")


def _same_module(model: nn.Module, name: str | None, other: str) -> bool:
    """Whether two qualified names of ``model`` hold one module (torch.export records the name a call used, the
    graph the first one)."""
    if name is None:
        return False
    try:
        return model.get_submodule(name) is model.get_submodule(other)
    except AttributeError:
        return False


def _model_layer(model: nn.Module, node: torch.fx.Node, target: str, weight_shape: tuple[int, ...], conv2d: bool,
                 what: str) -> tuple[nn.Module, str]:
    """The module of ``model`` that graph ``node`` calls as layer ``target``, and its kind (see :func:`_layer_kind`).
    Raises :class:`ApplyError` when the node is not a call of such a module, or the module is not the layer the
    graph decomposed."""
    called = _innermost_module(node)
    if called != target and not _same_module(model, called, target):
        inside = "outside any module" if called is None else \
            f"inside {'the model itself' if called == '' else repr(called)}"
        raise ApplyError(
            f"{what}: it is not a call of a module of {type(model).__name__} but a functional call on the "
            f"layer's weight ({inside}, e.g. F.linear(x, self.{target}.weight) or F.conv2d); apply() "
            "can only swap whole nn.Linear/nn.Conv2d/Conv1D modules. Call the layer as a module in forward, "
            f"skip it when decomposing (skip=[{target!r}]), or use the decomposed GraphModule itself")
    try:
        original = model.get_submodule(target)
    except AttributeError:
        raise ApplyError(f"{what}: {type(model).__name__} has no module {target!r}; give apply() the model "
                         "the graph was made from") from None
    kind = _layer_kind(original)
    if kind is None:
        raise ApplyError(f"{what}: the model's module is a {type(original).__name__}, not an nn.Linear, "
                         "nn.Conv2d or transformers' Conv1D with its own forward; apply() swaps only those")
    if original._forward_hooks or original._forward_pre_hooks:
        raise ApplyError(f"{what}: the model's module has forward hooks or pre-hooks, which its factored "
                         "replacement would not run; remove them before apply()")
    if "forward" in vars(original):
        raise ApplyError(f"{what}: the model's module has its forward replaced on the instance (module.forward = "
                         "...), which its factored replacement would not run; restore the class's forward, skip the "
                         f"layer when decomposing (skip=[{target!r}]), or use the decomposed GraphModule itself")
    if kind == "conv2d" and getattr(original, "padding_mode", "zeros") != "zeros":
        # torch.export records the padding as its own op before a padding-free convolution: the graph's factors
        # do not pad, and in the module's place they would compute a smaller output (or, after a global pooling,
        # other values silently)
        raise ApplyError(f"{what}: the model's Conv2d pads with padding_mode={original.padding_mode!r}, which the "
                         "captured graph computes as a separate op before the layer, so its factored replacement "
                         f"would not pad; skip it when decomposing (skip=[{target!r}]) or use the decomposed "
                         "GraphModule itself")
    shape = _dense_shape(original, kind)
    if shape != tuple(weight_shape) or (kind == "conv2d") != conv2d:
        raise ApplyError(f"{what}: the graph decomposed a {'conv2d' if conv2d else 'linear'} weight of shape "
                         f"{tuple(weight_shape)}, the model's {type(original).__name__} has {shape}; give apply() "
                         "the model the graph was made from")
    return original, kind


def _swaps(model: nn.Module, gm: torch.fx.GraphModule) -> tuple[dict[str, _Swap], set[str]]:
    """Check every decomposed site of ``gm`` against ``model``, in graph order; return the modules to replace and
    the names of the graph's factor modules. Raises :class:`ApplyError` naming the first site that does not fit."""
    swaps: dict[str, _Swap] = {}
    chain_nodes: set[str] = set()
    for node, info in factored_layers(gm):
        what = f"decomposed layer {info.target!r} (graph node {node.name!r})"
        parent, chain = _factor_chain(gm, node, what)
        original, kind = _model_layer(model, node, info.target, tuple(info.weight_shape), info.kind == "conv2d", what)
        swap = _Swap(info.target, parent, kind, len(chain), node.name)
        known = swaps.get(info.target)
        if known is None:
            _check_factors(gm, swap, original, what)
            swaps[info.target] = swap
        elif known.factors != parent:
            raise ApplyError(f"{what}: the module is called at several places with different factorizations "
                             f"({known.factors!r} at node {known.node!r}, {parent!r} here); one module can hold "
                             "only one")
        chain_nodes.update(n.name for n in chain)
    _refuse_dense_calls(gm, swaps, chain_nodes)
    return swaps, {s.factors for s in swaps.values()}


def _refuse_dense_calls(gm: torch.fx.GraphModule, swaps: dict[str, _Swap], chain_nodes: set[str]) -> None:
    """A decomposed module that the graph still calls (or whose weight it still reads) elsewhere would compute
    differently there once the module is swapped."""
    for node in gm.graph.nodes:
        if node.name in chain_nodes:
            continue
        if node.op == "call_module" and node.target in swaps:
            module = node.target
        elif node.op == "get_attr" and node.target.rpartition(".")[0] in swaps and node.users \
                and node.target.rpartition(".")[2] in ("weight", "bias"):  # other tensors go with the layer
            module = node.target.rpartition(".")[0]
        else:
            continue
        raise ApplyError(f"decomposed layer {module!r} (graph node {swaps[module].node!r}): the module is called at "
                         f"several places with a different factorization: node {node.name!r} still uses it dense; "
                         "one module can hold only one form")


def check_swappable(model: nn.Module, gm: torch.fx.GraphModule, sites: Iterable[Site]) -> None:
    """Before decomposing ``model`` in place (:func:`fxdeco.decompose_`): every site of the captured ``gm`` that
    may be decomposed is the call of one of ``model``'s Linear/Conv2d/Conv1D modules. Raises :class:`ApplyError`
    naming the first site that is not, so nothing has been changed yet. (A layer whose weight the graph also reads
    elsewhere is not a site: ``passes.find_sites`` keeps it dense.)

    Example:
        >>> import torch, fxdeco
        >>> from fxdeco.io.apply import check_swappable
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> prepared = fxdeco.prepare(model)
        >>> check_swappable(model, prepared.gm, prepared.sites)   # nothing to say
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    for site in sites:
        what = f"layer {site.target!r} (graph node {site.node!r})"
        _model_layer(model, by_name[site.node], site.target, tuple(site.weight_shape), site.kind == "conv2d", what)


# ---------------------------------------------------------------------------------------------- tensors


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer under each of its names (a tied weight under all of them)."""
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _under(name: str, prefixes: set[str]) -> bool:
    return any(name.startswith(p + ".") for p in prefixes)


def _same(graph_tensor: torch.Tensor, model_tensor: torch.Tensor) -> bool:
    """Whether the graph's tensor holds the model's values (compared in the model's dtype, on its device)."""
    if graph_tensor.shape != model_tensor.shape:
        return False
    return torch.equal(graph_tensor.detach().to(device=model_tensor.device, dtype=model_tensor.dtype),
                       model_tensor.detach())


_TRACE_CONSTANT = re.compile(r"_tensor_constant\d+")


def _is_unchanged_trace_constant(model: nn.Module, gm: torch.fx.GraphModule, name: str, tensor: torch.Tensor,
                                 traced: list[dict[str, torch.Tensor]]) -> bool:
    """Whether graph tensor ``name`` is a constant symbolic tracing computed from the model's own tensors, with
    the value a trace of ``model`` computes now.

    torch.fx traces ``self.index.view(-1)`` on a buffer (timm's Swin, Swin V2 and BEiT relative position
    indices) as a new tensor ``_tensor_constant0`` that no model name holds. The model's forward computes it
    again from the buffer, so nothing needs copying, provided the graph's value is the one ``model`` gives: that
    is checked on a fresh trace of ``model`` (made once, into ``traced``), so a constant that was edited, or a
    model whose buffers differ, is still refused by the caller.
    """
    if not _TRACE_CONSTANT.fullmatch(name):
        return False
    record = capture_record(gm)
    if record.kind != "symbolic":
        return False
    if not traced:
        from fxdeco.capture import trace

        try:
            with warnings.catch_warnings():  # the capture's warnings were given when the graph was made
                warnings.simplefilter("ignore")
                fresh = trace(model, capture="symbolic", constant_inputs=dict(record.constant_inputs) or None)
        except Exception:  # a model that traces only with options we do not know: refuse as before
            fresh = None
        traced.append(dict(fresh.named_buffers()) if fresh is not None else {})
    theirs = traced[0].get(name)
    return theirs is not None and _same(tensor, theirs)


def _tensors_to_copy(model: nn.Module, gm: torch.fx.GraphModule, swaps: dict[str, _Swap],
                     factor_modules: set[str]) -> dict[str, torch.Tensor]:
    """Model name -> graph tensor, for the graph's parameters and buffers (other than factors) that differ from
    the model's (trained by dwain's ``finetune_fn``, by ``fxdeco.finetune``, or edited by the user).

    Graph names are the model's (both captures keep them). A graph tensor whose name the model lacks must equal
    one of the model's tensors (a tied weight export kept under another name); otherwise it, like a tensor that
    differs from that of a module being replaced, has no place in the result: :class:`ApplyError`.
    """
    mine = dict(_named_tensors(model))
    replaced = {alias for name in swaps for alias in module_names(model, name)}
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for t in mine.values():
        by_shape.setdefault(tuple(t.shape), []).append(t)
    copies: dict[str, torch.Tensor] = {}
    traced: list[dict[str, torch.Tensor]] = []  # the model's own trace constants, computed once when needed
    for name, tensor in _named_tensors(gm):
        if _under(name, factor_modules) or name in copies:
            continue
        if name not in mine and _is_unchanged_trace_constant(model, gm, name, tensor, traced):
            continue  # computed by the model's forward from its own tensors: nothing to copy
        theirs = mine.get(name)
        if theirs is not None and not _under(name, replaced):
            if tensor.shape != theirs.shape:
                raise ApplyError(f"graph tensor {name!r} has shape {tuple(tensor.shape)}, the model's "
                                 f"{tuple(theirs.shape)}; give apply() the model the graph was made from")
            if not _same(tensor, theirs):
                copies[name] = tensor
            continue
        if theirs is not None and _same(tensor, theirs):
            continue  # a decomposed layer's own tensor, unchanged: it goes with the layer
        if theirs is None and any(_same(tensor, t) for t in by_shape.get(tuple(tensor.shape), [])):
            continue  # unchanged under another name
        where = f"belongs to decomposed layer {next(s for s in replaced if name.startswith(s + '.'))!r}" \
            if theirs is not None else f"has no counterpart in {type(model).__name__}"
        raise ApplyError(f"graph tensor {name!r} differs from the model's and {where}, so its values cannot be "
                         "put into the model; apply() copies only factors and tensors whose names the model has")
    _warn_parameters_outside_the_graph(model, gm, replaced)
    return copies


def _warn_parameters_outside_the_graph(model: nn.Module, gm: torch.fx.GraphModule, replaced: set[str]) -> None:
    """Warn about parameters of ``model`` the graph has no counterpart for (by name, or by value for a tied weight):
    a model with more layers than the one decomposed would keep computing with them. A warning, not an error: a
    module the forward never calls is legitimately absent from a captured graph."""
    graph_tensors = dict(_named_tensors(gm))
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for t in graph_tensors.values():
        by_shape.setdefault(tuple(t.shape), []).append(t)
    present = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in graph_tensors}
    missing = [name for name, p in model.named_parameters(remove_duplicate=False)
               if name not in graph_tensors and id(p) not in present and not _under(name, replaced)
               and not any(_same(t, p) for t in by_shape.get(tuple(p.shape), []))]
    if missing:
        warn_user(f"apply(): {len(missing)} parameter(s) of {type(model).__name__} are not in the decomposed graph "
                  f"(first: {missing[0]!r}); if forward uses them, the result computes something else than the graph "
                  "-- was the graph made from another model (e.g. with fewer layers)?")


# ---------------------------------------------------------------------------------------------- apply


def _factored_module(gm: torch.fx.GraphModule, swap: _Swap, original: nn.Module, share: bool = False) -> nn.Module:
    """The graph's factor layers (copies, or the graph's own with ``share``), as a Factored* module on the original
    layer's device and dtype."""
    weight = original.weight
    layers = []
    for i in range(swap.length):
        layer = gm.get_submodule(f"{swap.factors}.{i}")
        layer = layer if share else copy.deepcopy(layer)
        layer.to(device=weight.device, dtype=weight.dtype)
        layer.requires_grad_(weight.requires_grad)
        layers.append(layer)
    module = FactoredConv2d(*layers) if swap.kind == "conv2d" else FactoredLinear(*layers)
    return module.train(original.training)


def module_names(root: nn.Module, name: str) -> list[str]:
    """Every qualified name under which the module at ``name`` is registered in ``root`` (one module shared by two
    blocks, or assigned to two attributes, has several; a graph calls it under the first).

    Example:
        >>> shared = nn.Linear(2, 2)
        >>> module_names(nn.Sequential(shared, nn.ReLU(), shared), "0")
        ['0', '2']
    """
    module = root.get_submodule(name)
    return [n for n, m in root.named_modules(remove_duplicate=False) if m is module] or [name]


def swap_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the qualified ``name`` in ``root``, and under every other name of the module there
    (:func:`module_names`): a module registered twice is one layer, and swapping one of its names only would leave
    the other computing densely."""
    carry_attributes(root.get_submodule(name), new)
    for alias in module_names(root, name):
        parent_name, _, child = alias.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, new)


def carry_attributes(dense: nn.Module, factored: nn.Module) -> None:
    """Give ``factored`` what else code may read on the ``dense`` layer it replaces: its buffers and parameters
    other than its weight and bias (a scale its parent multiplies by: ``self.fc.scale``), and its plain
    attributes (``kernel_size``, ``stride``, Conv1D's ``nf``, one a user set), wherever the factored module does
    not define the name itself. Reading ``weight`` and ``bias`` is answered by the Factored* classes.

    Example:
        >>> dense = nn.Linear(4, 4); dense.register_buffer("scale", torch.ones(4)); dense.alpha = 0.5
        >>> factored = FactoredLinear(nn.Linear(4, 2, bias=False), nn.Linear(2, 4))
        >>> carry_attributes(dense, factored)
        >>> factored.alpha, factored.scale.shape, "scale" in factored.state_dict()
        (0.5, torch.Size([4]), True)
    """
    def free(name: str) -> bool:
        return not hasattr(type(factored), name) and name not in factored.__dict__ and name not in factored._modules

    for name, buffer in dense._buffers.items():
        if free(name) and name not in factored._buffers:
            factored.register_buffer(name, buffer, persistent=name not in dense._non_persistent_buffers_set)
    for name, parameter in dense._parameters.items():
        if name not in ("weight", "bias") and free(name) and name not in factored._parameters:
            factored.register_parameter(name, parameter)
    for name, value in vars(dense).items():
        if not name.startswith("_") and name != "training" and free(name):
            setattr(factored, name, value)
    if _layer_kind(dense) == "conv1d":
        factored._replaces_conv1d = True  # its dense weight is read (in, out)


def apply(model: nn.Module, decomposed: torch.fx.GraphModule | str | os.PathLike, *,
          example_inputs: Any = None, inplace: bool = False) -> nn.Module:
    """A copy of ``model``, of its own class, computing what the decomposed graph computes.

    ``decomposed`` is the GraphModule of ``fxdeco.transform``, ``convert``,
    ``load`` or ``lockd.finalize`` made from ``model`` (or a model of the same
    architecture), or a directory written by ``fxdeco.save``, which is loaded
    with ``fxdeco.load(path, model, example_inputs=example_inputs)`` first
    (``example_inputs`` is needed for a model captured with torch.export, and
    used for nothing else).

    In the copy, each decomposed ``nn.Linear`` or transformers ``Conv1D``
    becomes a :class:`FactoredLinear` and each ``nn.Conv2d`` a
    :class:`FactoredConv2d`, holding copies of the graph's factor layers under
    the graph's names (``fc.0.weight``, ``fc.1.weight``, ``fc.1.bias``: the
    bias, falor's centred one included, is on the last factor), in the
    original layer's dtype and on its device. Parameters and buffers that the
    graph changed (dwain's ``finetune_fn``, ``fxdeco.finetune``) are copied
    in by name. Everything else -- class, config, other methods
    (``generate()`` with its key/value cache), hooks elsewhere, training mode
    -- is the model's. ``model`` itself is not modified.

    A module registered under several names (one layer shared by two blocks)
    is replaced under all of them. What else the model's code may read on a
    replaced layer goes with its factored form (:func:`carry_attributes`): its
    other buffers and parameters and its plain attributes; its ``bias`` is the
    last factor's, and reading its ``weight`` multiplies the factors (with a
    warning). Buffers hold the values the model had when it was prepared, not
    those calibration's forward passes left (a counter, a running average).

    ``inplace=True`` changes ``model`` itself instead of a copy and returns it:
    its decomposed modules are swapped for Factored* modules holding the
    graph's own factor layers (shared with ``decomposed``, not copied), so a
    model that fits in memory once or twice, not three times, can be
    converted (``del decomposed`` afterwards frees the rest of the graph). The
    checks below all run before the first change. To decompose a large model
    in place as it goes, see :func:`fxdeco.decompose_`.

    Raises :class:`ApplyError` before anything is built when a decomposed site
    is not the call of one such module of ``model`` (a functional ``F.linear``
    on a module's weight, a module the graph also calls dense elsewhere, a
    module with hooks), naming the first such site in graph order, or when a
    tensor the graph changed has no place in the model.

    Example:
        >>> import torch, torch.nn.functional as F, fxdeco
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc, self.out = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)
        ...     def forward(self, x):
        ...         return F.linear(self.fc(x), self.out.weight, self.out.bias)   # not self.out(...)
        >>> net = Net()
        >>> small = fxdeco.transform(net, [torch.randn(64, 4) @ torch.randn(4, 32)], nsr_threshold=0.01)
        >>> fxdeco.apply(net, small)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fxdeco.io.apply.ApplyError: decomposed layer 'out' (graph node ...): it is not a call of a module of Net ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply() puts a decomposition back into the original model (an nn.Module), got "
                        f"{type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    if isinstance(decomposed, (str, os.PathLike)):
        from fxdeco.io.serialize import load
        decomposed = load(decomposed, model, example_inputs=example_inputs)
    if not isinstance(decomposed, torch.fx.GraphModule):
        raise TypeError(f"apply() takes the GraphModule fxdeco returned (transform, convert, load) or a directory "
                        f"written by fxdeco.save, got {type(decomposed).__name__}")
    if find_model_record(decomposed) is None and not factored_layers(decomposed):
        raise ApplyError("this GraphModule was not decomposed by fxdeco (transform, convert, load or "
                         "lockd.finalize): it has no factored layer to put back into the model")
    swaps, factor_modules = _swaps(model, decomposed)
    copies = _tensors_to_copy(model, decomposed, swaps, factor_modules)

    # everything checked: nothing below can fail on the model's structure
    result = model if inplace else copy.deepcopy(model)
    for name, swap in swaps.items():
        swap_module(result, name, _factored_module(decomposed, swap, result.get_submodule(name), share=inplace))
    targets = dict(_named_tensors(result))
    with torch.no_grad():
        for name, tensor in copies.items():
            targets[name].copy_(tensor)  # in place: a tied weight stays tied
    return result

