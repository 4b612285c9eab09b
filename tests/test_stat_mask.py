"""Statistics that ignore padding: ``stat_mask_fn=`` / ``stat_mask=`` (issue 3, item 4).

A padded batch with its attention mask must give the statistics of the real tokens alone, on both
graph flavours and on both accumulation paths (a Linear's output, and the input shared by several
Linears); layers whose rows are not ``(batch, tokens, channels)`` stay unmasked; bad masks are refused.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import fxdeco
from passes import SiteStatistics

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, DIM, PAD = 40, 8, 0


class TinyEncoder(nn.Module):
    """Embedding, masked single-head attention, an MLP, mean pooling over the mask and a head.

    q/k/v share one input (input-side sums), ``up`` reads the residual alone (input side: 8² < 32²),
    ``out``/``down`` are output-side, and ``head`` reads the pooled ``(batch, DIM)`` tensor, which must
    stay unmasked even though the padded length equals DIM in these tests.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.q, self.k, self.v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.out = nn.Linear(DIM, DIM)
        self.up, self.down = nn.Linear(DIM, 32), nn.Linear(32, DIM)
        self.head = nn.Linear(DIM, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(DIM)
        scores = scores.masked_fill(attention_mask[:, None, :] == 0, float("-inf"))
        h = x + self.out(torch.softmax(scores, -1) @ self.v(x))
        h = h + self.down(torch.relu(self.up(h)))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def sentences(lengths: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


def padded(sents: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A right-padded batch, as a tokenizer with padding=True returns it."""
    t = max(len(s) for s in sents)
    ids = torch.full((len(sents), t), PAD)
    mask = torch.zeros(len(sents), t, dtype=torch.long)
    for i, s in enumerate(sents):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


# Each padded batch holds two sentences of each of two lengths, so the reference can run the same
# sentences unpadded in batches of two (no batch or length of size 1, which torch.export would freeze).
LENGTHS = [[8, 5, 8, 5], [3, 8, 3, 8], [6, 4, 4, 6]]


def calibration() -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    masked, unpadded = [], []
    for seed, lengths in enumerate(LENGTHS):
        sents = sentences(lengths, seed)
        masked.append(padded(sents))
        for n in sorted(set(lengths)):
            unpadded.append(padded([s for s in sents if len(s) == n]))
    assert all(bool(b["attention_mask"].all()) for b in unpadded)
    return masked, unpadded


def prepare(model: nn.Module, flavour: str, example: dict[str, torch.Tensor], **kwargs) -> fxdeco.PreparedModel:
    if flavour == "export":
        prepared = fxdeco.prepare(model, example, capture="export", **kwargs)
        assert prepared.gm.meta["fxdeco_capture"].kind == "export"
        return prepared
    return fxdeco.prepare(model, **kwargs)


def assert_same_moments(got: SiteStatistics, want: SiteStatistics) -> None:
    assert got.weight == want.weight
    torch.testing.assert_close(got.second_moment(), want.second_moment(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got.mean(), want.mean(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got.variance(), want.variance(), rtol=1e-12, atol=1e-13)


TOKEN_LAYERS = ["q", "k", "v", "out", "up", "down"]


@pytest.mark.parametrize("flavour", ["symbolic", "export"])
def test_masked_statistics_equal_those_of_the_unpadded_tokens(flavour: str) -> None:
    torch.manual_seed(0)
    model = TinyEncoder().double()
    masked_batches, unpadded_batches = calibration()

    masked = prepare(model, flavour, masked_batches[0], stat_mask_fn=lambda b: b["attention_mask"])
    fxdeco.calibrate(masked, masked_batches)
    reference = fxdeco.calibrate(prepare(model, flavour, unpadded_batches[0]), unpadded_batches)
    plain = fxdeco.calibrate(prepare(model, flavour, masked_batches[0]), masked_batches)  # padding counted

    # Both accumulation paths were exercised.
    assert masked.collected.inputs and masked.collected.outputs
    assert {"out", "down", "head"} <= set(masked.collected.outputs)

    real = sum(int(b["attention_mask"].sum()) for b in masked_batches)
    everything = sum(b["attention_mask"].numel() for b in masked_batches)
    assert real < everything
    for name in TOKEN_LAYERS:
        got, want, unmasked = masked.statistics[name], reference.statistics[name], plain.statistics[name]
        assert_same_moments(got, want)
        assert got.weight == real
        # rows and samples are the cost basis: every row the layer computes, padding included
        assert (got.rows, got.samples) == (unmasked.rows, unmasked.samples) == (everything, 12)
        assert not torch.allclose(unmasked.second_moment(), want.second_moment()), "padding made no difference"

    # The head reads pooled (batch, 8) rows: not a (batch, tokens) tensor, although 8 is the padded length.
    head, head_plain = masked.statistics["head"], plain.statistics["head"]
    assert head.rows == head.weight == head_plain.weight == 12
    torch.testing.assert_close(head.sum_outer, head_plain.sum_outer, rtol=0, atol=0)


def test_direct_call_with_stat_mask_equals_calibrate_batch() -> None:
    model = TinyEncoder().double()
    batches, _ = calibration()
    by_fn = fxdeco.prepare(model, stat_mask_fn=lambda b: b["attention_mask"])
    direct = fxdeco.prepare(model)
    for b in batches:
        out = by_fn.calibrate_batch(b)
        assert torch.equal(out, direct(**b, stat_mask=b["attention_mask"]))
        assert torch.equal(out, model(**b))  # both still return the model's outputs
    for name in TOKEN_LAYERS + ["head"]:
        assert by_fn.statistics[name].weight == direct.statistics[name].weight
        torch.testing.assert_close(by_fn.statistics[name].sum_outer, direct.statistics[name].sum_outer, rtol=0, atol=0)


def test_transform_accepts_stat_mask_fn_and_keeps_mac_accounting() -> None:
    model = TinyEncoder()
    batches, _ = calibration()
    small = fxdeco.transform(model, batches, nsr_threshold=0.3, stat_mask_fn=lambda b: b["attention_mask"])
    plain = fxdeco.transform(model, batches, nsr_threshold=0.3)
    masked_rows = {r["name"]: r for r in fxdeco.report(small).rows}
    plain_rows = {r["name"]: r for r in fxdeco.report(plain).rows}
    for name, row in plain_rows.items():
        assert masked_rows[name]["macs_before"] == row["macs_before"]  # MACs count padded rows too
    assert fxdeco.report(small).totals["macs_before"] == fxdeco.report(plain).totals["macs_before"]
    with torch.no_grad():
        assert small(**batches[0]).shape == (4, 3)


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_conv_and_pooled_layers_are_unmasked_and_a_mask_fitting_nothing_is_warned_once() -> None:
    model = _ConvNet()
    images = [torch.randn(2, 3, 5, 5) for _ in range(3)]
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])  # (2, 4): the conv output is (2, 4, 5, 5)
    prepared = fxdeco.prepare(model, stat_mask_fn=lambda b: mask)
    plain = fxdeco.calibrate(fxdeco.prepare(model), images)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxdeco.calibrate(prepared, images)
    messages = [str(w.message) for w in caught if "statistics mask" in str(w.message)]
    assert len(messages) == 1, messages
    assert "(2, 4)" in messages[0] and "fits no layer" in messages[0]
    for name in ("conv", "fc"):
        assert prepared.statistics[name].weight == plain.statistics[name].weight
        torch.testing.assert_close(prepared.statistics[name].sum_outer, plain.statistics[name].sum_outer,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("mask, match", [
    (torch.tensor([[1, 1, -1, 0]] * 4), "negative weight"),
    (torch.tensor([[1.0, float("nan"), 1.0, 1.0]] * 4), "NaN or Inf"),
    ([[1, 1, 0, 0]] * 4, "must be a tensor"),
    (torch.tensor(1.0), "at least one dimension"),
], ids=["negative", "nan", "list", "scalar"])
def test_bad_masks_are_rejected_before_any_statistics(mask: object, match: str) -> None:
    model = TinyEncoder()
    batches, _ = calibration()
    prepared = fxdeco.prepare(model)
    prepared(**batches[0], stat_mask=batches[0]["attention_mask"])
    before = prepared.collected.outputs["out"].sum_outer.clone()
    batch = padded(sentences([4, 4, 3, 2], seed=9))
    with pytest.raises(fxdeco.CalibrationError, match=match) as info:
        prepared(**batch, stat_mask=mask)
    assert "calibration batch 1" in str(info.value)
    assert prepared.batches == 1 and torch.equal(prepared.collected.outputs["out"].sum_outer, before)


def test_stat_mask_fn_misuse_is_explained() -> None:
    model = TinyEncoder()
    batches, _ = calibration()
    with pytest.raises(TypeError, match="stat_mask_fn must be a function"):
        fxdeco.prepare(model, stat_mask_fn=batches[0]["attention_mask"])
    with pytest.raises(TypeError, match="stat_mask_fn must be a function"):
        fxdeco.transform(model, batches, stat_mask_fn="attention_mask")
    prepared = fxdeco.prepare(model, stat_mask_fn=lambda b: b["mask"])
    with pytest.raises(fxdeco.CalibrationError, match="stat_mask_fn failed on calibration batch 0: KeyError"):
        fxdeco.calibrate(prepared, batches)
    with pytest.raises(fxdeco.CalibrationError, match="calibrate_batch"):
        prepared(**batches[0])  # a direct call cannot apply a function of the loader's batch
    assert prepared.batches == 0
    none = fxdeco.prepare(model, stat_mask_fn=lambda b: None)  # None: this batch is unmasked
    fxdeco.calibrate(none, batches[:1])
    assert none.statistics["out"].weight == batches[0]["attention_mask"].numel()


def test_sequential_mode_warns_once_about_a_mask_that_fits_no_layer() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 10, 8, generator=g) for _ in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxdeco.transform(Tokens(), batches, fxdeco.Falor(nsr_threshold=0.05, sequential=True, show_progress=False),
                         stat_mask_fn=lambda x: torch.ones(10, 4))  # (tokens, batch): transposed
    messages = [str(w.message) for w in caught if "statistics mask" in str(w.message)]
    assert len(messages) == 1 and "(10, 4)" in messages[0] and "fits no layer" in messages[0], messages
