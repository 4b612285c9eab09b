"""falor's final-output mode: every accepted rank measured under the thresholds, graph replays exact."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import fxdeco
from fxdeco.methods.falor.final_metrics import final_nsr, symmetric_kl
from passes import factorize_sites
from tests.models import Residual, residual_batches as _batches

pytestmark = pytest.mark.usefixtures("one_thread")


def _only(gm: torch.fx.GraphModule, prepared: fxdeco.PreparedModel, small: torch.fx.GraphModule,
          target: str) -> torch.fx.GraphModule:
    """The original graph with only ``target`` replaced by the factors ``small`` holds for it."""
    from passes import Factorization

    first, second = small.get_submodule(f"{target}.0"), small.get_submodule(f"{target}.1")
    fact = Factorization(first.weight.detach(), second.weight.detach(), {}, second.bias.detach()
                         if second.bias is not None else None)
    return factorize_sites(prepared.gm, prepared.sites, {target: fact})


@pytest.mark.parametrize("threshold", [0.002, 0.02])
def test_every_accepted_rank_is_measured_under_the_threshold(threshold: float) -> None:
    model = Residual().eval()
    calib = _batches()
    prepared = fxdeco.calibrate(fxdeco.prepare(model), calib)
    small = fxdeco.convert(prepared, nsr_final_threshold=threshold)
    decisions = small.meta["fxdeco"].decisions
    decomposed = [d for d in decisions if d.decomposed]
    assert decomposed, "low-rank inputs must let some layer be decomposed"
    for d in decomposed:
        one = _only(prepared.gm, prepared, small, d.target)
        measured = [final_nsr(model(*b), one(*b)) for b in calib[:2]]
        mean = sum(measured) / len(measured)
        assert mean <= threshold
        assert mean == pytest.approx(d.nsr_final, rel=1e-3, abs=1e-7)
        assert d.probes >= 1
    assert small.meta["fxdeco"].summary["probes"] == sum(d.probes for d in decisions)


def test_a_smaller_threshold_keeps_more() -> None:
    model = Residual().eval()
    prepared = fxdeco.calibrate(fxdeco.prepare(model), _batches())
    loose = fxdeco.convert(prepared, nsr_final_threshold=0.05)
    tight = fxdeco.convert(prepared, nsr_final_threshold=0.0005)
    assert fxdeco.report(tight).totals["params_after"] > fxdeco.report(loose).totals["params_after"]


def test_kl_threshold_alone() -> None:
    model = Residual().eval()
    calib = _batches()
    prepared = fxdeco.calibrate(fxdeco.prepare(model), calib)
    small = fxdeco.convert(prepared, kl_final_threshold=1e-3)
    for d in small.meta["fxdeco"].decisions:
        if d.decomposed:
            one = _only(prepared.gm, prepared, small, d.target)
            assert sum(symmetric_kl(model(*b), one(*b)) for b in calib[:2]) / 2 <= 1e-3


def test_the_report_shows_the_measured_kl_and_no_kl_that_was_not_measured() -> None:
    """README: the measured values are in the report (nsr_final, kl_final); a KL never measured is not a 0."""
    model = Residual().eval()
    calib = _batches()
    prepared = fxdeco.calibrate(fxdeco.prepare(model), calib)
    by_kl = fxdeco.report(fxdeco.convert(prepared, kl_final_threshold=1e-3))
    rows = [r for r in by_kl.rows if r["rank"]]
    assert rows and all(0 <= r["kl_final"] <= 1e-3 for r in rows)
    assert "kl" in by_kl.table().splitlines()[0].split()
    by_nsr = fxdeco.convert(prepared, nsr_final_threshold=0.02)
    assert all(d.kl_final is None for d in by_nsr.meta["fxdeco"].decisions)
    assert all(r["kl_final"] is None for r in fxdeco.report(by_nsr).rows)


def test_shared_layer_is_probed_at_both_calls() -> None:
    """``mid`` runs twice; its probe must decompose both calls, as the rewrite does."""
    model = Residual().eval()
    calib = _batches()
    prepared = fxdeco.calibrate(fxdeco.prepare(model), calib)
    small = fxdeco.convert(prepared, nsr_final_threshold=0.01, skip=["inp", "out", "conv"])
    (mid,) = [d for d in small.meta["fxdeco"].decisions if d.target == "mid"]
    if mid.decomposed:
        measured = sum(final_nsr(model(*b), small(*b)) for b in calib[:2]) / 2
        assert measured == pytest.approx(mid.nsr_final, rel=1e-3, abs=1e-7)


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc2(torch.relu(self.fc1(x))), "aux": x.sum(1)}


def test_non_tensor_output_needs_output_fn() -> None:
    basis = torch.randn(4, 16)
    calib = [torch.randn(32, 4) @ basis for _ in range(3)]
    with pytest.raises(TypeError, match="output_fn"):
        fxdeco.transform(DictOut(), calib, nsr_final_threshold=0.01)
    small = fxdeco.transform(DictOut(), calib, nsr_final_threshold=0.01, output_fn=lambda out: out["logits"])
    assert any(d.decomposed for d in small.meta["fxdeco"].decisions)
    with pytest.raises(TypeError, match="output_fn must return"):
        fxdeco.transform(DictOut(), calib, nsr_final_threshold=0.01, output_fn=lambda out: out["missing"] if False
                         else 3)


@pytest.mark.parametrize("options, match", [
    ({"nsr_final_threshold": 0.0}, "nsr_final_threshold"),
    ({"nsr_final_threshold": math.nan}, "nsr_final_threshold"),
    ({"kl_final_threshold": -1.0}, "kl_final_threshold"),
    ({"nsr_final_threshold": 0.01, "keep_params": 0.5}, "not both"),
    ({"nsr_final_threshold": 0.01, "num_metric_batches": 0}, "num_metric_batches"),
])
def test_bad_final_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fxdeco.transform(nn.Linear(4, 4), [torch.randn(8, 4)], **options)


def test_more_metric_batches_than_kept() -> None:
    prepared = fxdeco.calibrate(fxdeco.prepare(nn.Linear(8, 8), keep_batches=1), [torch.randn(16, 8)] * 3)
    with pytest.raises(ValueError, match="keep_batches=2"):
        fxdeco.convert(prepared, nsr_final_threshold=0.01)


def test_single_sample_batches_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 samples"):
        fxdeco.transform(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), [torch.randn(1, 8)] * 3,
                         nsr_final_threshold=0.01)


class _TwoHeads(nn.Module):
    """A body whose tokens are returned, and a pooler head beside them (as BertModel's ``pooler_output``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.pooler = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x).relu()
        return {"tokens": h, "pooled": self.pooler(h.mean(1)).tanh()}


def test_a_layer_the_compared_output_does_not_read_is_kept_dense() -> None:
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    calib = [torch.randn(8, 6, 16) for _ in range(3)]
    with pytest.warns(UserWarning, match="does not reach the tensor output_fn selects.*pooler"):
        small = fxdeco.transform(model, calib, nsr_final_threshold=1e-3, output_fn=lambda out: out["tokens"],
                                 show_progress=False)
    pooler = next(d for d in small.meta["fxdeco"].decisions if d.target == "pooler")
    assert not pooler.decomposed and "does not reach" in pooler.reason  # not cut to its smallest rank unseen
    with torch.no_grad():
        assert torch.allclose(small(calib[0])["pooled"], model(calib[0])["pooled"], atol=1e-2)


def _rank_4(layer: nn.Linear) -> nn.Linear:
    """``layer`` with an exactly rank-4 weight."""
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.out_features, 4) @ torch.randn(4, layer.in_features)
                           / layer.in_features ** 0.5)
    return layer


def test_final_output_mode_on_unbatched_samples_warns() -> None:
    """Single 1-D samples as calibration batches: the final NSR took the 10 logits for the samples and accepted a
    rank-3 cut of a rank-4 layer at a measured 0.005 (held-out NSR 0.22, up to 152% off on a sample), silently."""
    torch.manual_seed(0)
    model = nn.Sequential(_rank_4(nn.Linear(32, 64)), nn.GELU(), _rank_4(nn.Linear(64, 10))).eval()
    vectors = [torch.randn(32) for _ in range(8)]
    with pytest.warns(UserWarning, match=r"10 entries along dimension 0, the calibration batch 32 samples.*unbatched"):
        fxdeco.transform(model, vectors, nsr_final_threshold=0.01, show_progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*along dimension 0")
        fxdeco.transform(model, [torch.stack(vectors[:4]), torch.stack(vectors[4:])], nsr_final_threshold=0.01,
                         show_progress=False)
