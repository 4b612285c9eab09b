"""passes.sites: which nodes are decomposable sites (Linear / Conv2d with a constant weight, in every form a
graph records them), which are skipped and why, and dead-site removal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from passes import GraphTracer, export_capture, find_sites, remove_dead_sites


# ----------------------------------------------------------------------------- moved from test_properties.py


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_export_string_padding_conv_is_a_site(padding: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, (3, 3), padding=padding))
    gm = export_capture(model, (torch.randn(2, 3, 8, 8),))
    sites, skipped = find_sites(gm)
    assert [s.target for s in sites] + [k.target for k in skipped] == ["0"]


# ----------------------------------------------------------------------------- new


class _Functional(nn.Module):
    """F.linear, F.conv2d and both addmm layouts (``W.t()`` of an (out, in) weight, and an (in, out) matrix)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_w, self.conv_b = nn.Parameter(torch.randn(6, 3, 3, 2)), nn.Parameter(torch.randn(6))
        self.fc_w = nn.Parameter(torch.randn(5, 6))
        self.mm_w, self.mm_b = nn.Parameter(torch.randn(4, 5)), nn.Parameter(torch.randn(4))
        self.kn_w, self.kn_b = nn.Parameter(torch.randn(4, 7)), nn.Parameter(torch.randn(7))  # stored (in, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.conv_w, self.conv_b, stride=2, padding=1, dilation=1).mean((2, 3))
        x = F.linear(x, self.fc_w)
        x = torch.addmm(self.mm_b, x, self.mm_w.t())
        return torch.addmm(self.kn_b, x, self.kn_w)


def test_functional_and_addmm_forms_are_sites() -> None:
    gm = torch.fx.symbolic_trace(_Functional())
    sites, skipped = find_sites(gm)
    assert skipped == []
    got = [(s.kind, s.target, s.weight, s.bias, s.weight_shape, s.weight_transposed) for s in sites]
    assert got == [
        ("conv2d", "conv_w_lowrank", "conv_w", "conv_b", (6, 3, 3, 2), False),
        ("linear", "fc_w_lowrank", "fc_w", None, (5, 6), False),
        ("linear", "mm_w_lowrank", "mm_w", "mm_b", (4, 5), False),
        ("linear", "kn_w_lowrank", "kn_w", "kn_b", (7, 4), True),  # shape as (out, in), whatever the storage
    ]
    conv = sites[0]
    assert (conv.stride, conv.padding, conv.dilation) == (2, 1, 1)
    assert (conv.out_features, conv.in_features, conv.full_rank) == (6, 3 * 3 * 2, 6)


def test_module_sites_record_their_geometry() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
                          nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 4, 6, 6))
    gm = torch.fx.symbolic_trace(model)
    sites, skipped = find_sites(gm)
    assert skipped == []
    conv, fc = sites
    assert (conv.kind, conv.target, conv.weight, conv.bias) == ("conv2d", "0", "0.weight", "0.bias")
    assert (conv.stride, conv.padding, conv.dilation) == ((2, 1), (1, 2), (1, 2))
    assert (fc.kind, fc.target, fc.weight_shape) == ("linear", "2", (3, 8 * 3 * 2))


