"""What a decomposed model keeps of the layers and buffers it replaced: shared modules, buffers a forward
updates, tensors and attributes the caller's code reads on a layer, and reads of a factored layer's weight."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxdeco
from fxdeco.io.apply import FactoredConv2d, FactoredLinear

WIDTH = 24


def _low_rank(n: int = 4, rows: int = 64, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(3, WIDTH, generator=g)
    return [torch.randn(rows, 3, generator=g) @ basis for _ in range(n)]


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


MODES = [pytest.param(False, id="one-shot"), pytest.param(True, id="sequential")]


class _Block(nn.Module):
    def __init__(self, shared: nn.Linear) -> None:
        super().__init__()
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shared(x)


def _shared_stack() -> nn.Module:
    torch.manual_seed(0)
    shared = nn.Linear(WIDTH, WIDTH)
    return nn.Sequential(_Block(shared), _Block(shared)).eval()


@pytest.mark.parametrize("sequential", MODES)
def test_a_module_registered_under_two_names_is_swapped_under_both(sequential: bool) -> None:
    config = fxdeco.Falor(nsr_threshold=0.01, sequential=sequential, show_progress=False)
    graph = fxdeco.transform(_shared_stack(), _low_rank(), config)
    assert any(d.rank for d in graph.meta["fxdeco"].decisions)
    applied = fxdeco.apply(_shared_stack(), graph)
    in_place = fxdeco.decompose_(_shared_stack(), _low_rank(), config)
    x = _low_rank(1, seed=5)[0]
    for model in (applied, in_place):
        assert isinstance(model[0].shared, FactoredLinear) and model[1].shared is model[0].shared
        with torch.no_grad():
            assert _max_difference(model(x), graph(x)) < 1e-6


class _Stateful(nn.Module):
    """A forward that counts its calls and keeps a running average of its output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("average", torch.zeros(WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.fc2(torch.relu(self.fc1(x)))
        self.average.mul_(0.5).add_(0.5 * y.mean(0))
        return y + self.average


def _stateful() -> nn.Module:
    torch.manual_seed(0)
    return _Stateful().eval()


@pytest.mark.parametrize("sequential", MODES)
def test_buffers_a_forward_updates_start_where_the_models_were(sequential: bool) -> None:
    """Calibration runs the forward many times; the decomposed model must not start from the state it left."""
    config = fxdeco.Falor(nsr_threshold=1e-9, sequential=sequential, show_progress=False)  # (near exact)
    x = _low_rank(1, seed=5)[0]
    with torch.no_grad():
        wanted = _stateful()(x)  # the original's first call
    graph = fxdeco.transform(_stateful(), _low_rank(), config)
    in_place = fxdeco.decompose_(_stateful(), _low_rank(), config)
    for model in (graph, in_place, fxdeco.apply(_stateful(), graph)):
        assert float(model.calls) == 0 and float(model.average.abs().max()) == 0
        with torch.no_grad():
            assert _max_difference(model(x), wanted) < 1e-4


class _ScaledLayer(nn.Module):
    """The parent reads a buffer and an attribute that live on the layer it calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 4)
        self.fc.register_buffer("scale", torch.linspace(0.5, 2.0, WIDTH))
        self.fc.alpha = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(x) * self.fc.scale * self.fc.alpha))


def _scaled() -> nn.Module:
    torch.manual_seed(0)
    return _ScaledLayer().eval()


@pytest.mark.parametrize("sequential", MODES)
def test_tensors_and_attributes_read_on_a_layer_go_with_its_factored_form(sequential: bool) -> None:
    config = fxdeco.Falor(nsr_threshold=0.01, sequential=sequential, show_progress=False)
    graph = fxdeco.transform(_scaled(), _low_rank(), config)
    x = _low_rank(1, seed=5)[0]
    for model in (fxdeco.decompose_(_scaled(), _low_rank(), config), fxdeco.apply(_scaled(), graph)):
        assert isinstance(model.fc, FactoredLinear) and model.fc.alpha == 0.5
        assert "fc.scale" in model.state_dict()
        with torch.no_grad():
            assert _max_difference(model(x), graph(x)) < 1e-6


class _ReadsWeightDtype(nn.Module):
    """T5's feed-forward pattern: the forward reads a layer's weight dtype (export capture does not record it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(x)).to(self.fc.weight.dtype))


@pytest.mark.parametrize("sequential", MODES)
def test_a_forward_that_reads_a_decomposed_layers_weight_still_runs(sequential: bool) -> None:
    config = fxdeco.Falor(nsr_threshold=0.01, sequential=sequential, show_progress=False)
    torch.manual_seed(0)
    original = _ReadsWeightDtype().eval()
    graph = fxdeco.transform(original, _low_rank(), config, capture="export")
    model = fxdeco.decompose_(original, _low_rank(), config, capture="export")
    assert isinstance(model.fc, FactoredLinear)
    x = _low_rank(1, seed=5)[0]
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        assert _max_difference(model(x), graph(x)) < 1e-6
    assert any("multiplies its factors into the dense matrix" in str(w.message) for w in caught)


def test_a_factored_layers_weight_is_the_product_of_its_factors() -> None:
    torch.manual_seed(0)
    linear = FactoredLinear(nn.Linear(8, 3, bias=False), nn.Linear(3, 6))
    x = torch.randn(5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(nn.functional.linear(x, linear.weight, linear.bias), linear(x))
        for first, second in ((nn.Conv2d(4, 2, 3, padding=1, bias=False), nn.Conv2d(2, 5, 1)),
                              (nn.Conv2d(4, 2, 1, bias=False), nn.Conv2d(2, 5, 3, padding=1))):
            conv = FactoredConv2d(first, second)
            image = torch.randn(2, 4, 7, 7)
            dense = nn.functional.conv2d(image, conv.weight, conv.bias, padding=1)
            torch.testing.assert_close(dense, conv(image), rtol=1e-5, atol=1e-5)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(16, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.emb(ids))))


def test_a_tied_weight_the_export_graph_keeps_under_one_name_is_not_warned_about() -> None:
    """torch.export keeps a tied weight under one of its names; the model's other name is the same parameter."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 16, (8, 12), generator=g) for _ in range(3)]
    torch.manual_seed(0)
    graph = fxdeco.transform(_Tied().eval(), batches, fxdeco.Falor(nsr_threshold=0.2, show_progress=False),
                             capture="export")
    assert {"emb.weight", "head.weight"} - {n for n, _ in graph.named_parameters(remove_duplicate=False)}
    torch.manual_seed(1)  # another model of the class: its values differ from the graph's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxdeco.apply(_Tied().eval(), graph)
    assert not [w for w in caught if "not in the decomposed graph" in str(w.message)]
