"""passes.stats: streaming second moments of every site's bias-free output (``SiteStatistics``), their row
weights and merging, and the ``StatsInterpreter`` that accumulates them on outputs or on shared inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxdeco
from passes import LeadingDimWeights, SiteStatistics, StatsInterpreter, find_sites
from passes.stats import ActivationStatistics, NonFiniteActivationError

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ SiteStatistics (from test_stat_mask.py)


def test_a_zero_one_mask_is_exactly_the_kept_rows() -> None:
    rows = torch.randn(10, 4)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0])
    a, b = SiteStatistics.empty(4), SiteStatistics.empty(4)
    a.update(rows, samples=2, weights=mask)
    b.update(rows[mask.bool()], samples=2)
    assert torch.equal(a.sum_outer, b.sum_outer) and torch.equal(a.sum, b.sum)
    assert (a.rows, a.samples, a.weight) == (10, 2, 6.0) and (b.rows, b.weight) == (6, 6.0)


def test_weights_other_than_one_weight_the_moments() -> None:
    rows = torch.randn(5, 3, dtype=torch.float64)
    weighted, repeated, doubled = SiteStatistics.empty(3), SiteStatistics.empty(3), SiteStatistics.empty(3)
    weighted.update(rows, weights=torch.tensor([2.0, 1.0, 0.0, 3.0, 1.0]))
    repeated.update(torch.cat([rows[[0, 0, 1]], rows[[3, 3, 3, 4]]]))  # integer weights = repeated rows
    assert weighted.weight == repeated.weight == 7.0
    torch.testing.assert_close(weighted.second_moment(), repeated.second_moment(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(weighted.variance(), repeated.variance(), rtol=1e-14, atol=1e-14)
    doubled.update(rows, weights=torch.full((5,), 0.5))  # a uniform weight changes nothing
    plain = SiteStatistics.empty(3)
    plain.update(rows)
    torch.testing.assert_close(doubled.second_moment(), plain.second_moment(), rtol=1e-14, atol=1e-14)
    merged = weighted + plain
    assert (merged.rows, merged.weight) == (10, 12.0)


# ------------------------------------------------------------------ precision, input side (from test_falor.py)


def test_float32_rows_with_a_large_mean_keep_their_small_directions() -> None:
    """float32 products of shifted rows: the covariance matches a float64 reference even at mean/std = 1000."""
    g = torch.Generator().manual_seed(3)
    scales = torch.logspace(0, -3, 12, dtype=torch.float64)  # spread of the directions: 1 down to 1e-3
    basis, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=g))
    batches = [(torch.randn(500, 12, dtype=torch.float64, generator=g) * scales) @ basis.T + 1000.0
               for _ in range(4)]
    fast, exact = SiteStatistics.empty(12), SiteStatistics.empty(12)
    for b in batches:
        fast.update(b.float())  # float32 products on the rows as they would come from a float32 model
        exact.update(b.float().double())  # the same float32 values, float64 products
    assert exact.centre is not None and bool((exact.centre > 999).all())

    def covariance(s: SiteStatistics) -> torch.Tensor:
        return s.second_moment() - torch.outer(s.mean(), s.mean())

    smallest = torch.linalg.eigvalsh(covariance(exact))[0]
    assert 1e-7 < smallest < 1e-5  # the 1e-3 direction: 1e-6 of the largest variance, 1e-12 of the raw moment
    # float32 products have a noise floor near 1e-7 of the largest variance (here 1): far under any NSR threshold
    torch.testing.assert_close(torch.linalg.eigvalsh(covariance(fast)), torch.linalg.eigvalsh(covariance(exact)),
                               rtol=1e-3, atol=1e-7)
    # Without the shift a float32 product of rows at 1000 could not see variances under ~1e-1.
    unshifted = torch.cat([b.float() for b in batches])
    raw = (unshifted.T @ unshifted).double() / unshifted.shape[0]
    lost = raw - torch.outer(exact.mean(), exact.mean())
    assert float((torch.linalg.eigvalsh(lost) - torch.linalg.eigvalsh(covariance(exact))).abs().max()) > 1e-2


class _Attention(nn.Module):
    """Three projections of one input (input side: one 8x8 sum for three 8x8 outputs) and an expansion."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8, bias=False)
        self.up = nn.Linear(8, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ self.v(x)
        return self.up(a)


def test_input_side_statistics_equal_output_side() -> None:
    gm = fxdeco.trace(_Attention().double())  # float64, so both paths agree to rounding
    sites, _ = find_sites(gm)
    batches = [torch.randn(3, 5, 8, dtype=torch.float64) + 0.5 for _ in range(3)]
    both = []
    for input_side in (True, False):
        interpreter = StatsInterpreter(gm, sites, input_side=input_side)
        for b in batches:  # one interpreter reused across calls
            interpreter.run(b)
        both.append((interpreter, interpreter.statistics))
    (fast, fast_stats), (slow, slow_stats) = both
    assert set(fast.input_groups) and not slow.input_groups  # the fast path really was taken
    assert sorted(s.target for g in fast.input_groups.values() for s in g) == ["k", "q", "up", "v"]
    assert fast_stats.keys() == slow_stats.keys() == {"q", "k", "v", "up"}
    for name in slow_stats:
        assert fast_stats[name].rows == slow_stats[name].rows == 45
        assert fast_stats[name].samples == slow_stats[name].samples == 9
        torch.testing.assert_close(fast_stats[name].sum_outer, slow_stats[name].sum_outer, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(fast_stats[name].sum, slow_stats[name].sum, rtol=1e-10, atol=1e-9)


# ----------------------------------------------------------------------------- new


def test_conv_statistics_are_those_of_the_bias_free_output_with_channels_last() -> None:
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    gm = torch.fx.symbolic_trace(nn.Sequential(conv))
    sites, _ = find_sites(gm)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    interpreter = StatsInterpreter(gm, sites)
    out = interpreter.run(x)
    torch.testing.assert_close(out, conv(x), rtol=0, atol=0)  # the interpreter returns the graph's output
    stats = interpreter.statistics["0"]
    y = (conv(x) - conv.bias.reshape(1, -1, 1, 1)).detach().movedim(1, -1).reshape(-1, 5)  # one row per pixel
    assert (stats.rows, stats.samples, stats.weight) == (2 * 4 * 6, 2, 48.0)
    assert stats.rows_per_sample == 24
    torch.testing.assert_close(stats.sum_outer, y.T @ y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.mean(), y.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.variance(), y.var(0, unbiased=False), rtol=1e-10, atol=1e-12)


def test_activation_statistics_of_two_halves_add_up_to_the_whole() -> None:
    """Output-side and input-side sums both merge by ``+`` (``ActivationStatistics.__add__``)."""
    gm = torch.fx.symbolic_trace(_Attention().double())
    sites, _ = find_sites(gm)
    batches = [torch.randn(2, 5, 8, dtype=torch.float64) for _ in range(4)]

    def collect(parts: list[torch.Tensor]) -> ActivationStatistics:
        collected = ActivationStatistics()
        interpreter = StatsInterpreter(gm, sites, collected)
        for b in parts:
            interpreter.run(b)
        return collected

    whole, first, second = collect(batches), collect(batches[:1]), collect(batches[1:])
    assert whole.inputs, "the shared input of q/k/v/up must be accumulated on the input side"
    merged = first + second
    assert merged.inputs.keys() == whole.inputs.keys() and merged.outputs.keys() == whole.outputs.keys()
    want, got = whole.per_site(gm, sites), merged.per_site(gm, sites)
    assert got.keys() == want.keys() == {"q", "k", "v", "up"}
    for name in want:
        assert (got[name].rows, got[name].samples) == (want[name].rows, want[name].samples) == (40, 8)
        torch.testing.assert_close(got[name].sum_outer, want[name].sum_outer, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(got[name].sum, want[name].sum, rtol=1e-12, atol=1e-10)
        assert first.per_site(gm, sites)[name].rows == 10  # each half alone is not the whole


def test_a_batch_with_nan_adds_nothing_and_names_the_site() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    gm = torch.fx.symbolic_trace(model)
    sites, _ = find_sites(gm)
    interpreter = StatsInterpreter(gm, sites)
    interpreter.run(torch.randn(6, 4))
    before = {k: (v.sum_outer.clone(), v.rows) for k, v in interpreter.statistics.items()}
    bad = torch.randn(6, 4)
    bad[2, 1] = float("nan")
    interpreter.batch_index = 1
    with pytest.raises(NonFiniteActivationError, match=r"site '0' .*NaN/Inf on calibration batch 1"):
        interpreter.run(bad)
    after = interpreter.statistics
    for name, (outer, rows) in before.items():  # all or nothing: not even layer '0' took the batch
        assert after[name].rows == rows and torch.equal(after[name].sum_outer, outer)


def test_defer_commit_adds_a_batch_only_when_committed() -> None:
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 3)))
    sites, _ = find_sites(gm)
    interpreter = StatsInterpreter(gm, sites, defer_commit=True)
    interpreter.run(torch.randn(5, 4))
    assert interpreter.statistics == {} and interpreter.pending
    interpreter.commit()
    assert interpreter.statistics["0"].rows == 5 and not interpreter.pending
    interpreter.run(torch.randn(7, 4))
    assert interpreter.statistics["0"].rows == 5
    interpreter.commit()
    assert interpreter.statistics["0"].rows == 12


class _Tokens(nn.Module):
    """A per-token Linear on (batch, tokens, 6) and a head on the pooled (batch, 6) rows."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(6, 4), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), self.head(x.mean(1))


def test_leading_dim_weights_mask_token_rows_only() -> None:
    model = _Tokens().double()
    gm = torch.fx.symbolic_trace(model)
    sites, _ = find_sites(gm)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    weights = LeadingDimWeights(mask)
    interpreter = StatsInterpreter(gm, sites, row_weights=weights, input_side=False)
    interpreter.run(x)
    assert weights.matched == {"fc"} and weights.unmatched == {"head": (2, 2)}
    fc = interpreter.statistics["fc"]
    kept = (model.fc(x) - model.fc.bias).detach()[mask.bool()]  # the 3 unmasked tokens
    assert (fc.rows, fc.weight) == (6, 3.0)
    torch.testing.assert_close(fc.second_moment(), kept.T @ kept / 3, rtol=1e-12, atol=1e-12)
    assert interpreter.statistics["head"].weight == 2.0  # pooled rows: unweighted
    with pytest.raises(ValueError, match="at least one dimension"):
        LeadingDimWeights(torch.tensor(1.0))
