"""falor local mode: trained models, the closed-form NSR, and the options.

The central check: on a model trained in the test, the layer-output NSR that
falor estimates in closed form is what one measures by running the original
and the decomposed layer on the same calibration inputs (ptdeco's per-channel
definition), and it stays under the threshold.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import fxdeco
from fxdeco.methods.falor.local import falor_local
from fxdeco.methods.falor.lowrank import NSR_EPSILON, nsr_by_rank, output_error_by_rank, spectrum
from passes import SiteStatistics, StatsInterpreter, find_sites
from passes.stats import ActivationStatistics


pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------- trained models


def structured_vectors(n: int, g: torch.Generator, dim: int = 32, latent: int = 6, classes: int = 5
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs near a ``latent``-dim subspace of R^dim; labels a nonlinear function of the latent code."""
    fixed = torch.Generator().manual_seed(1234)  # the task itself is fixed; only the samples vary
    basis = torch.randn(latent, dim, generator=fixed)
    readout = torch.randn(latent, classes, generator=fixed)
    z = torch.randn(n, latent, generator=g)
    x = z @ basis + 0.05 * torch.randn(n, dim, generator=g)
    y = (torch.tanh(z) @ readout).argmax(1)
    return x, y


def structured_images(n: int, g: torch.Generator, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 RGB images: a class-dependent smooth pattern times a random contrast, plus noise."""
    fixed = torch.Generator().manual_seed(4321)
    patterns = torch.nn.functional.interpolate(torch.randn(classes, 3, 3, 3, generator=fixed), size=(8, 8),
                                               mode="bilinear", align_corners=False)
    y = torch.randint(0, classes, (n,), generator=g)
    contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
    x = patterns[y] * contrast + 0.1 * torch.randn(n, 3, 8, 8, generator=g)
    return x, y


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, (3, 2), stride=2, padding=(1, 0))
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def train(model: nn.Module, data_fn, steps: int, lr: float = 1e-2, batch: int = 128) -> float:
    """Train with Adam on fresh batches of ``data_fn``; return the accuracy on a held-out batch."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        x, y = data_fn(batch, g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = data_fn(512, torch.Generator().manual_seed(99))
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def trained_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = make_mlp()
    acc = train(model, structured_vectors, steps=300)
    assert acc > 0.8, f"the MLP did not learn the synthetic task (accuracy {acc:.2f})"
    return model.eval()


@pytest.fixture(scope="module")
def trained_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = TinyCNN()
    acc = train(model, structured_images, steps=150, batch=64)
    assert acc > 0.8, f"the CNN did not learn the synthetic task (accuracy {acc:.2f})"
    return model.eval()


def layer_inputs(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs each named layer of ``model`` receives on ``batches`` (concatenated)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach()))
             for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                model(b)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def measured_nsr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """ptdeco's per-channel NSR: mean_c mse_c / (var_c + 1e-3), var from torch.std as ptdeco computes it."""
    channel_dim = 1
    dims = tuple(d for d in range(reference.dim()) if d != channel_dim)
    ref, app = reference.double(), approx.double()
    variance = torch.std(ref, dim=dims).square() + NSR_EPSILON
    mse = (app - ref).square().mean(dim=dims)
    return float((mse / variance).mean())


