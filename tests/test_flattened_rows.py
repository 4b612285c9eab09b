"""MACs per sample of a layer that sees its rows flattened across batch and tokens (GPT-2's Conv1D does
``addmm`` on ``(batch * tokens, in)``): a sample is a batch element of the model's input, not a row."""

import pytest
import torch
import torch.nn as nn

import fxdeco


class Flattening(nn.Module):
    """A token MLP whose Linears read ``(batch * tokens, channels)`` rows, as GPT-2's Conv1D does."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        h = self.up(x.reshape(-1, width)).relu()
        return self.down(h).reshape(batch, tokens, width)


@pytest.mark.parametrize("sequential", [False, True])
def test_macs_count_every_token_of_a_sample(sequential: bool) -> None:
    torch.manual_seed(0)
    model, tokens = Flattening().eval(), 8
    calib = [torch.randn(4, tokens, 16) for _ in range(3)]
    small = fxdeco.transform(model, calib, fxdeco.Falor(nsr_threshold=0.5, sequential=sequential),
                             show_progress=False)
    record = small.meta["fxdeco"]
    for d in record.decisions:
        assert d.macs_before == tokens * d.weight_shape[0] * d.weight_shape[1]  # per sample: every token
        if d.rank is not None:
            assert d.macs_after == tokens * d.rank * sum(d.weight_shape)
    saved = sum(d.macs_before - d.macs_after for d in record.decisions)
    assert record.macs_before - record.macs_after == pytest.approx(saved)
