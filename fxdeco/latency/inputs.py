"""What each site receives on a real call: its input's shape, dtype, device and memory format.

A layer's speed depends on its input (rows of a Linear, image size of a
Conv2d), so latency is measured at the shapes an example batch produces. One
run of the graph through a small :class:`torch.fx.Interpreter` records them;
the GraphModule is not changed (it runs in eval mode, each module's own mode
restored after; a graph from ``torch.export`` has its train/eval behaviour
fixed in the graph already).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx

from fxdeco.batches import as_call
from fxdeco.modes import modes_restored
from passes.inputs import flatten_inputs
from passes.sites import Site, site_input

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SiteInput:
    """The input one site node received: shape, dtype, device, and whether it was channels-last (4-d only)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    channels_last: bool = False


def _describe(value: torch.Tensor) -> SiteInput:
    channels_last = (value.dim() == 4 and not value.is_contiguous()
                     and value.is_contiguous(memory_format=torch.channels_last))
    return SiteInput(tuple(value.shape), value.dtype, value.device, channels_last)


class _SiteInputRecorder(torch.fx.Interpreter):
    """Runs the graph, noting the input of every node named in ``wanted`` just before it runs."""

    def __init__(self, gm: torch.fx.GraphModule, wanted: Iterable[str]) -> None:
        super().__init__(gm)
        self.wanted = set(wanted)
        self.found: dict[str, SiteInput] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name in self.wanted:
            x = site_input(n)
            value = self.env.get(x) if isinstance(x, torch.fx.Node) else x
            if isinstance(value, torch.Tensor):
                self.found[n.name] = _describe(value)
        try:
            return super().run_node(n)
        except Exception as exc:
            raise RuntimeError(f"running the example input through the graph failed at node "
                               f"{n.format_node()}: {type(exc).__name__}: {exc}") from exc


def site_inputs(gm: torch.fx.GraphModule, sites: Iterable[Site], example: Any, *,
                flat_inputs: list[Any] | None = None) -> dict[str, SiteInput]:
    """The input of every site node (by ``Site.node``) when ``gm`` runs on ``example``.

    ``example`` is a batch as calibration takes it: a tensor (the positional
    input), a tuple/list (the positional inputs) or a dict (the keyword inputs);
    or ``flat_inputs``, the placeholder values (``passes.inputs.flatten_inputs``), with ``example`` None.

    Example:
        >>> from torch import nn
        >>> from passes.sites import find_sites
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)))
        >>> sites, _ = find_sites(gm)
        >>> {name: found.shape for name, found in site_inputs(gm, sites, torch.randn(5, 3, 8, 8)).items()}
        {'_0': (5, 3, 8, 8), '_2': (5, 144)}
    """
    sites = list(sites)
    if flat_inputs is None:
        args, kwargs = as_call(example)
        flat_inputs = flatten_inputs(gm, args, kwargs)
    wanted = [s.node for s in sites]
    with torch.inference_mode(), modes_restored(gm):
        for module in gm.modules():  # eval mode; not gm.eval(), which torch.export's graphs refuse
            module.training = False
        found = _shapes_without_compute(gm, wanted, flat_inputs)
        if found is None:
            recorder = _SiteInputRecorder(gm, wanted)
            recorder.run(*flat_inputs)
            found = recorder.found
    return found


def _shapes_without_compute(gm: torch.fx.GraphModule, wanted: list[str], flat: list[Any]) -> dict[str, SiteInput] | None:
    """The site inputs from a run on fake tensors (shapes and dtypes only, no arithmetic: a large batch through a
    large model costs milliseconds), or None when some op of the graph cannot run on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode:
            fake = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in flat]
            recorder = _SiteInputRecorder(gm, wanted)
            recorder.run(*fake)
    except Exception as exc:  # data-dependent control flow, an op without a fake kernel: run it for real
        log.debug("shapes on fake tensors failed (%s); running the example batch", exc)
        return None
    return recorder.found