@pytest.mark.parametrize("which, data_fn, threshold", [
    ("mlp", structured_vectors, 0.02),
    ("mlp", structured_vectors, 0.1),
    ("cnn", structured_images, 0.05),
])
def test_trained_model_measured_nsr_within_estimate(which, data_fn, threshold, request) -> None:
    model = request.getfixturevalue(f"trained_{which}")
    state = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(7)
    calib = [data_fn(128, g)[0] for _ in range(6)]
    small = fxdeco.transform(model, calib, nsr_threshold=threshold)
    rep = fxdeco.report(small)
    assert rep.totals["params_after"] < rep.totals["params_before"]
    assert rep.totals["params_after"] == sum(p.numel() for p in small.parameters())
    decisions = [d for d in small.meta["fxdeco"].decisions if d.decomposed]
    assert decisions, "falor decomposed nothing on a model trained on low-dimensional data"

    inputs = layer_inputs(model, [d.target for d in decisions], calib)
    for d in decisions:
        x = inputs[d.target]
        with torch.no_grad():
            reference = model.get_submodule(d.target)(x)
            approx = small.get_submodule(d.target)(x)  # the two factors, on the very same inputs
        nsr = measured_nsr(reference, approx)
        # The closed form is exact up to ptdeco's Bessel-corrected variance (measured is a hair lower).
        assert nsr <= d.nsr * (1 + 1e-3) + 1e-6, (d.target, nsr, d.nsr)
        assert nsr >= d.nsr * 0.98 - 1e-6, (d.target, nsr, d.nsr)  # ... and not a loose bound
        assert nsr <= threshold
        # The rank is the smallest passing one: one rank lower the estimate exceeds the threshold.
        if d.rank > 1:
            stats = SiteStatistics.empty(d.weight_shape[0])
            y = reference.movedim(1, -1).reshape(-1, d.weight_shape[0])
            bias = model.get_submodule(d.target).bias
            stats.update(y - bias)
            assert float(nsr_by_rank(spectrum(stats))[d.rank - 1]) > threshold
    # The trained model itself is untouched.
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_lower_threshold_gives_higher_ranks(trained_mlp: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    calib = [structured_vectors(128, g)[0] for _ in range(4)]
    prepared = fxdeco.calibrate(fxdeco.prepare(trained_mlp), calib)
    ranks = []
    for threshold in (0.2, 0.05, 0.01, 0.002):
        _, decisions = falor_local(prepared.gm, prepared.sites, prepared.statistics, nsr_threshold=threshold)
        ranks.append([d.rank or d.full_rank for d in decisions])
    for looser, tighter in zip(ranks, ranks[1:]):
        assert all(a <= b for a, b in zip(looser, tighter)), ranks
    assert ranks[0] != ranks[-1]


# ----------------------------------------------------------------------------- the closed form


def random_outputs(n: int, channels: int, g: torch.Generator) -> torch.Tensor:
    """Rows with a distinct, decaying spectrum and a non-zero mean."""
    q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=g, dtype=torch.float64))
    scales = torch.logspace(1, -2, channels, dtype=torch.float64)
    return (torch.randn(n, channels, generator=g, dtype=torch.float64) * scales) @ q.T + \
        torch.randn(channels, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("channels, n", [(1, 5), (7, 400), (16, 1000), (12, 6)])
def test_nsr_by_rank_matches_brute_force_projection(channels: int, n: int) -> None:
    g = torch.Generator().manual_seed(channels)
    y = random_outputs(n, channels, g)
    stats = SiteStatistics.empty(channels)
    stats.update(y[: n // 2])
    stats.update(y[n // 2:])
    closed = nsr_by_rank(spectrum(stats))
    assert closed.shape == (channels + 1,)

    # Brute force, independent of the eigen-solver: right singular vectors of the raw rows.
    _, _, vh = torch.linalg.svd(y, full_matrices=True)
    variance = y.var(dim=0, unbiased=False)
    for k in range(channels + 1):
        basis = vh[:k].T
        err = y - y @ basis @ basis.T
        brute = float((err.square().mean(0) / (variance + NSR_EPSILON)).mean())
        assert float(closed[k]) == pytest.approx(brute, rel=1e-8, abs=1e-12), k
    assert float(closed[-1]) == pytest.approx(0.0, abs=1e-12)
    assert float(closed[0]) == pytest.approx(float(((y.square().mean(0)) / (variance + NSR_EPSILON)).mean()))
    assert torch.all(closed[1:] <= closed[:-1] + 1e-12)


# ----------------------------------------------------------------------------- options


def lowrank_batches(dim: int, rank: int, n_batches: int = 4, rows: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=g)
    return [torch.randn(rows, rank, generator=g) @ basis for _ in range(n_batches)]


def prepared_linear(dim: int = 32, out: int = 32, rank: int = 3) -> fxdeco.PreparedModel:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(dim, out))
    return fxdeco.calibrate(fxdeco.prepare(model), lowrank_batches(dim, rank))


def test_min_rank_honoured() -> None:
    prepared = prepared_linear(rank=3)
    run = lambda **kw: falor_local(prepared.gm, prepared.sites, prepared.statistics, nsr_threshold=1e-6, **kw)
    assert run()[1][0].rank == 3
    plan, decisions = run(min_rank=7)
    assert decisions[0].rank == 7 and plan["0"].rank == 7
    assert decisions[0].nsr == pytest.approx(0.0, abs=1e-6)  # float32 products: a noise floor near 1e-7
    # A min_rank beyond the full rank is clamped, and full rank does not reduce parameters: kept dense.
    plan, decisions = run(min_rank=100)
    assert not plan and decisions[0].rank is None and "would not reduce parameters" in decisions[0].reason


def test_proportion_threshold_honoured() -> None:
    prepared = prepared_linear(rank=8)  # rank 8 of 32: proportion 0.25
    run = lambda p: falor_local(prepared.gm, prepared.sites, prepared.statistics, nsr_threshold=1e-6,
                                proportion_threshold=p)
    plan, decisions = run(0.25)
    assert decisions[0].rank == 8 and "0" in plan
    plan, decisions = run(0.2)
    assert not plan and decisions[0].rank is None
    assert "proportion_threshold" in decisions[0].reason and "8/32" in decisions[0].reason
    assert decisions[0].params_after == decisions[0].params_before


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(32, 32), "fc2": nn.Linear(32, 32)})
                                    for _ in range(2))
        self.head = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block["fc2"](torch.relu(block["fc1"](x)))
        return self.head(x)


@pytest.mark.parametrize("where", ["convert", "prepare", "transform"])
def test_skip_globs_honoured(where: str) -> None:
    torch.manual_seed(0)
    model = Blocks()
    data = lowrank_batches(32, 2)
    skip = ["blocks.*.fc1", "head"]
    if where == "convert":
        small = fxdeco.convert(fxdeco.calibrate(fxdeco.prepare(model), data), nsr_threshold=0.01, skip=skip)
    elif where == "prepare":
        small = fxdeco.convert(fxdeco.calibrate(fxdeco.prepare(model, skip=skip), data), nsr_threshold=0.01)
    else:
        small = fxdeco.transform(model, data, nsr_threshold=0.01, skip=skip)
    rows = {r["name"]: r for r in fxdeco.report(small).rows}
    assert set(rows) == {"blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"}
    for name in ("blocks.0.fc1", "blocks.1.fc1", "head"):
        assert rows[name]["rank"] is None and "skipped by pattern" in rows[name]["note"]
        assert isinstance(small.get_submodule(name), nn.Linear)
    for name in ("blocks.0.fc2", "blocks.1.fc2"):
        assert rows[name]["rank"] is not None
        assert isinstance(small.get_submodule(name), nn.Sequential)


def test_same_seed_gives_identical_factors() -> None:
    def run() -> dict[str, torch.Tensor]:
        torch.manual_seed(123)
        model = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 12))
        data = lowrank_batches(24, 5, seed=5)
        return fxdeco.transform(model, data, nsr_threshold=0.01).state_dict()

    first, second = run(), run()
    assert first.keys() == second.keys() and any(k.endswith(".0.weight") for k in first)
    assert all(torch.equal(first[k], second[k]) for k in first)


