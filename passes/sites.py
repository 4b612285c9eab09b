"""Find the decomposable *sites* of a graph: nodes computing ``y = W x + b``.

A site is a Linear or a Conv2d (groups=1) whose weight ``W`` resolves to a
constant tensor of the module. Every form that reaches us is recognised:

* ``call_module`` on ``nn.Linear`` / ``nn.Conv2d`` (symbolic tracing);
* ``call_function`` ``F.linear`` / ``torch._C._nn.linear`` / ``F.conv2d`` with
  ``get_attr`` weights (symbolic tracing of functional code, Dynamo);
* ``aten.linear.default`` / ``aten.conv2d.default`` / ``aten.addmm`` with a
  constant (possibly transposed) weight (``torch.export`` graphs).

Layers of other kinds (Conv1d, ConvTranspose, grouped convs, Embedding, ...)
are returned as :class:`SkippedSite` with a reason instead of being dropped
silently.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
import torch.nn.utils.parametrize
from torch import nn

aten = torch.ops.aten

LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, aten.linear.default}
# aten.conv2d.padding is what torch.export records for padding="same"/"valid".
CONV2D_FUNCTIONS = {F.conv2d, torch.conv2d, aten.conv2d.default, aten.conv2d.padding}
ADDMM_FUNCTIONS = {aten.addmm.default, torch.addmm}
# How a transposed weight ``Wᵀ`` reaches an addmm: functions (export, Dynamo) or, in
# symbolically traced code such as ``torch.addmm(b, x, self.weight.t())``, tensor methods.
TRANSPOSE_FUNCTIONS: dict[Any, str] = {aten.t.default: "t", torch.t: "t", aten.transpose.int: "transpose",
                                       torch.transpose: "transpose", aten.permute.default: "permute",
                                       torch.permute: "permute"}
TRANSPOSE_METHODS = {"t", "transpose", "permute"}

# torch.export records nn.LSTM/GRU/RNN and their cells as these ops (symbolic tracing keeps them as leaf modules);
# their weights are named ``lstm.weight_ih_l0``, ``cell.weight_hh``: the layer is the name's prefix.
RECURRENT_FUNCTIONS = (aten.lstm.input, aten.gru.input, aten.rnn_tanh.input, aten.rnn_relu.input,
                       aten.lstm_cell.default, aten.gru_cell.default, aten.rnn_tanh_cell.default,
                       aten.rnn_relu_cell.default)
# Layers we recognise but do not decompose, with the reason a report shows.
SKIPPED_FUNCTIONS: dict[Any, str] = {
    F.conv1d: "conv1d is not decomposed",
    F.conv3d: "conv3d is not decomposed",
    F.conv_transpose1d: "transposed convolution is not decomposed",
    F.conv_transpose2d: "transposed convolution is not decomposed",
    F.conv_transpose3d: "transposed convolution is not decomposed",
    F.embedding: "embedding lookups are not decomposed",
    aten.conv1d.default: "conv1d is not decomposed",
    aten.conv1d.padding: "conv1d is not decomposed",
    aten.conv3d.default: "conv3d is not decomposed",
    aten.conv3d.padding: "conv3d is not decomposed",
    aten.conv_transpose1d.default: "transposed convolution is not decomposed",
    aten.conv_transpose2d.input: "transposed convolution is not decomposed",
    aten.conv_transpose3d.input: "transposed convolution is not decomposed",
    aten.embedding.default: "embedding lookups are not decomposed",
    aten.convolution.default: "aten.convolution is not decomposed",
    F.bilinear: "bilinear layers are not decomposed",
    aten.bilinear.default: "bilinear layers are not decomposed",
    **dict.fromkeys(RECURRENT_FUNCTIONS, "recurrent layers are not decomposed"),
}
SKIPPED_MODULES: dict[type, str] = {
    nn.Conv1d: "Conv1d is not decomposed",
    nn.Conv3d: "Conv3d is not decomposed",
    nn.ConvTranspose1d: "transposed convolution is not decomposed",
    nn.ConvTranspose2d: "transposed convolution is not decomposed",
    nn.ConvTranspose3d: "transposed convolution is not decomposed",
    nn.Embedding: "embedding lookups are not decomposed",
    nn.EmbeddingBag: "embedding lookups are not decomposed",
    nn.Bilinear: "bilinear layers are not decomposed",
    nn.MultiheadAttention: "projections inside a leaf nn.MultiheadAttention are not visible to the graph",
    nn.RNNBase: "recurrent layers are not decomposed",
    nn.RNNCellBase: "recurrent layers are not decomposed",
}
# Where the weight sits in a skipped function's arguments when it is not argument 1:
# aten.embedding takes (weight, indices), unlike F.embedding(input, weight); bilinear takes (x1, x2, weight, bias);
# the recurrent ops take (input, hx, weights...) with the whole layer's weights as a list (aten.lstm) or one by one.
SKIPPED_WEIGHT_ARG: dict[Any, int] = {
    aten.embedding.default: 0, F.bilinear: 2, aten.bilinear.default: 2, **dict.fromkeys(RECURRENT_FUNCTIONS, 2),
}
# Layer types whose weights we look for inside nodes the graph does not trace into.
LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


@dataclasses.dataclass(frozen=True)
class Site:
    """One decomposable layer occurrence in a graph.

    ``weight_shape`` is the shape as stored (``(out, in)`` or ``(out, in, kh, kw)``);
    ``target`` is the qualified name under which factors are installed.
    """

    node: str
    kind: str  # "linear" | "conv2d"
    target: str
    weight: str
    bias: str | None
    weight_shape: tuple[int, ...]
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    weight_transposed: bool = False  # addmm with the matrix stored as (in, out)

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """Inputs per output value: ``in`` for Linear, ``in * kh * kw`` for Conv2d."""
        n = 1
        for d in self.weight_shape[1:]:
            n *= d
        return n

    @property
    def full_rank(self) -> int:
        return min(self.out_features, self.in_features)

    @property
    def dense_params(self) -> int:
        """Parameters of the layer as it is: ``out * in`` plus the bias."""
        return self.out_features * self.in_features + (self.out_features if self.bias else 0)

    def factor_params(self, rank: int) -> int:
        """Parameters of the two factors at ``rank`` (bias excluded): ``rank * (in + out)``."""
        return rank * (self.in_features + self.out_features)

    def saves_params(self, rank: int) -> bool:
        """Whether factors of ``rank`` hold fewer weights than the dense matrix.

        Example:
            >>> site = Site("fc", "linear", "fc", "fc.weight", None, (64, 64))
            >>> site.saves_params(31), site.saves_params(32)
            (True, False)
        """
        return self.factor_params(rank) < self.out_features * self.in_features


@dataclasses.dataclass(frozen=True)
class SkippedSite:
    """A layer that looks like Linear/Conv but is not decomposed, and why."""

    node: str
    target: str
    reason: str


def fetch_attr(root: nn.Module, qualname: str) -> Any:
    """Return the attribute at dotted path ``qualname`` of ``root``."""
    obj: Any = root
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _owner(weight_name: str) -> str:
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name + "_lowrank"


def site_input(node: torch.fx.Node) -> Any:
    """The ``x`` argument of a site node (``addmm(bias, x, Wᵀ)`` takes it second)."""
    if node.target in ADDMM_FUNCTIONS:
        return node.args[1]
    return node.args[0] if node.args else node.kwargs["input"]


def _module_site(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Site | SkippedSite | None:
    mod = gm.get_submodule(node.target)
    cls = type(mod)
    if isinstance(mod, (nn.Linear, nn.Conv2d)):
        unusual = _not_plain(mod)
        if unusual is not None:
            return SkippedSite(node.name, node.target, unusual)
    if isinstance(mod, nn.Linear) and cls.forward is nn.Linear.forward:
        return Site(node.name, "linear", node.target, f"{node.target}.weight",
                    f"{node.target}.bias" if mod.bias is not None else None, tuple(mod.weight.shape))
    if isinstance(mod, nn.Conv2d) and cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward:
        if mod.groups != 1:
            return SkippedSite(node.name, node.target, f"grouped convolution (groups={mod.groups})")
        if mod.padding_mode != "zeros":
            return SkippedSite(node.name, node.target, f"padding_mode={mod.padding_mode!r}")
        return Site(node.name, "conv2d", node.target, f"{node.target}.weight",
                    f"{node.target}.bias" if mod.bias is not None else None, tuple(mod.weight.shape),
                    tuple(mod.stride), mod.padding if isinstance(mod.padding, str) else tuple(mod.padding),
                    tuple(mod.dilation))
    for skipped_cls, reason in SKIPPED_MODULES.items():
        if isinstance(mod, skipped_cls):
            return SkippedSite(node.name, node.target, reason)
    if isinstance(mod, (nn.Linear, nn.Conv2d)):
        return SkippedSite(node.name, node.target, f"{cls.__name__} overrides forward")
    return None


def _not_plain(mod: nn.Module) -> str | None:
    """Why a Linear/Conv2d module call is not just ``y = W x + b``, or None.

    Forward hooks and pre-hooks run around the call (a factored layer would not
    run them), a forward assigned on the instance replaces the class's, and a
    parametrized weight (``weight_norm``, ``spectral_norm``) is recomputed on
    every call rather than stored.
    """
    if mod._forward_hooks or mod._forward_pre_hooks:
        return ("has forward hooks or pre-hooks, which change what the layer computes and which a factored layer "
                "would not run")
    if "forward" in vars(mod):
        # a forward patched on the instance (``layer.forward = ...``) is what the leaf call runs, whatever the class's
        return ("its forward is replaced on the instance (module.forward = ...), so it need not compute W x + b; "
                "restore the class's forward, or capture the model with torch.export, which traces the replacement")
    if torch.nn.utils.parametrize.is_parametrized(mod):
        return PARAMETRIZED
    return None


# torch.export does not help here: it records the parametrization's computation, so the weight is not a constant there
# either (the report used to name only the anonymous node, ``linear``, as "weight computed in the graph").
PARAMETRIZED = ("its weight is parametrized (weight_norm, spectral_norm, ...); remove the parametrization first "
                "(torch.nn.utils.parametrize.remove_parametrizations)")


def _parametrized_owner(node: Any, limit: int = 64) -> str | None:
    """The module whose parametrization computes ``node`` (a weight argument), or None.

    A parametrized weight reaches an exported graph as ops on ``<module>.parametrizations.<name>.original*``
    constants; the walk back stops at ``limit`` nodes, so a weight computed from an activation is never searched far.
    """
    todo, seen = [node], set()
    while todo and len(seen) < limit:
        n = todo.pop()
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr" and ".parametrizations." in f".{n.target}":
            return f".{n.target}".split(".parametrizations.")[0][1:]  # "" for the root module itself
        todo.extend(n.all_input_nodes)
    return None


def _constant_name(node: Any) -> str | None:
    return node.target if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None


def _is_transpose(node: Any) -> bool:
    """True when ``node`` transposes a matrix: ``t(W)``, ``W.t()``, ``transpose(W, 0, 1)``, ``W.permute(1, 0)``."""
    if not isinstance(node, torch.fx.Node) or not node.args:
        return False
    if node.op == "call_function" and node.target in TRANSPOSE_FUNCTIONS:
        kind = TRANSPOSE_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in TRANSPOSE_METHODS:
        kind = node.target
    else:
        return False
    if kind == "t":
        return True
    rest = node.args[1:]
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return False
    dims = [d % 2 for d in dims]
    return sorted(dims) == [0, 1] if kind == "transpose" else dims == [1, 0]


def _transposed_constant(node: Any) -> str | None:
    """The get_attr name behind a transposed matrix (see :func:`_is_transpose`)."""
    return _constant_name(node.args[0]) if _is_transpose(node) else None


def _function_site(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Site | SkippedSite | None:
    fn = node.target
    if fn in LINEAR_FUNCTIONS or fn in CONV2D_FUNCTIONS:
        kind = "linear" if fn in LINEAR_FUNCTIONS else "conv2d"
        weight_name = _constant_name(_arg(node, 1, "weight"))
        if weight_name is None:
            owner = _parametrized_owner(_arg(node, 1, "weight"))
            if owner is not None:
                return SkippedSite(node.name, owner or node.name, PARAMETRIZED)
            return SkippedSite(node.name, node.name, f"{kind} weight is computed in the graph, not a constant")
        bias_node = _arg(node, 2, "bias")
        bias_name = _constant_name(bias_node)
        if bias_node is not None and bias_name is None:
            return SkippedSite(node.name, _owner(weight_name), f"{kind} bias is computed in the graph")
        weight = fetch_attr(gm, weight_name)
        if kind == "linear":
            if weight.dim() != 2:
                return SkippedSite(node.name, _owner(weight_name), f"linear weight has {weight.dim()} dims")
            return Site(node.name, kind, _owner(weight_name), weight_name, bias_name, tuple(weight.shape))
        groups = _arg(node, 6, "groups", 1)
        if groups != 1:
            return SkippedSite(node.name, _owner(weight_name), f"grouped convolution (groups={groups})")
        return Site(node.name, kind, _owner(weight_name), weight_name, bias_name, tuple(weight.shape),
                    _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0), _arg(node, 5, "dilation", 1))
    if fn in ADDMM_FUNCTIONS:
        if _arg(node, 3, "beta", 1) != 1 or _arg(node, 4, "alpha", 1) != 1:
            return SkippedSite(node.name, node.name, "addmm with beta/alpha != 1")
        bias_name = _constant_name(node.args[0])
        mat2 = node.args[2]
        weight_name, transposed = _transposed_constant(mat2), False
        if weight_name is None:
            weight_name, transposed = _constant_name(mat2), True
        if weight_name is None or bias_name is None:
            return None  # a plain matrix product, not a layer
        weight = fetch_attr(gm, weight_name)
        shape = tuple(weight.shape[::-1]) if transposed else tuple(weight.shape)
        return Site(node.name, "linear", _owner(weight_name), weight_name, bias_name, shape,
                    weight_transposed=transposed)
    if fn in SKIPPED_FUNCTIONS:
        weight = _arg(node, SKIPPED_WEIGHT_ARG.get(fn, 1), "weight")
        if isinstance(weight, (list, tuple)):  # aten.lstm's flat weights: name the layer by its first
            weight = weight[0] if weight else None
        w = _constant_name(weight)
        owner = (w.rpartition(".")[0] or w if fn in RECURRENT_FUNCTIONS else _owner(w)) if w else node.name
        return SkippedSite(node.name, owner, SKIPPED_FUNCTIONS[fn])
    return None


def _candidates(gm: torch.fx.GraphModule) -> list[Site | SkippedSite]:
    found: list[Site | SkippedSite] = []
    for node in gm.graph.nodes:
        result = None
        if node.op == "call_module":
            result = _module_site(gm, node)
        elif node.op == "call_function":
            result = _function_site(gm, node)
        if result is not None:
            found.append(result)
    return found


# Callables from these modules are ops the graph records itself; any other
# call_function target is user code the tracer did not enter (an autowrapped function).
_TRACED_MODULES = {"torch", "_operator", "operator", "builtins", "math"}


def _opaque(node: torch.fx.Node) -> bool:
    """True when ``node`` runs code the graph does not see: a leaf module or an autowrapped function."""
    if node.op == "call_module":
        return True
    if node.op == "call_function":
        return (getattr(node.target, "__module__", None) or "torch").split(".")[0] not in _TRACED_MODULES
    return False


def _callee(node: torch.fx.Node) -> str:
    """A readable name for what ``node`` calls (``shifted_window_attention``, ``blocks.0``)."""
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _hidden_layers(gm: torch.fx.GraphModule, found: list[Site | SkippedSite]) -> list[SkippedSite]:
    """Linear/Conv layers the graph uses only from inside nodes it does not trace into.

    Leaf modules (timm's no-trace registry, user ``leaf_modules``) and autowrapped
    functions that receive a layer's weight (torchvision's
    ``shifted_window_attention``) run their layers out of the graph's sight: they
    can be neither measured nor rewritten, and must be reported rather than
    silently missing from the decomposition. Leaf modules keep their type in the
    GraphModule; a weight reaching a function only shows as a ``get_attr`` of a
    ``*.weight`` tensor (the tracer copies it without its owner's class).
    """
    reported = {c.target for c in found}
    remedy = "capture the model with torch.export, which traces into every module, to decompose it"
    hidden: dict[str, SkippedSite] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in reported:
            mod = gm.get_submodule(node.target)
            for sub_name, sub in mod.named_modules():
                name = f"{node.target}.{sub_name}"
                if sub_name and isinstance(sub, LAYER_TYPES) and name not in reported and name not in hidden:
                    hidden[name] = SkippedSite(node.name, name, f"inside leaf module {node.target!r} "
                                               f"({type(mod).__name__}), which the graph does not trace into; {remedy}")
        elif node.op == "get_attr" and node.target.endswith(".weight"):
            name, weight = _owner(node.target), fetch_attr(gm, node.target)
            if name in reported or name in hidden or not isinstance(weight, torch.Tensor) or weight.dim() < 2:
                continue
            callees = sorted({_callee(u) for u in node.users if _opaque(u)})
            if callees:
                hidden[name] = SkippedSite(node.name, name, f"weight passed to {', '.join(callees)}, which the graph "
                                           f"does not trace into; {remedy}")
    return list(hidden.values())


def _non_site_users(gm: torch.fx.GraphModule, sites: list[Site]) -> dict[int, str]:
    """Map weight (or bias) tensor id -> a node that uses the tensor outside any site."""
    site_nodes = {s.node for s in sites}
    weight_ids = {id(fetch_attr(gm, name)) for s in sites for name in (s.weight, s.bias) if name is not None}
    outside: dict[int, str] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = fetch_attr(gm, node.target)
            if id(t) not in weight_ids:
                continue
            for user in node.users:
                via_transpose = _is_transpose(user) and all(u.name in site_nodes for u in user.users)
                if user.name not in site_nodes and not via_transpose:
                    outside.setdefault(id(t), user.name)
        elif node.op == "call_module" and node.name not in site_nodes:
            for t in gm.get_submodule(node.target).parameters():
                if id(t) in weight_ids:
                    outside.setdefault(id(t), node.name)
    return outside


def _call_signature(s: Site) -> tuple:
    """What must agree between the calls of one layer for one factorization to serve them all."""
    def pair(v: Any) -> Any:
        return v if isinstance(v, str) else (v, v) if isinstance(v, int) else tuple(v)

    geometry = (pair(s.stride), pair(s.padding), pair(s.dilation)) if s.kind == "conv2d" else ()
    return (s.kind, s.weight, s.bias, s.weight_transposed, *geometry)


def _calls_that_differ(sites: list[Site]) -> dict[str, str]:
    """Layers called at several nodes with other arguments (``self.conv(x)`` beside ``F.conv2d(x, self.conv.weight,
    dilation=2)``, a call without the bias): target -> the reason to keep them dense."""
    by_target: dict[str, list[Site]] = defaultdict(list)
    for s in sites:
        by_target[s.target].append(s)
    differ = {}
    for target, calls in by_target.items():
        odd = next((c for c in calls[1:] if _call_signature(c) != _call_signature(calls[0])), None)
        if odd is not None:
            differ[target] = (f"its weight is used by nodes {calls[0].node!r} and {odd.node!r} with different "
                              "arguments (bias, stride, padding or dilation); one factorization cannot serve both")
    return differ


def find_sites(gm: torch.fx.GraphModule) -> tuple[list[Site], list[SkippedSite]]:
    """Return the decomposable sites of ``gm`` in graph order, and the skipped layers.

    A weight used by several nodes of one layer (a module called twice) stays a
    site per node, sharing ``target``; a weight tied between different layers or
    also used outside a layer (e.g. an embedding tied to an output projection)
    is skipped, since factorizing it would not remove its parameters. Linear/Conv
    layers hidden inside leaf modules or autowrapped functions are reported as
    skipped too.

    Example:
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv1d(8, 8, 1)))
        >>> sites, skipped = find_sites(gm)
        >>> [(s.target, s.kind) for s in sites], [(k.target, k.reason) for k in skipped]
        ([('0', 'conv2d')], [('1', 'Conv1d is not decomposed')])
    """
    candidates = _candidates(gm)
    sites = [c for c in candidates if isinstance(c, Site)]
    skipped = [c for c in candidates if isinstance(c, SkippedSite)] + _hidden_layers(gm, candidates)
    outside = _non_site_users(gm, sites)
    targets_by_weight: dict[int, set[str]] = defaultdict(set)
    for s in sites:
        targets_by_weight[id(fetch_attr(gm, s.weight))].add(s.target)
    calls_differ = _calls_that_differ(sites)
    kept: list[Site] = []
    for s in sites:
        wid = id(fetch_attr(gm, s.weight))
        bid = id(fetch_attr(gm, s.bias)) if s.bias is not None else None
        if wid in outside:
            skipped.append(SkippedSite(s.node, s.target, f"weight also used by node {outside[wid]!r}"))
        elif bid in outside:
            skipped.append(SkippedSite(s.node, s.target, f"bias also used by node {outside[bid]!r}"))
        elif s.target in calls_differ:
            skipped.append(SkippedSite(s.node, s.target, calls_differ[s.target]))
        elif len(targets_by_weight[wid]) > 1:
            others = ", ".join(sorted(targets_by_weight[wid] - {s.target}))
            skipped.append(SkippedSite(s.node, s.target, f"weight tied with {others}"))
        else:
            kept.append(s)
    return kept, skipped


def remove_dead_sites(gm: torch.fx.GraphModule) -> list[str]:
    """Run the graph's dead-code elimination; return the targets of sites it removed.

    Sites whose output never reaches the graph output (a BERT pooler when only
    ``last_hidden_state`` is returned) cost calibration time and would be
    decomposed for nothing. Nodes with side effects stay, even when nothing
    reads their result (:func:`has_side_effects`). ``gm`` is modified in place
    and recompiled.

    Example:
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc, self.unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         h = self.fc(x)
        ...         self.unused(x)       # dead: dropped
        ...         h.clamp_(min=0)      # in place, result not assigned: kept
        ...         return h
        >>> gm = torch.fx.symbolic_trace(Net())
        >>> remove_dead_sites(gm), [n.target for n in gm.graph.nodes if n.op != "placeholder"]
        (['unused'], ['fc', 'clamp_', 'output'])
    """
    before = {c.target for c in _candidates(gm) if isinstance(c, Site)}
    gm.graph.eliminate_dead_code(is_impure_node=has_side_effects)
    gm.recompile()
    after = {c.target for c in _candidates(gm) if isinstance(c, Site)}
    return sorted(before - after)


def has_side_effects(node: torch.fx.Node) -> bool:
    """Whether dead-code elimination must keep ``node`` even when nothing reads its result.

    torch.fx keeps placeholders, outputs and known impure functions; it drops
    in-place tensor methods and modules whose result is not assigned, although
    they change a tensor that later nodes read (``h.clamp_(min=0)``,
    ``h.mul_(2)``, ``nn.ReLU(inplace=True)(h)`` on its own line,
    ``torch.mul(x, 2, out=buf)``). Those are kept here: in-place methods and
    functions (a trailing ``_``, as ``torch.relu_``), calls with
    ``inplace=True`` or an ``out=`` tensor, and modules built with
    ``inplace=True``.

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.ReLU(inplace=True))
        >>> [has_side_effects(n) for n in gm.graph.nodes]
        [True, True, True]
    """
    if node.is_impure():
        return True
    if node.op == "call_function" and getattr(node.target, "__name__", "").startswith("_assert"):
        return True  # input checks (torch.fx's _assert_is_none for inputs traced as None, torch._assert)
    if node.op in ("call_method", "call_function"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("__"):  # torch's naming rule for in-place variants
            return True
        if name in ("__setitem__",):
            return True
        if node.kwargs.get("out") is not None:  # torch.mul(x, 2, out=buffer) writes into buffer
            return True
        if node.op == "call_function":
            try:
                normalized = node.normalized_arguments(node.graph.owning_module, normalize_to_only_use_kwargs=True)
            except Exception:  # a signature torch cannot bind
                normalized = None
            kwargs = normalized.kwargs if normalized is not None else node.kwargs
            return kwargs.get("inplace") is True
        return node.kwargs.get("inplace") is True
    if node.op == "call_module" and node.graph.owning_module is not None:
        module = node.graph.owning_module.get_submodule(node.target)
        return getattr(module, "inplace", False) is True
    return False
