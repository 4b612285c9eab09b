"""Shape and cost analysis: output shape, parameters and MACs of every node.

MACs (multiply-accumulates) are counted for the linear-algebra operations that
dominate inference cost: Linear, convolutions, matrix products and attention.
Element-wise operations and normalisations are not counted (fvcore counts
norms as a few FLOPs per element; that is well under 1% on CNNs/ViTs).
Nodes no per-node rule covers (leaf modules, autowrapped functions, einsum,
...) are run under a dispatch mode that applies the same rules to the aten ops
they execute, so code the graph does not see into is counted too.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class NodeCost:
    """What one node produced and cost, for one call of the graph."""

    shape: Any  # torch.Size, a list of them for tuple outputs, or None
    params: int
    macs: int


def _numel(x: Any) -> int:
    return x.numel() if isinstance(x, torch.Tensor) else 0


def _conv_macs(out: torch.Tensor, weight: torch.Tensor) -> int:
    return _numel(out) * math.prod(weight.shape[1:])


def _linear_macs(out: torch.Tensor, weight: torch.Tensor) -> int:
    return _numel(out) * weight.shape[-1]


def _matmul_macs(a: torch.Tensor, out: torch.Tensor) -> int:
    return _numel(out) * (a.shape[-1] if a.dim() > 0 else 1)


def _attention_macs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    # scores Q Kᵀ: (..., L, S) with E-long dots; weights @ V: (..., L, Ev) with S-long dots
    batch = math.prod(q.shape[:-2])
    length, source = q.shape[-2], k.shape[-2]
    return batch * length * source * (q.shape[-1] + v.shape[-1])


LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, aten.linear.default}
CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, aten.conv1d.default,
                  aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding, aten.conv2d.padding,
                  aten.conv3d.padding}
TRANSPOSED_CONV_FUNCTIONS = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, aten.conv_transpose1d.default,
                             aten.conv_transpose2d.input, aten.conv_transpose3d.input}
MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm, torch.mm, aten.matmul.default, aten.bmm.default,
                    aten.mm.default}
ADDMM_FUNCTIONS = {torch.addmm, aten.addmm.default, torch.baddbmm, aten.baddbmm.default}
# The fused CPU/GPU kernels F.scaled_dot_product_attention dispatches to all take (query, key, value, ...).
ATTENTION_FUNCTIONS = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default,
                       aten._scaled_dot_product_flash_attention_for_cpu.default,
                       aten._scaled_dot_product_flash_attention.default,
                       aten._scaled_dot_product_efficient_attention.default}
COUNTED_FUNCTIONS = (LINEAR_FUNCTIONS | CONV_FUNCTIONS | TRANSPOSED_CONV_FUNCTIONS | MATMUL_FUNCTIONS | ADDMM_FUNCTIONS
                     | ATTENTION_FUNCTIONS | {aten.convolution.default})
# (embedding lookups compute no products; counted here, they also stay out of the aten-level counter, under which
# torch.embedding imports torch._dynamo: 1.5 s the first time in a process)
COUNTED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                   nn.ConvTranspose3d, nn.MultiheadAttention, nn.Embedding, nn.EmbeddingBag)
COUNTED_METHODS = {"matmul", "bmm", "mm", "__matmul__"}
# Python operators that compute no matrix products (operator.matmul is among MATMUL_FUNCTIONS): no need to watch
# them at aten level (indexing a Parameter under the aten-level counter imports torch._dynamo, about 1 s)
PRODUCT_FREE_FUNCTIONS = {getattr(operator, name) for name in (
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "eq", "ne", "lt", "le", "gt",
    "ge", "and_", "or_", "xor", "invert", "not_", "iadd", "isub", "imul", "itruediv")} | {getattr}


def _get(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs[name]


def _function_macs(fn: Any, args: tuple, kwargs: dict, out: Any) -> int:
    if fn in LINEAR_FUNCTIONS:
        return _linear_macs(out, _get(args, kwargs, 1, "weight"))
    if fn in CONV_FUNCTIONS:
        return _conv_macs(out, _get(args, kwargs, 1, "weight"))
    if fn is aten.convolution.default:
        if args[6]:  # transposed: every input value meets a (out/groups, k...) slice of the weight
            return _numel(args[0]) * math.prod(args[1].shape[1:])
        return _conv_macs(out, args[1])
    if fn in TRANSPOSED_CONV_FUNCTIONS:
        return _numel(args[0]) * math.prod(args[1].shape[1:])
    if fn in MATMUL_FUNCTIONS:
        return _matmul_macs(args[0], out)
    if fn in ADDMM_FUNCTIONS:
        return _matmul_macs(args[1], out)
    if fn in ATTENTION_FUNCTIONS:
        return _attention_macs(_get(args, kwargs, 0, "query"), _get(args, kwargs, 1, "key"),
                               _get(args, kwargs, 2, "value"))
    return 0


class _MacCounter(TorchDispatchMode):
    """Count the MACs of the aten ops run inside a node the graph does not see into.

    Leaf modules (timm's no-trace registry) and autowrapped functions
    (torchvision's ``shifted_window_attention``) hide their Linear layers and
    matrix products from the graph; without this, ``graph_macs`` undercounts such
    models (swin_t: by two thirds). The same per-op rules apply at aten level.
    """

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.macs += _function_macs(func, args, kwargs, out)
        return out


def _module_macs(mod: nn.Module, args: tuple, out: Any) -> int:
    if isinstance(mod, nn.Linear):
        return _linear_macs(out, mod.weight)
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _conv_macs(out, mod.weight)
    if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return _numel(args[0]) * math.prod(mod.weight.shape[1:])
    if isinstance(mod, nn.MultiheadAttention) and isinstance(out, tuple):
        q, k, v = args[:3]
        if not mod.batch_first:  # (L, N, E) -> treat as (N, L, E)
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        e = mod.embed_dim
        projections = (q.numel() + k.numel() + v.numel() + _numel(out[0])) * e  # rows * e * e each
        heads = mod.num_heads
        q4 = q.reshape(*q.shape[:-1], heads, e // heads).transpose(-2, -3)
        k4 = k.reshape(*k.shape[:-1], heads, e // heads).transpose(-2, -3)
        return projections + _attention_macs(q4, k4, k4)
    return 0


def _shape(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, (tuple, list)):
        return [_shape(v) for v in x]
    return None


class CostProp(torch.fx.Interpreter):
    """Run the graph once and record ``node.meta["cost"]`` (a :class:`NodeCost`).

    Example:
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(8, 4), nn.ReLU()))
        >>> _ = CostProp(gm).run(torch.randn(2, 8))
        >>> graph_macs(gm)
        64
    """

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            if self._counted(n):
                out = super().run_node(n)
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                macs = self._macs(n, args, kwargs, out)
            else:  # a node no rule covers may still hide matrix products: count them at aten level
                with _MacCounter() as counter:
                    out = super().run_node(n)
                macs = counter.macs
            n.meta["cost"] = NodeCost(_shape(out), self._params(n), macs)
        except Exception as exc:
            raise RuntimeError(f"cost analysis failed at node {n.format_node()}: {exc}") from exc
        return out

    def _counted(self, n: torch.fx.Node) -> bool:
        """True when a per-node rule gives the node's MACs (or it computes nothing)."""
        if n.op == "call_module":
            return isinstance(self.module.get_submodule(n.target), COUNTED_MODULES)
        if n.op == "call_function":
            return n.target in COUNTED_FUNCTIONS or n.target in PRODUCT_FREE_FUNCTIONS
        if n.op == "call_method":
            return n.target in COUNTED_METHODS
        return True

    def _params(self, n: torch.fx.Node) -> int:
        if n.op == "call_module":
            return sum(p.numel() for p in self.module.get_submodule(n.target).parameters())
        if n.op == "get_attr":
            attr = self.fetch_attr(n.target)
            return attr.numel() if isinstance(attr, nn.Parameter) else 0
        return 0

    def _macs(self, n: torch.fx.Node, args: tuple, kwargs: dict, out: Any) -> int:
        if n.op == "call_module":
            return _module_macs(self.module.get_submodule(n.target), args, out)
        if n.op == "call_function":
            return _function_macs(n.target, args, kwargs, out)
        if n.op == "call_method" and n.target in COUNTED_METHODS:
            return _matmul_macs(args[0], out)
        return 0


def graph_macs(gm: torch.fx.GraphModule) -> int:
    """Total MACs recorded by the last :class:`CostProp` run on ``gm``."""
    return sum(n.meta["cost"].macs for n in gm.graph.nodes if "cost" in n.meta)