# ----------------------------------------------------------------------------- statistics


def test_statistics_merge_by_addition() -> None:
    torch.manual_seed(0)
    # float64 end to end, so the merge is checked to rounding (float32 products differ by their own rounding)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, (1, 3))).double()
    # smooth images: neighbouring pixels correlate, so the conv outputs are close to low rank
    batches = [nn.functional.interpolate(torch.randn(n, 3, 3, 3, dtype=torch.float64), size=(6, 6), mode="bilinear")
               for n in (4, 2, 5, 3)]
    gm = fxdeco.trace(model)
    sites, _ = find_sites(gm)

    def collect(parts: list[torch.Tensor]) -> dict[str, SiteStatistics]:
        collected = ActivationStatistics()
        for b in parts:
            interpreter = StatsInterpreter(gm, sites, collected)
            interpreter.run(b)
        return interpreter.statistics

    whole, first, second = collect(batches), collect(batches[:2]), collect(batches[2:])
    assert set(whole) == {"0", "2"}
    for name in whole:
        merged = first[name] + second[name]
        assert merged.rows == whole[name].rows and merged.samples == whole[name].samples == 14
        torch.testing.assert_close(merged.sum_outer, whole[name].sum_outer, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(merged.sum, whole[name].sum, rtol=1e-12, atol=1e-9)
        # ... and the merge is not a no-op: each half alone differs from the whole.
        assert first[name].rows < whole[name].rows

    # Two PreparedModels on the halves, merged, plan like one PreparedModel on everything.
    one = fxdeco.calibrate(fxdeco.prepare(model), batches)
    halves = [fxdeco.calibrate(fxdeco.prepare(model), part) for part in (batches[:2], batches[2:])]
    merged = {k: halves[0].statistics[k] + halves[1].statistics[k] for k in halves[0].statistics}
    _, want = falor_local(one.gm, one.sites, one.statistics, nsr_threshold=0.05)
    _, got = falor_local(one.gm, one.sites, merged, nsr_threshold=0.05)
    assert [d.rank for d in got] == [d.rank for d in want]
    assert any(d.decomposed for d in want)
    for a, b in zip(got, want):
        assert (a.nsr is None) == (b.nsr is None)
        assert a.nsr is None or a.nsr == pytest.approx(b.nsr, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("damping", [1e-6, 1e-3, 1e-1, 1.0])
def test_damping_does_not_change_the_factors(damping: float, trained_mlp: nn.Module) -> None:
    g = torch.Generator().manual_seed(5)
    calib = [structured_vectors(128, g)[0] for _ in range(4)]
    prepared = fxdeco.calibrate(fxdeco.prepare(trained_mlp), calib)
    run = lambda d: falor_local(prepared.gm, prepared.sites, prepared.statistics, nsr_threshold=0.02, damping=d)
    plain_plan, plain = run(0.0)
    damped_plan, damped = run(damping)
    assert plain_plan, "nothing decomposed: the comparison would be empty"
    assert [d.rank for d in damped] == [d.rank for d in plain]
    for a, b in zip(damped, plain):
        assert (a.nsr is None) == (b.nsr is None)
        assert a.nsr is None or a.nsr == pytest.approx(b.nsr, rel=1e-6, abs=1e-9)
    for name, fact in plain_plan.items():
        # Factors are defined up to an orthogonal mix within the basis; compare the products W_k = B A.
        want = fact.second @ fact.first.reshape(fact.rank, -1)
        got = damped_plan[name].second @ damped_plan[name].first.reshape(fact.rank, -1)
        assert torch.linalg.matrix_norm(got - want) <= 1e-6 * torch.linalg.matrix_norm(want)


@pytest.mark.parametrize("center", [True, False])
def test_expanding_layer_spectrum_from_its_input_matches_the_full_one(center: bool) -> None:
    """An expanding Linear's thin spectrum (from its input's moment) plans exactly like the full eigen-solve."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 40), nn.GELU(), nn.Linear(40, 12)).double()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 12, generator=g) @ torch.randn(12, 12, generator=g).tril() + 2.0 for _ in range(3)]
    gm = fxdeco.trace(model)
    sites, _ = find_sites(gm)
    stats = {}
    for input_side in (True, False):
        interpreter = StatsInterpreter(gm, sites, input_side=input_side, product_dtype=torch.float64)
        for b in batches:
            interpreter.run(b.double())
        stats[input_side] = interpreter.statistics["0"]
    thin, full = (spectrum(stats[side], center=center) for side in (True, False))
    assert stats[True].mapped_from is not None and thin.eigenvectors.shape == (40, 12)
    assert full.eigenvectors.shape == (40, 40)
    torch.testing.assert_close(thin.eigenvalues, full.eigenvalues[:12], rtol=1e-8, atol=1e-10)
    assert float(full.eigenvalues[12:].abs().max()) < 1e-9 * float(full.eigenvalues[0])
    torch.testing.assert_close(nsr_by_rank(thin), nsr_by_rank(full), rtol=1e-6, atol=1e-10)
    sensitivity = torch.eye(40, dtype=torch.float64) + 0.1
    torch.testing.assert_close(output_error_by_rank(thin, sensitivity), output_error_by_rank(full, sensitivity),
                               rtol=1e-6, atol=1e-10)
    for rank in (3, 8):  # the same subspaces: the projections agree
        p_thin = thin.eigenvectors[:, :rank] @ thin.eigenvectors[:, :rank].T
        p_full = full.eigenvectors[:, :rank] @ full.eigenvectors[:, :rank].T
        torch.testing.assert_close(p_thin, p_full, rtol=0, atol=1e-8)


@pytest.mark.parametrize("options", [{"nsr_threshold": 1e-6, "min_rank": 12}, {"nsr_threshold": 1e-6, "rank_multiple": 8},
                                     {"keep_params": 0.5}],
                         ids=["min_rank", "rank_multiple", "budget"])
def test_expanding_layer_above_its_live_rank_is_still_a_projection(options: dict) -> None:
    """Constant input features leave an expanding Linear's input moment rank-deficient: the thin spectrum's
    directions past the live rank are rounding noise. At a rank that keeps some of them the factored layer must
    still compute the dense one (it once was off by 54%: those columns, normalised, lay along the leading ones)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 16))
    g = torch.Generator().manual_seed(0)

    def data(n: int) -> torch.Tensor:
        x = torch.randn(n, 32, generator=g)
        x[:, 4:] = 0.7  # 28 constant features: live rank 4
        return x

    small = fxdeco.transform(model, [data(64) for _ in range(4)], fxdeco.Falor(**options, show_progress=False))
    first = small.get_submodule("0")
    assert isinstance(first, nn.Sequential)  # decomposed, at a rank above 4 where the options ask for it
    basis = first[1].weight.double()
    assert basis.shape[1] >= 4
    x = data(64)
    with torch.no_grad():
        assert torch.linalg.norm(first(x) - model[0](x)) <= 1e-5 * torch.linalg.norm(model[0](x))
        assert torch.linalg.norm(small(x) - model(x)) <= 1e-5 * torch.linalg.norm(model(x))


