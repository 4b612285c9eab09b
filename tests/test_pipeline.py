"""End-to-end behaviour of prepare/convert/transform on small models."""

import copy

import pytest
import torch
from torch import nn

import fxdeco


def lowrank_data(n_batches: int = 4, rows: int = 64, dim: int = 32, rank: int = 4) -> list[torch.Tensor]:
    basis = torch.randn(rank, dim)
    return [torch.randn(rows, rank) @ basis for _ in range(n_batches)]


def test_transform_reduces_params_and_reports_them() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    small = fxdeco.transform(model, lowrank_data(), nsr_threshold=0.01)
    rep = fxdeco.report(small)
    assert rep.totals["params_after"] < rep.totals["params_before"]
    assert rep.totals["params_after"] == sum(p.numel() for p in small.parameters())
    first = next(r for r in rep.rows if r["name"] == "0")
    assert first["rank"] is not None and first["rank"] <= 4
    assert "TOTAL" in str(rep)


def test_input_model_state_dict_unchanged() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 1))
    model.train()
    before = copy.deepcopy(model.state_dict())
    fxdeco.transform(model, [torch.randn(4, 3, 8, 8) for _ in range(3)], nsr_threshold=0.05)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training, "the caller's train/eval mode must be restored"


class _Tied(nn.Module):
    """An embedding tied to the output projection, and a Linear called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.mix = nn.Linear(16, 16)
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.mix(self.mix(self.embed(ids))))


def test_tied_weight_warned_and_skipped_shared_layer_factorized_once() -> None:
    model = _Tied()
    ids = [torch.randint(0, 50, (8, 12)) for _ in range(3)]
    with pytest.warns(UserWarning, match="'out' is not decomposed: weight also used"):
        small = fxdeco.transform(model, ids, nsr_threshold=0.5)
    rows = {r["name"]: r for r in fxdeco.report(small).rows}
    assert rows["out"]["note"].startswith("skipped: weight also used")
    assert rows["mix"]["rank"] is not None  # the Linear called twice is one layer, factorized once
    called = [n.target for n in small.graph.nodes if n.op == "call_module"]
    assert called.count("mix.0") == 2 and called.count("mix.1") == 2
    assert torch.equal(small.get_parameter("out.weight"), model.embed.weight)


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class _WithLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = _Inner(), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inner(x))


def test_capture_export_sees_inside_leaf_modules() -> None:
    model, x = _WithLeaf(), torch.randn(4, 8)
    hidden = fxdeco.prepare(model, leaf_modules=(_Inner,))
    assert [s.target for s in hidden.sites] == ["head"]
    assert any(k.target == "inner.fc" and "capture='export'" in k.reason for k in hidden.skipped)
    exported = fxdeco.prepare(model, x, leaf_modules=(_Inner,), capture="export")
    assert exported.gm.meta["fxdeco_capture"].kind == "export"
    assert sorted(s.target for s in exported.sites) == ["head", "inner.fc"]
    with pytest.raises(fxdeco.CaptureError, match="needs example_inputs"):
        fxdeco.trace(model, capture="export")
    with pytest.raises(ValueError, match="capture must be"):
        fxdeco.trace(model, capture="dynamo")


def test_calibration_reads_the_models_weights_and_the_result_owns_its_own() -> None:
    """A large model is not held twice while it is calibrated; the decomposed model never aliases it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16),
                                torch.nn.BatchNorm1d(16)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    storage = {p.data_ptr() for p in model.parameters()}
    prepared = fxdeco.calibrate(fxdeco.prepare(model), [torch.randn(32, 4) @ torch.randn(4, 16) for _ in range(3)])
    assert all(p.data_ptr() in storage for p in prepared.gm.parameters())
    assert not any(b.data_ptr() in {x.data_ptr() for x in model.buffers()} for b in prepared.gm.buffers())
    small = fxdeco.convert(prepared, nsr_threshold=0.01)
    assert small.meta["fxdeco"].decisions[0].decomposed
    assert not any(p.data_ptr() in storage for p in small.parameters())
    with torch.no_grad():
        for p in small.parameters():
            p.add_(1.0)  # training the result...
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # ...leaves the model alone


@pytest.mark.parametrize("how", ["transform", "sequential", "decompose_", "load"])
def test_decomposing_leaves_the_global_random_state_alone(how: str, tmp_path) -> None:
    """The factor layers are filled with computed values, so building them must not draw the random initialisation
    from the caller's global RNG: a script seeding once saw other random numbers after transform than without it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 32))
    data = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    config = fxdeco.Falor(nsr_threshold=0.05, sequential=how == "sequential")
    small = fxdeco.transform(model, data, config) if how == "load" else None
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    if how == "decompose_":
        fxdeco.decompose_(copy.deepcopy(model), data, config)
    elif how == "load":
        fxdeco.save(small, tmp_path / "small")
        torch.manual_seed(1)
        fxdeco.load(tmp_path / "small", model)
    else:
        small = fxdeco.transform(model, data, config)
        assert any(r["rank"] is not None for r in fxdeco.report(small).rows), "nothing was decomposed"
    assert torch.equal(torch.rand(4), expected), f"{how} consumed the global random state"
