"""Where fxdeco reads what a rewrite recorded on a graph's nodes: one reader per record, one writer.

``passes.rewrite`` (and ``passes.chains``) record each factored layer on its
last node under the neutral key ``passes.rewrite.FACTORED`` (target, kind,
weight shape, rank, full rank, params before/after, plus the method's
metadata) and mark the first factor's node with ``FACTOR_ROLE``. The report,
the dumps, save/load and the compile backend read them only through here.

Example:
    >>> import torch, fxdeco
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> small = fxdeco.transform(model, [torch.randn(64, 4) @ torch.randn(4, 32) for _ in range(3)],
    ...                          nsr_threshold=0.01)
    >>> [(layer_record(n)["target"], layer_record(n)["rank"] < 32) for n in factored_nodes(small)]
    [('0', True)]
"""

from __future__ import annotations

from typing import Any

import torch.fx

from passes.rewrite import FACTOR_ROLE, FACTORED


def layer_record(node: torch.fx.Node) -> dict[str, Any] | None:
    """The record of the layer whose last node is ``node`` (decomposed or, for lockd, kept dense), or None."""
    return node.meta.get(FACTORED)


def factored_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The last node of every factored layer call, in graph order (a layer called twice appears twice)."""
    return [n for n in gm.graph.nodes if (layer_record(n) or {}).get("rank") is not None]


def is_first_factor(node: torch.fx.Node) -> bool:
    """Whether ``node`` runs the first factor of a factored layer."""
    return node.meta.get(FACTOR_ROLE) == "first"


def mark_layer(node: torch.fx.Node, record: dict[str, Any]) -> None:
    """Record a layer on its last node (lockd notes the layers it keeps dense, with ``rank`` None)."""
    node.meta[FACTORED] = dict(record)