def test_thin_spectrum_columns_are_orthonormal_down_to_its_noise_floor() -> None:
    """Singular values spread down to 1e-9 of the largest (squares to 1e-18): every column kept is orthogonal to
    the others (a column at 2e-14 of the largest square once overlapped the leading ones by 0.35), the dropped
    ones are zero with square 0, and the kept squares are the true ones."""
    from fxdeco.methods.falor.lowrank import THIN_NOISE_FLOOR, _thin_left_singular

    g = torch.Generator().manual_seed(0)
    out, n = 512, 64
    q1, _ = torch.linalg.qr(torch.randn(out, n, dtype=torch.float64, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    singular = torch.logspace(0, -9, n, dtype=torch.float64)
    left, squares = _thin_left_singular(q1 * singular @ q2.T)
    kept = squares > 0
    assert 0 < int(kept.sum()) < n and bool((squares[kept] >= THIN_NOISE_FLOOR * squares[0]).all())
    u = left[:, kept]
    torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), rtol=0, atol=2e-3)
    assert bool((left[:, ~kept] == 0).all())
    torch.testing.assert_close(squares[kept], singular[kept] ** 2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", [{"nsr_threshold": 1e-5}, {"nsr_final_threshold": 1e-4}])
def test_centred_bias_free_layer_is_factorized_only_when_the_added_bias_still_saves(mode):
    """Centring gives a bias-free layer a bias: a rank that saves weights but not the added bias is refused."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 100, bias=False), nn.ReLU(), nn.Linear(100, 4)).eval()
    basis = torch.randn(9, 10, generator=g)  # inputs of covariance rank 9: rank 9 is exact, rank 10 is full
    calib = [torch.randn(64, 9, generator=g) @ basis + 3.0 for _ in range(3)]
    small = fxdeco.transform(model, calib, rank_multiple=1, show_progress=False, **mode)
    first = fxdeco.report(small).rows[0]
    assert first["params_after"] <= first["params_before"]
    assert sum(p.numel() for p in small.parameters()) <= sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method", [fxdeco.Falor, lambda **kw: fxdeco.Dwain(lambda out, batch: out.sum(), **kw)])
@pytest.mark.parametrize("damping", [1.5, 1e16, float("inf")])
def test_damping_beyond_the_mean_eigenvalue_is_refused(method: Any, damping: float) -> None:
    """Damping is subtracted again after the eigen-solve: 1e16 erased the spectrum in float64, so every layer went to
    its smallest rank with a reported NSR of 0 (measured 0.27 against nsr_threshold=0.05), and inf kept every
    layer dense, silently; a damping above 1 (the mean eigenvalue) is refused at construction."""
    with pytest.raises(ValueError, match=r"damping must be a number in \[0.0, 1.0\]"):
        method(damping=damping)
