"""The torch.compile backend: every graph Dynamo captures is decomposed on its own inputs."""

from __future__ import annotations

import logging
import os
import time

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import fxdeco
from fxdeco.compile.backend import GraphDecomposer, PassThrough, backend
from fxdeco.errors import CalibrationError
from tests.models import SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")

NSR = 0.05


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: Dynamo caches compiled frames per code object."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class SmallMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class BrokenMLP(nn.Module):
    """Two Dynamo graphs; the second computes its last layer with F.linear on a bare Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 64)
        self.proj = nn.Parameter(torch.randn(16, 64) / 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        torch._dynamo.graph_break()
        return F.linear(F.relu(self.fc2(h)), self.proj)


def _basis(rank: int, features: int) -> torch.Tensor:
    return torch.randn(rank, features, generator=torch.Generator().manual_seed(features))


def low_rank(batch: int, features: int, rank: int = 4) -> torch.Tensor:
    """Inputs on one fixed low-dimensional subspace, so falor finds layers worth decomposing."""
    return torch.randn(batch, rank) @ _basis(rank, features)


def images(batch: int) -> torch.Tensor:
    return low_rank(batch, 3 * 8 * 8, 3).reshape(batch, 3, 8, 8)


def decided_ranks(gm: torch.fx.GraphModule) -> dict[str, int | None]:
    return {d.target: d.rank for d in gm.meta["fxdeco"].decisions}


def compile_with(model: nn.Module, **kwargs) -> tuple[torch.nn.Module, object]:
    deco = backend(inner="eager", nsr_threshold=NSR, **kwargs)
    return torch.compile(model, backend=deco), deco


def test_online_switch_over_after_calib_steps():
    model = SmallMLP().eval()
    compiled, deco = compile_with(model, calib_steps=3)
    batches = [low_rank(16, 32) for _ in range(5)]
    with torch.no_grad():
        for i, x in enumerate(batches[:3]):
            assert torch.equal(compiled(x), model(x)), f"calibration call {i} must return the exact output"
            graph = deco.graphs[0]
            assert graph.status == ("decomposed" if i == 2 else "calibrating")
        later = [compiled(x) for x in batches[3:]]
    graph = deco.graphs[0]
    assert isinstance(graph, GraphDecomposer)
    assert (graph.calls, graph.calibration_calls) == (5, 3)
    assert any(r is not None for r in decided_ranks(graph.decomposed).values())
    for x, out in zip(batches[3:], later):
        assert not torch.equal(out, model(x))  # the decomposed graph runs now
        assert torch.allclose(out, graph.decomposed(x)[0], atol=1e-6)
        exact = model(x)
        assert 0 < (out - exact).norm() / exact.norm() < 0.5  # three layers at layer NSR <= 0.05


def test_online_matches_transform_mlp():
    model = SmallMLP().eval()
    batches = [low_rank(16, 32) for _ in range(4)]
    compiled, deco = compile_with(model, calib_steps=len(batches))
    with torch.no_grad():
        for x in batches:
            compiled(x)
        reference = fxdeco.transform(model, batches, nsr_threshold=NSR)
        test = low_rank(8, 32)
        assert torch.allclose(compiled(test), reference(test), atol=1e-5, rtol=1e-4)
    assert decided_ranks(deco.graphs[0].decomposed) == decided_ranks(reference)
    assert fxdeco.report(reference).totals["params_after"] < fxdeco.report(reference).totals["params_before"]


def test_calib_loader_matches_transform_cnn():
    model = SmallCNN().eval()
    batches = [images(8) for _ in range(3)]
    compiled, deco = compile_with(model, calib_loader=batches)
    assert deco.calibrate(compiled) is compiled
    graph = deco.graphs[0]
    assert (graph.status, graph.calibration_calls) == ("decomposed", 3)
    reference = fxdeco.transform(model, batches, nsr_threshold=NSR)
    ranks = decided_ranks(graph.decomposed)
    assert ranks == decided_ranks(reference) and set(ranks) == {"conv1", "conv2", "fc", "head"}
    assert any(r is not None for r in ranks.values())
    with torch.no_grad():
        x = images(4)  # a new batch size: Dynamo recompiles, the new graph adopts graph 0's factors
        assert torch.allclose(compiled(x), reference(x), atol=1e-5, rtol=1e-4)
    assert graph.calls == 3  # the three calibration batches
    assert [(g.status, g.calls, g.calibration_calls) for g in deco.graphs[1:]] == [("adopted", 1, 0)]


def test_uneven_last_batch_recompiles_and_shares_one_decomposition():
    model = SmallMLP().eval()
    batches = [low_rank(16, 32) for _ in range(3)] + [low_rank(5, 32)]
    compiled, deco = compile_with(model, calib_loader=batches)
    deco.calibrate(compiled)
    # Dynamo compiled the graph again for the last batch; the copy that saw three batches decides.
    assert [(g.status, g.calibration_calls) for g in deco.graphs] == [("decomposed", 3), ("adopted", 1)]
    first, second = (g.decomposed for g in deco.graphs)
    assert torch.equal(first.get_parameter("fc2.0.weight"), second.get_parameter("fc2.0.weight"))
    reference = fxdeco.transform(model, batches[:3], nsr_threshold=NSR)
    assert decided_ranks(first) == decided_ranks(second) == decided_ranks(reference)
    with torch.no_grad():
        for n in (16, 5, 9):
            x = low_rank(n, 32)
            assert torch.allclose(compiled(x), reference(x), atol=1e-5, rtol=1e-4)
    assert len(deco.graphs) == 2  # the second, dynamic graph serves every other batch size


def test_budget_mode_matches_transform_and_applies_per_graph():
    model = SmallMLP().eval()
    batches = [low_rank(16, 32) for _ in range(3)]
    deco = backend(inner="eager", calib_loader=batches, keep_params=0.6)
    compiled = deco.calibrate(torch.compile(model, backend=deco))
    reference = fxdeco.transform(model, batches, keep_params=0.6)
    decomposed = deco.graphs[0].decomposed
    assert decided_ranks(decomposed) == decided_ranks(reference)
    totals = fxdeco.report(decomposed).totals
    assert totals["params_after"] <= 0.6 * totals["params_before"]
    with torch.no_grad():
        x = low_rank(16, 32)
        assert torch.allclose(compiled(x), reference(x), atol=1e-5, rtol=1e-4)


def test_calib_loader_with_input_fn():
    model = SmallMLP().eval()
    loader = [(low_rank(16, 32), torch.zeros(16)) for _ in range(3)]
    compiled, deco = compile_with(model, calib_loader=loader, input_fn=lambda b: b[0])
    deco.calibrate(compiled)
    reference = fxdeco.transform(model, loader, input_fn=lambda b: b[0], nsr_threshold=NSR)
    assert decided_ranks(deco.graphs[0].decomposed) == decided_ranks(reference)


def test_branch_the_loader_never_reached_calibrates_online():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 8), nn.Linear(32, 8)

        def forward(self, x, use_b: bool = False):
            h = F.relu(self.body(x))
            return self.b(h) if use_b else self.a(h)

    model = TwoHeads().eval()
    compiled, deco = compile_with(model, calib_loader=[low_rank(16, 32) for _ in range(2)], calib_steps=2)
    deco.calibrate(compiled)
    assert [g.status for g in deco.graphs] == ["decomposed"]
    x = low_rank(16, 32)
    with torch.no_grad(), pytest.warns(UserWarning, match="not reached by the calibration loader"):
        assert torch.equal(compiled(x, True), model(x, True))  # Dynamo compiles the other branch
    with torch.no_grad():
        compiled(x, True)
    assert [(g.status, g.calibration_calls) for g in deco.graphs] == [("decomposed", 2), ("decomposed", 2)]
    assert set(decided_ranks(deco.graphs[1].decomposed)) == {"body", "b"}


def test_calib_loader_requires_calibrate_first():
    compiled, _ = compile_with(SmallMLP().eval(), calib_loader=[low_rank(4, 32)])
    with pytest.raises(CalibrationError, match=r"backend.calibrate\(compiled_model\)"):
        compiled(low_rank(4, 32))


def test_graph_broken_model_decomposes_each_graph_on_its_inputs():
    model = BrokenMLP().eval()
    batches = [low_rank(16, 32) for _ in range(3)]
    compiled, deco = compile_with(model, calib_loader=batches)
    deco.calibrate(compiled)
    assert len(deco.graphs) == 2 and all(g.status == "decomposed" for g in deco.graphs)
    first, second = (decided_ranks(g.decomposed) for g in deco.graphs)
    assert set(first) == {"fc1"} and set(second) == {"fc2", "proj_lowrank"}  # a bare Parameter's layer name
    assert all(g.calibration_calls == 3 for g in deco.graphs)
    # Whole-model transform traces through graph_break() (a no-op outside Dynamo). falor's
    # threshold mode decides every layer from that layer's statistics alone, and each graph was
    # calibrated on the original activations, so the per-graph decompositions equal the
    # whole-model one. (Budget mode would differ: keep_params applies to each graph separately.)
    reference = fxdeco.transform(model, batches, nsr_threshold=NSR)
    assert {**first, **second} == decided_ranks(reference)
    with torch.no_grad():
        x = low_rank(8, 32)
        assert torch.allclose(compiled(x), reference(x), atol=1e-5, rtol=1e-4)


def test_graph_broken_online_counts_calls_per_graph():
    model = BrokenMLP().eval()
    compiled, deco = compile_with(model, calib_steps=2)
    with torch.no_grad():
        exact = [torch.equal(compiled(x), model(x)) for x in [low_rank(8, 32) for _ in range(3)]]
    assert exact == [True, True, False]
    assert [(g.calls, g.calibration_calls, g.status) for g in deco.graphs] == [(3, 2, "decomposed")] * 2


def test_graph_without_sites_passes_through(caplog):
    class NoLayers(nn.Module):
        def forward(self, x):
            return torch.tanh(x) * 2

    model = NoLayers()
    compiled, deco = compile_with(model)
    x = torch.randn(4, 8)
    with caplog.at_level(logging.INFO, logger="fxdeco.compile.backend"):
        out = compiled(x)
    assert torch.equal(out, model(x))
    assert len(deco.graphs) == 1 and isinstance(deco.graphs[0], PassThrough)
    assert "passes through unchanged" in caplog.text


def test_mixed_graphs_only_the_one_with_sites_calibrates():
    class HalfLayers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            x = torch.tanh(x)
            torch._dynamo.graph_break()
            return self.fc(x)

    model = HalfLayers().eval()
    compiled, deco = compile_with(model, calib_steps=2)
    with torch.no_grad():
        for _ in range(3):
            compiled(low_rank(16, 32))
    assert [g.status for g in deco.graphs] == ["passthrough", "decomposed"]


def test_get_attr_and_call_module_flavours():
    """GraphModules that already hold their weights (symbolic tracing) go through the same path."""
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(32, 32) / 6)
            self.fc = nn.Linear(32, 8)

        def forward(self, x):
            return self.fc(F.relu(F.linear(x, self.w)))

    gm = torch.fx.symbolic_trace(Functional())
    ops = {n.op for n in gm.graph.nodes}
    assert {"get_attr", "call_function", "call_module"} <= ops
    deco = backend(inner="eager", calib_steps=2, nsr_threshold=NSR)
    x = low_rank(16, 32)
    run = deco(gm, [x])
    with torch.no_grad():
        assert torch.equal(run(x), gm(x))
        run(low_rank(16, 32))
    assert deco.graphs[0].status == "decomposed"
    assert set(decided_ranks(deco.graphs[0].decomposed)) == {"w_lowrank", "fc"}


def test_weights_changed_after_compile_are_refused():
    model = SmallMLP().eval()
    compiled, _ = compile_with(model, calib_steps=1)
    with torch.no_grad():
        compiled(low_rank(4, 32))
        model.fc1.weight.mul_(2)
        with pytest.raises(RuntimeError, match="torch._dynamo.reset"):
            compiled(low_rank(4, 32))


class ScaledMLP(SmallMLP):
    """A parameter that is no layer's weight scales the first layer's inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.scale)


