"""A tensor given as the calibration loader is refused before any batch is read: iterating it yields its rows, so
``transform(model, x)`` with ``x`` of shape (64, 8) calibrated on 64 one-dimensional "batches" of 8 samples each (the
leading dimension): the report said 56 MACs per sample for a model of 448, and ``keep_macs`` allocated on that."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxdeco


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _samples() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 3, generator=g) @ torch.randn(3, 8, generator=g)


@pytest.mark.parametrize("call", [
    lambda x: fxdeco.transform(_model(), x, keep_macs=0.5, show_progress=False),
    lambda x: fxdeco.calibrate(fxdeco.prepare(_model()), x),
    lambda x: fxdeco.backend(calib_loader=x, inner="eager"),
])
def test_a_tensor_as_the_loader_is_refused_with_the_remedy(call) -> None:
    with pytest.raises(TypeError, match=r"tensor of shape \(64, 8\).*pass \[x\] for one batch"):
        call(_samples())


def test_the_same_samples_as_one_batch_count_per_sample() -> None:
    small = fxdeco.transform(_model(), [_samples()], keep_macs=0.5, show_progress=False)
    assert fxdeco.report(small).totals["macs_before"] == 8 * 16 + 16 * 16 + 16 * 4  # MACs of one sample
