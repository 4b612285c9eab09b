"""passes.chains: a parallel chain of modules beside a node (inserted, then removed again), and sites replaced
by chains of any length installed at the layer's own name."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from passes import find_sites
from passes.chains import insert_parallel_chain, remove_parallel_chain, replace_sites_with_chains


class _Add(nn.Module):
    def forward(self, original: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return original + other


def test_a_parallel_chain_is_merged_into_the_node_users_and_removed_again() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).double()
    gm = torch.fx.symbolic_trace(copy.deepcopy(model))
    side0, side1 = nn.Linear(4, 3).double(), nn.Linear(3, 4).double()
    gm.add_submodule("side0", side0)
    gm.add_submodule("side1", side1)
    gm.add_submodule("merge", _Add())
    fc = next(n for n in gm.graph.nodes if n.target == "0")
    merged = insert_parallel_chain(gm, fc, ["side0", "side1"], "merge", role="tap")
    gm.recompile()
    x = torch.randn(5, 4, dtype=torch.float64)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "side0", "side1", "merge", "1"]
    assert [n.target for n in gm.graph.nodes if n.meta.get("chain_role") == "tap"] == ["side0", "side1", "merge"]
    assert list(fc.users) == [merged] and merged.args[0] is fc, "the node's only user is the merge"
    torch.testing.assert_close(gm(x), torch.relu(model[0](x) + side1(side0(x))))  # the chain reads the node's input

    assert remove_parallel_chain(gm, merged) is fc
    gm.recompile()
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]
    assert not any(n.meta.get("chain_role") for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x))


def test_sites_replaced_by_chains_compute_what_the_chain_computes() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    gm = torch.fx.symbolic_trace(model)
    sites, _ = find_sites(gm)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    chain = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Tanh(), nn.Linear(6, 5)).double()
    with torch.no_grad():  # a chain of three modules, not the rewrite's two factors
        chain[0].weight.copy_(q)
        chain[2].weight.copy_(model[0].weight @ q.T)
        chain[2].bias.copy_(model[0].bias)
    code = gm.code
    new = replace_sites_with_chains(gm, sites, {"0": chain})
    assert gm.code == code and isinstance(gm.get_submodule("0"), nn.Linear), "the input graph is not modified"
    assert [n.target for n in new.graph.nodes if n.op == "call_module"] == ["0.0", "0.1", "0.2", "1", "2"]
    assert sorted(new.state_dict()) == ["0.0.weight", "0.2.bias", "0.2.weight", "2.bias", "2.weight"]
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = model[2](torch.relu(chain(x)))
    torch.testing.assert_close(new(x), expected)
    with pytest.raises(KeyError, match=r"not sites of this graph: \['nope'\]"):
        replace_sites_with_chains(gm, sites, {"nope": chain})


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc(x)))


def test_a_layer_called_twice_calls_one_installed_chain_twice() -> None:
    model = _Twice().double()
    gm = torch.fx.symbolic_trace(model)
    sites, _ = find_sites(gm)
    chain = nn.Sequential(nn.Identity(), copy.deepcopy(model.fc))
    new = replace_sites_with_chains(gm, sites, {"fc": chain})
    assert [n.target for n in new.graph.nodes if n.op == "call_module"] == ["fc.0", "fc.1", "fc.0", "fc.1"]
    assert sorted(new.state_dict()) == ["fc.1.bias", "fc.1.weight"]
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(new(x), model(x))