@pytest.mark.parametrize("change", ["load_state_dict", "bias", "upstream"])
def test_new_weights_after_reset_are_calibrated_again_not_adopted(change):
    """The remedy the README gives for changed weights (torch._dynamo.reset(), compile again) with the same backend:
    the new graph has the old one's layers, weight storage and code, but not its values, so it must calibrate
    on its own rather than adopt the factors made from the old weights (or from the statistics that the old
    values of a parameter upstream of the layers produced)."""
    model = ScaledMLP().eval()
    deco = backend(inner="eager", nsr_threshold=NSR, calib_steps=2)
    compiled = torch.compile(model, backend=deco)
    x = low_rank(8, 32)
    with torch.no_grad():
        for _ in range(3):
            compiled(low_rank(16, 32))
        if change == "load_state_dict":  # copies into the same tensors
            model.load_state_dict({k: torch.randn_like(v) / 4 for k, v in model.state_dict().items()})
        elif change == "bias":
            model.fc1.bias.add_(3.0)
        else:  # the layers' inputs change, not their weights
            model.scale.copy_(torch.rand(32) * 2)
        torch._dynamo.reset()
        before = len(deco.graphs)
        compiled = torch.compile(model, backend=deco)
        for _ in range(3):
            compiled(low_rank(16, 32))
        out, exact = compiled(x), model(x)
    assert deco.graphs[before].status == "decomposed"
    assert (out - exact).norm() / exact.norm() < 0.5


