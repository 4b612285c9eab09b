"""passes.graph_view: an FX graph as a networkx DiGraph, with each node's op, target, shape and block scope."""

from __future__ import annotations

import torch
from torch import nn

import fxdeco
from passes import CostProp, export_capture
from passes.graph_view import to_networkx
from tests.models import Net


# ----------------------------------------------------------------------------- moved from test_dump.py


def test_scopes_agree_between_graph_flavours() -> None:
    model = Net().eval()
    symbolic = to_networkx(fxdeco.trace(model))
    exported = to_networkx(fxdeco.trace(model, torch.randn(2, 3, 8, 8), capture="export"))
    assert symbolic.graph["scopes"] == exported.graph["scopes"] == {"blocks.0": "Block", "blocks.1": "Block"}


def test_scope_from_module_path_without_stack() -> None:
    gm = fxdeco.trace(Net())
    for n in gm.graph.nodes:
        n.meta.pop("nn_module_stack", None)
    graph = to_networkx(gm)
    assert graph.nodes["blocks_1_conv"]["scope"] == ("blocks.1",)
    assert graph.nodes["stem"]["scope"] == ()


# ----------------------------------------------------------------------------- new


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) * 2


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.inner(x)) + x


class Nested(nn.Module):
    """Two ``Outer`` blocks (5 nodes each), each holding an ``Inner`` block (3 nodes), and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Outer(), Outer()])
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_one_networkx_node_per_fx_node_and_one_edge_per_dependency() -> None:
    gm = torch.fx.symbolic_trace(Nested())
    g = to_networkx(gm)
    assert list(g.nodes) == [n.name for n in gm.graph.nodes]
    assert g.number_of_nodes() == 13
    # 12 chained dependencies plus the two residual inputs of the adds
    assert g.number_of_edges() == sum(len(n.all_input_nodes) for n in gm.graph.nodes) == 14
    assert sorted(g.successors("x")) == ["add", "layers_0_inner_fc"]
    attrs = {n: (a["op"], a["target"], a["module_type"], a["index"]) for n, a in g.nodes(data=True)}
    assert attrs["x"] == ("placeholder", "x", None, 0)
    assert attrs["layers_0_inner_fc"] == ("call_module", "layers.0.inner.fc", "Linear", 1)
    assert attrs["relu"] == ("call_function", "torch.relu", None, 2)
    assert attrs["mul"] == ("call_function", "mul", None, 3)  # operators read as their plain name
    assert attrs["output"][0] == "output"


def test_scopes_nest_blocks_up_to_max_depth_and_drop_small_ones() -> None:
    gm = torch.fx.symbolic_trace(Nested())
    g = to_networkx(gm)
    assert g.graph["scopes"] == {"layers.0": "Outer", "layers.0.inner": "Inner", "layers.1": "Outer",
                                 "layers.1.inner": "Inner"}
    assert g.nodes["relu_1"]["scope"] == ("layers.1", "layers.1.inner")
    assert g.nodes["relu_1"]["module"] == "layers.1.inner"
    assert g.nodes["add"]["scope"] == ("layers.0",) and g.nodes["head"]["scope"] == ()
    shallow = to_networkx(gm, max_depth=1)
    assert shallow.graph["scopes"] == {"layers.0": "Outer", "layers.1": "Outer"}
    assert shallow.nodes["relu_1"]["scope"] == ("layers.1",)
    # Inner blocks hold 3 nodes and Outer ones 5: a threshold between them keeps only the Outer boxes
    assert to_networkx(gm, min_block_nodes=4).graph["scopes"] == {"layers.0": "Outer", "layers.1": "Outer"}
    assert to_networkx(gm, min_block_nodes=6).graph["scopes"] == {}


def test_shapes_come_from_the_cost_pass_or_export() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    gm = torch.fx.symbolic_trace(model)
    assert all(a["shape"] is None for _, a in to_networkx(gm).nodes(data=True))
    CostProp(gm).run(torch.randn(5, 4))
    shapes = {n: a["shape"] for n, a in to_networkx(gm).nodes(data=True)}
    assert shapes == {"input_1": (5, 4), "_0": (5, 3), "_1": (5, 3), "output": (5, 3)}
    exported = to_networkx(export_capture(model, (torch.randn(5, 4),)))
    linear = next(a for _, a in exported.nodes(data=True) if a["target"] == "aten.linear.default")
    batch, features = linear["shape"]
    assert isinstance(batch, str) and features == 3, "dynamic dimensions keep their symbol's name"
    assert linear["module"] == "0" and linear["module_type"] is None
