"""Stand-in layers to time: the dense layer a key describes, and its factored form at a rank.

Only the geometry matters for speed, so the layers get random weights (of the
key's dtype, on the device) and the factored form is built by the very
function the rewrite uses (:func:`passes.rewrite.factored_module`): what is
timed is what a decomposed model runs. With ``backend="inductor"`` each layer
is compiled by ``torch.compile`` as its own function, so that compiling many
shapes never reaches Dynamo's recompile limit of one code object.
"""

from __future__ import annotations

import itertools
import math
import types
from collections.abc import Callable

import torch
from torch import nn

from fxdeco.latency.table import LatencyKey
from passes.rewrite import Factorization, factored_module
from passes.sites import Site

_compiled = itertools.count()


def site_of(key: LatencyKey) -> Site:
    """A :class:`~passes.sites.Site` with the key's layer geometry (names are placeholders).

    Example:
        >>> key = LatencyKey("cpu:x", "2.5", "float32", 1, "eager", "conv2d", (8, 3, 3, 3), (2, 3, 16, 16))
        >>> site_of(key).in_features, site_of(key).full_rank
        (27, 8)
    """
    return Site("latency_probe", key.kind, "latency_probe", "latency_probe.weight",
                "latency_probe.bias" if key.bias else None, key.weight_shape,
                key.stride, key.padding, key.dilation)


def dense_layer(key: LatencyKey, device: torch.device | str = "cpu") -> nn.Module:
    """The layer ``key`` describes, with random weights, in eval mode.

    Example:
        >>> key = LatencyKey("cpu:x", "2.5", "float32", 1, "eager", "linear", (4, 3), (2, 3), bias=False)
        >>> dense_layer(key)
        Linear(in_features=3, out_features=4, bias=False)
    """
    like = {"dtype": _dtype(key), "device": device}
    if key.kind == "linear":
        out_features, in_features = key.weight_shape
        layer: nn.Module = nn.Linear(in_features, out_features, bias=key.bias, **like)
    else:
        out_channels, in_channels, kh, kw = key.weight_shape
        layer = nn.Conv2d(in_channels, out_channels, (kh, kw), stride=key.stride, padding=key.padding,
                          dilation=key.dilation, bias=key.bias, **like)
    return _formatted(layer, key).eval()


def factored_layer(key: LatencyKey, rank: int, device: torch.device | str = "cpu") -> nn.Module:
    """The factored form of the layer ``key`` describes at ``rank`` (two layers, random factors), in eval mode.

    Example:
        >>> key = LatencyKey("cpu:x", "2.5", "float32", 1, "eager", "linear", (4, 3), (2, 3))
        >>> factored_layer(key, 2)
        Sequential(
          (0): Linear(in_features=3, out_features=2, bias=False)
          (1): Linear(in_features=2, out_features=4, bias=True)
        )
    """
    site = site_of(key)
    like = {"dtype": _dtype(key), "device": device}
    # scaled so activations stay near 1 (no overflow in float16, no denormals)
    first = torch.randn(rank, *site.weight_shape[1:], **like) / math.sqrt(site.in_features)
    second = torch.randn(site.out_features, rank, **like) / math.sqrt(rank)
    bias = torch.zeros(site.out_features, **like) if key.bias else None
    module = factored_module(site, Factorization(first, second), first, bias)
    return _formatted(module, key).eval()


def example_input(key: LatencyKey, device: torch.device | str = "cpu") -> torch.Tensor:
    """A random input of the key's shape, dtype and memory format.

    Example:
        >>> key = LatencyKey("cpu:x", "2.5", "float32", 1, "eager", "linear", (4, 3), (2, 5, 3))
        >>> example_input(key).shape
        torch.Size([2, 5, 3])
    """
    x = torch.randn(key.input_shape, dtype=_dtype(key), device=device)
    return x.contiguous(memory_format=torch.channels_last) if key.channels_last else x


def runner(layer: nn.Module, x: torch.Tensor, backend: str) -> Callable[[], object]:
    """A no-argument callable running ``layer`` on ``x``, compiled by ``torch.compile`` when ``backend="inductor"``.

    Example:
        >>> run = runner(torch.nn.Linear(3, 2), torch.ones(4, 3), "eager")
        >>> run().shape
        torch.Size([4, 2])
    """
    if backend == "eager":
        return lambda: layer(x)
    if backend != "inductor":
        raise ValueError(f"backend must be 'eager' or 'inductor', got {backend!r}")

    def call(x: torch.Tensor) -> torch.Tensor:
        return layer(x)

    # Dynamo caches compiled graphs per code object and stops compiling one after 8 shapes; a code object of
    # its own per layer keeps every layer compiled, and its cache goes with it
    code = call.__code__.replace(co_name=f"fxdeco_latency_{next(_compiled)}")
    fresh = types.FunctionType(code, call.__globals__, code.co_name, call.__defaults__, call.__closure__)
    compiled = torch.compile(fresh, backend="inductor", dynamic=False)
    return lambda: compiled(x)


def _dtype(key: LatencyKey) -> torch.dtype:
    dtype = getattr(torch, key.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"unknown dtype {key.dtype!r} in latency key")
    return dtype


def _formatted(module: nn.Module, key: LatencyKey) -> nn.Module:
    return module.to(memory_format=torch.channels_last) if key.channels_last else module
