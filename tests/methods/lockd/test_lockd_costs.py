"""lockd's cost pass: the MACs in the report of a lockd decomposition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxdeco

pytestmark = pytest.mark.usefixtures("one_thread")


class _Flagged(nn.Module):
    """``forward(x, causal=False)``, calibrated without the flag: traced as ``causal=False`` (timm ViT's is_causal)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        h = self.b(torch.relu(self.a(x)))
        return h.flip(0) if causal else h


def test_lockd_counts_macs_of_a_model_with_an_input_traced_as_its_default() -> None:
    """The cost pass gave such an input None instead of its default, the graph's check failed, and the report had no
    MACs ("could not count MACs on the first batch")."""
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(64, 4, generator=g) @ torch.randn(4, 32, generator=g) for _ in range(2)]
    torch.manual_seed(0)
    small = fxdeco.transform(_Flagged().eval(), calib, fxdeco.Lockd(steps=5), show_progress=False)
    assert fxdeco.report(small).totals["macs_before"] == 32 * 64 + 64 * 32
