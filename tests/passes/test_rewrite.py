"""passes.rewrite: ``factorize_sites`` turns each planned site into two smaller layers installed at the layer's
own name; exact factors give the dense layer's outputs, and a bad plan changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdeco
from passes import Factorization, export_capture, factorize_sites, find_sites
from passes.rewrite import FACTOR_ROLE, FACTORED, FactoredLayer
from passes.sites import Site, fetch_attr


# ----------------------------------------------------------------------------- moved from test_bad_input.py


def test_factorize_sites_rejects_a_bad_plan_before_rewriting() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    gm = fxdeco.trace(model)
    sites, _ = find_sites(gm)
    code, state = gm.code, copy.deepcopy(gm.state_dict())
    plan = {"0": Factorization(torch.randn(2, 8), torch.randn(8, 2)),  # fine
            "2": Factorization(torch.randn(2, 7), torch.randn(8, 2))}  # wrong first factor
    with pytest.raises(ValueError, match="'2'.*do not fit its weight"):
        factorize_sites(gm, sites, plan)
    with pytest.raises(KeyError, match="not sites of this graph"):
        factorize_sites(gm, sites, {"nope": plan["0"]})
    assert gm.code == code
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())


# ----------------------------------------------------------------------------- new


def svd_factors(site: Site, weight: torch.Tensor, rank: int) -> Factorization:
    """The best rank-``rank`` factors of the weight: ``first = S Vᵀ`` (reshaped like the kernel), ``second = U``."""
    w = weight.detach().to(torch.float64)
    w = (w.T if site.weight_transposed else w).reshape(site.out_features, site.in_features)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    first = (s[:rank, None] * vh[:rank]).reshape(rank, *site.weight_shape[1:]) if site.kind == "conv2d" else \
        s[:rank, None] * vh[:rank]
    return Factorization(first.to(weight.dtype), u[:, :rank].contiguous().to(weight.dtype))


LAYERS: dict[str, tuple[nn.Module, tuple[int, ...]]] = {
    "linear": (nn.Linear(12, 7), (3, 5, 12)),
    "linear-no-bias": (nn.Linear(6, 9, bias=False), (4, 6)),
    "conv": (nn.Conv2d(3, 8, 3, padding=1), (2, 3, 7, 7)),
    "conv-strided-dilated": (nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(2, 0), dilation=(2, 1)), (2, 4, 9, 8)),
    "conv-same": (nn.Conv2d(3, 5, 3, padding="same", dilation=2, bias=False), (2, 3, 6, 6)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_full_rank_svd_factors_reproduce_the_dense_layer(name: str) -> None:
    layer, shape = LAYERS[name]
    model = nn.Sequential(copy.deepcopy(layer)).double()
    gm = torch.fx.symbolic_trace(model)
    sites, _ = find_sites(gm)
    (site,) = sites
    plan = {"0": svd_factors(site, fetch_attr(gm, site.weight), site.full_rank)}
    code = gm.code
    new = factorize_sites(gm, sites, plan)
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(new(x), model(x), rtol=1e-10, atol=1e-10)
    assert gm.code == code and isinstance(gm.get_submodule("0"), type(layer)), "the input graph is never modified"
    # Two layers installed at the layer's own name; the bias (if any) on the second.
    assert [n.target for n in new.graph.nodes if n.op == "call_module"] == ["0.0", "0.1"]
    bias = ["0.1.bias"] if layer.bias is not None else []
    assert list(new.state_dict()) == ["0.0.weight", "0.1.weight", *bias]
    first, second = new.get_submodule("0.0"), new.get_submodule("0.1")
    assert first.bias is None and first.weight.dtype == second.weight.dtype == torch.float64
    if site.kind == "conv2d":
        assert (first.kernel_size, first.stride, first.padding, first.dilation) == \
            (layer.kernel_size, layer.stride, layer.padding, layer.dilation)
        assert second.kernel_size == (1, 1)


def test_a_truncated_svd_is_exact_on_a_weight_of_that_rank() -> None:
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(8, 3, dtype=torch.float64) @ torch.randn(3, 10, dtype=torch.float64))
    gm = torch.fx.symbolic_trace(model)
    sites, _ = find_sites(gm)
    new = factorize_sites(gm, sites, {"0": svd_factors(sites[0], model[0].weight, 3)})
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(new(x), model(x), rtol=1e-10, atol=1e-10)
    assert isinstance(new.get_submodule("2"), nn.Linear), "sites outside the plan stay dense"
    assert sum(p.numel() for p in new.parameters()) == 3 * (10 + 8) + 8 + 8 * 6 + 6
    (second,) = [n for n in new.graph.nodes if FACTORED in n.meta]
    assert second.args[0].meta[FACTOR_ROLE] == "first"
    assert second.meta[FACTORED] == FactoredLayer(target="0", kind="linear", weight_shape=(8, 10), rank=3,
                                                  full_rank=8, params_before=8 * 10 + 8, params_after=3 * 18 + 8)


def test_a_given_bias_replaces_the_layer_bias_and_meta_is_recorded() -> None:
    model = nn.Sequential(nn.Linear(5, 4)).double()
    gm = torch.fx.symbolic_trace(model)
    sites, _ = find_sites(gm)
    fact = svd_factors(sites[0], model[0].weight, 4)
    fact.bias = torch.arange(4, dtype=torch.float64)
    fact.meta = {"nsr": 0.25, "method": "test"}
    new = factorize_sites(gm, sites, {"0": fact})
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(new(x), F.linear(x, model[0].weight) + torch.arange(4.0, dtype=torch.float64))
    info = next(n.meta[FACTORED] for n in new.graph.nodes if FACTORED in n.meta)
    assert info.method_meta == {"nsr": 0.25, "method": "test"} and info.rank == 4 and info.decomposed


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.fc(x)))


def test_a_layer_called_twice_shares_one_pair_of_factors() -> None:
    model = _Twice().double()
    gm = torch.fx.symbolic_trace(model)
    sites, _ = find_sites(gm)
    assert len(sites) == 2
    new = factorize_sites(gm, sites, {"fc": svd_factors(sites[0], model.fc.weight, 6)})
    assert [n.target for n in new.graph.nodes if n.op == "call_module"] == ["fc.0", "fc.1", "fc.0", "fc.1"]
    assert len(list(new.parameters())) == 3  # one pair of factors and the bias, not two
    x = torch.randn(2, 6, dtype=torch.float64)
    torch.testing.assert_close(new(x), model(x), rtol=1e-10, atol=1e-10)


def test_export_graph_sites_are_rewritten_and_their_weights_dropped() -> None:
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    gm = export_capture(model, (x,))
    sites, _ = find_sites(gm)
    plan = {s.target: svd_factors(s, fetch_attr(gm, s.weight), s.full_rank) for s in sites}
    assert set(plan) == {"0", "2"}
    new = factorize_sites(gm, sites, plan)
    for batch in (x, torch.randn(5, 8, dtype=torch.float64)):  # the batch size stays dynamic
        torch.testing.assert_close(new(batch), model(batch), rtol=1e-10, atol=1e-10)
    assert not [n for n in new.graph.nodes if n.op == "get_attr"], "the dense weights are no longer read"
    assert sorted(new.state_dict()) == ["0.0.weight", "0.1.bias", "0.1.weight", "2.0.weight", "2.1.bias",
                                        "2.1.weight"]


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_factors_keep_the_dense_layers_trainable_flags(capture: str) -> None:
    """A frozen layer's factors stay frozen, a trainable one's stay trainable, and a trainable bias on a frozen
    weight (BitFit) stays trainable: a fine-tune after decomposition trains what the caller trained."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model[0].requires_grad_(False)
    model[2].weight.requires_grad_(False)
    x = torch.randn(4, 8)
    gm = export_capture(model, (x,)) if capture == "export" else fxdeco.trace(model)
    sites, _ = find_sites(gm)
    plan = {s.target: svd_factors(s, fetch_attr(gm, s.weight), 2) for s in sites}
    new = factorize_sites(gm, sites, plan)
    flags = {name: p.requires_grad for name, p in new.named_parameters()}
    first = {s.target: next(n for n in flags if n.startswith(f"{s.target}.") and n.endswith(".0.weight"))
             for s in sites}
    assert len(set(first.values())) == 3, flags
    assert flags[first[sites[0].target]] is False and flags[first[sites[2].target]] is True
    assert flags[first[sites[1].target]] is False
    # the layer whose bias alone was trainable: its second factor's bias is trainable, its weights are not
    second_bias = next(n for n in flags if n.startswith(sites[1].target) and n.endswith(".1.bias"))
    assert flags[second_bias] is True
    assert not flags[second_bias.replace(".bias", ".weight")]