class _Skipped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.up = nn.ConvTranspose2d(4, 4, 2)
        self.fgroup_w = nn.Parameter(torch.randn(4, 2, 1, 1))
        self.line = nn.Conv1d(4, 4, 1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(self.reflect(self.depthwise(self.grouped(x))))
        x = F.conv2d(x, self.fgroup_w, groups=2)
        return self.fc(self.line(x.flatten(2)).mean(-1))


def test_grouped_convs_and_other_layers_are_skipped_with_a_reason() -> None:
    gm = torch.fx.symbolic_trace(_Skipped())
    sites, skipped = find_sites(gm)
    assert [s.target for s in sites] == ["fc"]
    assert {k.target: k.reason for k in skipped} == {
        "grouped": "grouped convolution (groups=2)",
        "depthwise": "grouped convolution (groups=4)",
        "reflect": "padding_mode='reflect'",
        "up": "transposed convolution is not decomposed",
        "fgroup_w_lowrank": "grouped convolution (groups=2)",
        "line": "Conv1d is not decomposed",
    }


class _Unreported(nn.Module):
    """Layers torch.export records as ops the site finder did not know (aten.conv_transpose1d/3d, aten.bilinear,
    aten.lstm, ...), and recurrent leaf modules of symbolic tracing: all used to be missing from the report."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.gru = nn.LSTM(4, 4, batch_first=True), nn.GRU(4, 4, batch_first=True)
        self.cell = nn.LSTMCell(4, 4)
        self.t1, self.t3 = nn.ConvTranspose1d(4, 4, 3), nn.ConvTranspose3d(4, 4, 1)
        self.bil = nn.Bilinear(4, 4, 4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, time, 4)
        a, _ = self.lstm(x)
        b, _ = self.gru(a)
        h, _ = self.cell(b[:, -1])
        up = self.t1(b.transpose(1, 2)).sum() + self.t3(b.transpose(1, 2)[:, :, None, None]).sum()
        return self.fc(self.bil(h, a[:, -1])) + up


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_every_layer_with_weights_is_a_site_or_skipped_with_a_reason(capture: str) -> None:
    model = _Unreported().eval()
    gm = torch.fx.symbolic_trace(model) if capture == "symbolic" else export_capture(model, (torch.randn(2, 5, 4),))
    sites, skipped = find_sites(gm)
    assert [s.target for s in sites] == ["fc"]
    assert {k.target: k.reason for k in skipped} == {
        "lstm": "recurrent layers are not decomposed",
        "gru": "recurrent layers are not decomposed",
        "cell": "recurrent layers are not decomposed",
        "t1": "transposed convolution is not decomposed",
        "t3": "transposed convolution is not decomposed",
        "bil": "bilinear layers are not decomposed",
    }


class _Shared(nn.Module):
    """``twice`` is called twice (one layer, two sites); ``a`` and ``b`` share one weight; ``emb``'s weight
    is also read by the output projection (tied embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.twice = nn.Linear(8, 8)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.emb = nn.Embedding(10, 8)
        self.proj_b = nn.Parameter(torch.zeros(10))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x = self.twice(torch.relu(self.twice(x)))
        x = self.a(x) + self.b(x)
        return F.linear(x, self.emb.weight, self.proj_b)


def test_a_layer_called_twice_is_two_sites_and_tied_weights_are_skipped() -> None:
    gm = torch.fx.symbolic_trace(_Shared())
    sites, skipped = find_sites(gm)
    assert [(s.node, s.target) for s in sites] == [("twice", "twice"), ("twice_1", "twice")]
    assert [(k.node, k.target, k.reason) for k in skipped] == [
        ("emb", "emb", "embedding lookups are not decomposed"),
        ("a", "a", "weight tied with b"),
        ("b", "b", "weight tied with a"),
        ("linear", "emb", "weight also used by node 'emb'"),  # the output projection reads the embedding's weight
    ]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).relu()


def test_layers_hidden_in_leaf_modules_and_hooked_layers_are_reported() -> None:
    model = nn.Sequential(_Block(), nn.Linear(4, 4), nn.Linear(4, 2))
    model[2].register_forward_hook(lambda m, a, out: out * 2)
    gm = torch.fx.GraphModule(model, GraphTracer(leaf_modules=(_Block,)).trace(model))
    sites, skipped = find_sites(gm)
    assert [s.target for s in sites] == ["1"]
    reasons = {k.target: k.reason for k in skipped}
    assert reasons.keys() == {"0.fc", "2"}
    assert reasons["0.fc"].startswith("inside leaf module '0' (_Block)") and "torch.export" in reasons["0.fc"]
    assert "forward hooks" in reasons["2"]


def test_remove_dead_sites_keeps_in_place_updates() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.dead, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            self.dead(h)
            self.act(h)  # in place: changes h although its result is not assigned
            return h

    model = Net()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 4)
    assert remove_dead_sites(gm) == ["dead"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["fc", "act"]
    assert [s.target for s in find_sites(gm)[0]] == ["fc"]
    torch.testing.assert_close(gm(x), model(x))
    assert bool((gm(x) >= 0).all())