def test_dynamic_shapes_with_a_backend_callable():
    compiled_graphs = []

    def inner(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    model = SmallMLP().eval()
    deco = backend(inner=inner, calib_steps=2, nsr_threshold=NSR)
    compiled = torch.compile(model, backend=deco, dynamic=True)
    with torch.no_grad():
        for n in (8, 8, 5, 3):
            x = low_rank(n, 32)
            out = compiled(x)
            assert out.shape == (n, 8)
    assert deco.graphs[0].status == "decomposed" and compiled_graphs
    # The decomposed graph takes the batch size (a SymInt input under dynamic=True) before x.
    reference = deco.graphs[0].decomposed
    placeholders = [n for n in reference.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 2
    x = low_rank(7, 32)
    with torch.no_grad():
        assert torch.allclose(compiled(x), reference(7, x)[0], atol=1e-6)
        assert not torch.equal(compiled(x), model(x))


@pytest.mark.parametrize("bad, error, message", [
    (dict(nsr_treshold=0.1), TypeError, "unknown option 'nsr_treshold'"),
    (dict(method="svd"), ValueError, "unknown method 'svd'"),
    (dict(keep_params=1.5), ValueError, "keep_params"),
    (dict(calib_steps=0), ValueError, "calib_steps"),
    (dict(inner="no_such_backend"), ValueError, "unknown inner backend"),
    (dict(inner=3), TypeError, "inner must be"),
    (dict(nsr_threshold=0.1, sequential=True), ValueError, "sequential=True calibrates while it decomposes"),
    (dict(method="dwain", loss_fn=lambda out, batch: out.sum()), ValueError, "loss_fn reads the loader's batches"),
    (dict(keep_params=0.5, loss_fn=lambda out, batch: out.sum()), ValueError, "loss_fn reads the loader's batches"),
])
def test_bad_options_fail_at_construction(bad, error, message):
    with pytest.raises(error, match=message):
        backend(**bad)


def test_calibrate_without_loader_is_an_error():
    compiled, deco = compile_with(SmallMLP().eval())
    with pytest.raises(CalibrationError, match="online"):
        deco.calibrate(compiled)


@pytest.mark.skipif(not os.environ.get("FXDECO_SLOW"), reason="inductor compiles C++ (about a minute on a shared CPU); "
                    "set FXDECO_SLOW=1 to run")
def test_inductor_inner_backend():
    model = SmallMLP().eval()
    batches = [low_rank(16, 32) for _ in range(2)]
    deco = backend(inner="inductor", calib_loader=batches, nsr_threshold=NSR)
    compiled = deco.calibrate(torch.compile(model, backend=deco))
    start = time.perf_counter()
    with torch.no_grad():
        x = low_rank(16, 32)
        out = compiled(x)
        assert torch.allclose(out, deco.graphs[0].decomposed(x)[0], atol=1e-5)
    assert time.perf_counter() - start < 600


class _SameLayerTwice(nn.Module):
    """One Linear called on two inputs, with a graph break between: two graphs of other code, not recompilations."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.fc(x)
        torch._dynamo.graph_break()
        return a, self.fc(z)


def test_graphs_of_other_code_calling_one_layer_are_decomposed_on_their_own_inputs() -> None:
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    xs_basis, zs_basis = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)  # two 4-dim subspaces
    calls = [(torch.randn(64, 4, generator=g) @ xs_basis, torch.randn(64, 4, generator=g) @ zs_basis)
             for _ in range(4)]
    torch.manual_seed(0)
    model = _SameLayerTwice().eval()
    decomposer = backend(inner="eager", calib_steps=3, nsr_threshold=0.01)
    compiled = torch.compile(model, backend=decomposer)
    with torch.no_grad():
        for i in range(5):
            compiled(*calls[i % 4])
        got, wanted = compiled(*calls[0]), model(*calls[0])
    assert [g.status for g in decomposer.graphs] == ["decomposed", "decomposed"]  # neither adopts the other's
    for a, b in zip(got, wanted):
        assert float((a - b).norm() / b.norm()) < 1e-3


def test_input_fn_without_a_calib_loader_is_refused():
    """Online calibration never reads a loader, so an input_fn there was silently unused."""
    with pytest.raises(ValueError, match="input_fn adapts calib_loader's batches, but this backend has no calib_loader"):
        fxdeco.backend(input_fn=lambda b: b[0], inner="eager")
    assert fxdeco.backend(calib_loader=[(torch.randn(2, 4), 0)], input_fn=lambda b: b[0], inner="eager")
