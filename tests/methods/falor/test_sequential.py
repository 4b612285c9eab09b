"""falor with sequential=True: blocks calibrated and decomposed one at a time (fxdeco.sequential)."""

from __future__ import annotations

import tempfile
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn

import fxdeco
from fxdeco.metadata import model_record
from fxdeco.methods.falor import sequential as falor_sequential_module
from fxdeco.methods.falor.budget import BudgetError
from fxdeco.sequential import BlockCalibration
from tests.passes.test_blocks import Stack


def _data(n: int = 4, rows: int = 64, width: int = 8, rank: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(rank, width, generator=g)
    return [torch.randn(rows, rank, generator=g) @ basis + 0.05 * torch.randn(rows, width, generator=g)
            for _ in range(n)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return Stack(depth=3, width=32).eval()


def _ranks(gm: torch.fx.GraphModule) -> dict[str, int | None]:
    return {d.target: d.rank for d in model_record(gm).decisions}


def test_sequential_equals_one_shot_when_nothing_upstream_is_decomposed() -> None:
    model, data = _model(), _data(width=32)
    upstream = ["layers.0.*", "layers.1.*"]  # kept dense: layer 2 and the head see the original inputs
    one = fxdeco.transform(model, data, fxdeco.Falor(nsr_threshold=0.01, skip=upstream), show_progress=False)
    seq = fxdeco.transform(model, data, fxdeco.Falor(nsr_threshold=0.01, skip=upstream, sequential=True),
                           show_progress=False)
    assert _ranks(seq) == _ranks(one)
    assert any(r is not None for r in _ranks(seq).values())
    x = torch.randn(10, 32)
    torch.testing.assert_close(seq(x), one(x), rtol=1e-5, atol=1e-6)


def test_sequential_layers_see_the_decomposed_upstream() -> None:
    model, data = _model(), _data(width=32)
    one = fxdeco.transform(model, data, fxdeco.Falor(nsr_threshold=0.05), show_progress=False)
    seq = fxdeco.transform(model, data, fxdeco.Falor(nsr_threshold=0.05, sequential=True), show_progress=False)
    first = [t for t in _ranks(one) if t.startswith("layers.0.")]
    assert {t: _ranks(seq)[t] for t in first} == {t: _ranks(one)[t] for t in first}  # nothing upstream of layer 0
    # downstream statistics differ: the factors of the head are not one-shot's
    w_one = dict(one.named_parameters())
    w_seq = dict(seq.named_parameters())
    head = [n for n in w_seq if n.startswith("head")]
    assert head and any(w_one[n].shape != w_seq[n].shape or not torch.equal(w_one[n], w_seq[n]) for n in head)
    summary = model_record(seq).summary["sequential"]
    assert summary["blocks"] == 4 and summary["walks"] == 1


@pytest.mark.parametrize("measure", ["keep_params", "keep_macs"])
def test_sequential_budget_holds_for_the_whole_model(measure: str) -> None:
    model, data = _model(), _data(width=32)
    seq = fxdeco.transform(model, data, fxdeco.Falor(**{measure: 0.6}, sequential=True), show_progress=False)
    report = fxdeco.report(seq).totals
    key = "params" if measure == "keep_params" else "macs"
    assert report[f"{key}_after"] <= 0.6 * report[f"{key}_before"] * (1 + 1e-9)
    assert report[f"{key}_after"] >= 0.5 * report[f"{key}_before"]  # the budget is used, not wasted
    assert model_record(seq).summary["sequential"]["walks"] == 2


def test_sequential_statistics_memory_is_one_block() -> None:
    model, data = _model(), _data(width=32)
    seq = fxdeco.transform(model, data, fxdeco.Falor(nsr_threshold=0.05, sequential=True), show_progress=False)
    prepared = fxdeco.calibrate(fxdeco.prepare(model), data)
    whole = sum(s.shifted_outer.numel() * 8 for s in (*prepared.collected.outputs.values(),
                                                      *prepared.collected.inputs.values()))
    peak = model_record(seq).summary["sequential"]["peak_statistics_bytes"]
    assert 0 < peak <= whole / 3  # three equal layers and a small head


def test_spilled_boundaries_give_the_same_model_and_are_removed(tmp_path) -> None:
    model, data = _model(), _data(width=32)
    memory = fxdeco.transform(model, data, fxdeco.Falor(keep_params=0.6, sequential=True), show_progress=False)
    spilled = fxdeco.transform(model, data, fxdeco.Falor(keep_params=0.6, sequential=True, spill_dir=str(tmp_path)),
                               show_progress=False)
    x = torch.randn(7, 32)
    assert _ranks(memory) == _ranks(spilled)
    torch.testing.assert_close(memory(x), spilled(x))
    assert list(tmp_path.iterdir()) == []


def test_given_blocks_and_a_text_model(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    batches = [{"input_ids": torch.randint(0, 100, (2, 24))} for _ in range(3)]
    seq = fxdeco.transform(model, batches, fxdeco.Falor(keep_params=0.7, sequential=True, skip=["lm_head"]),
                           show_progress=False)
    assert model_record(seq).summary["sequential"]["blocks"] == 3  # two decoder layers and lm_head
    whole = fxdeco.transform(model, batches, fxdeco.Falor(nsr_threshold=0.1, sequential=True, blocks=["model"]),
                             show_progress=False)
    assert model_record(whole).summary["sequential"]["blocks"] == 2  # the whole decoder, and lm_head
    ids = torch.randint(0, 100, (1, 9))  # another sequence length than calibration's
    assert seq(input_ids=ids).logits.shape == (1, 9, 100)


def test_bad_sequential_options_fail_at_once() -> None:
    with pytest.raises(ValueError, match="final-output"):
        fxdeco.Falor(nsr_final_threshold=0.1, sequential=True)
    with pytest.raises(ValueError, match="keep_latency"):
        fxdeco.Falor(keep_latency=0.6, sequential=True)
    with pytest.raises(ValueError, match="blocks is an option of sequential mode"):
        fxdeco.Falor(blocks=["layers.0"])
    with pytest.raises(TypeError, match="blocks=\\['layers'\\]"):
        fxdeco.Falor(blocks="layers", sequential=True)
    model, data = _model(), _data(width=32)
    prepared = fxdeco.calibrate(fxdeco.prepare(model), data)
    with pytest.raises(ValueError, match="fxdeco.transform"):
        fxdeco.convert(prepared, fxdeco.Falor(sequential=True))
    with pytest.raises(ValueError, match="no layer is inside"):
        fxdeco.transform(model, data, fxdeco.Falor(sequential=True, blocks=["encoder"]), show_progress=False)
    with pytest.raises(fxdeco.methods.falor.budget.BudgetError):
        fxdeco.transform(model, data, fxdeco.Falor(keep_params=0.01, sequential=True), show_progress=False)


def test_a_bad_batch_names_itself_and_leaves_the_model_unchanged() -> None:
    model, data = _model(), _data(width=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxdeco.CalibrationError, match="batch 2"):
        fxdeco.transform(model, [*data[:2], torch.randn(4, 5)], fxdeco.Falor(sequential=True), show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_report_shows_what_each_mode_held() -> None:
    model, data = _model(), _data(width=32)
    one = fxdeco.report(fxdeco.transform(model, data, fxdeco.Falor(nsr_threshold=0.05), show_progress=False))
    seq = fxdeco.report(fxdeco.transform(model, data, fxdeco.Falor(nsr_threshold=0.05, sequential=True),
                                         show_progress=False))
    # one-shot: every layer's float64 sums (the input-side ones shared); sequential: the largest block's
    prepared = fxdeco.calibrate(fxdeco.prepare(model), data)
    held = sum(8 * (s.shifted_outer.numel() + s.shifted_sum.numel())
               for s in (*prepared.collected.outputs.values(), *prepared.collected.inputs.values()))
    assert one.totals["statistics_bytes"] == held
    assert 0 < seq.totals["statistics_bytes"] < held / 2
    assert one.totals["peak_host_bytes"] > 0
    assert (one.totals["peak_device_bytes"] is None) == (not torch.cuda.is_initialized())
    assert "memory: statistics held at most" in str(seq)


def test_a_statistics_mask_applies_block_by_block() -> None:
    """Padded text: the mask keeps padding out of every block's statistics, as it does one-shot."""

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 32)
            self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(2))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            x = self.embed(input_ids)
            for layer in self.layers:
                x = x + torch.relu(layer(x))
            return x * attention_mask.unsqueeze(-1)

    torch.manual_seed(0)
    model = Tagger().eval()
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):
        mask = (torch.arange(12) < torch.randint(3, 12, (8, 1), generator=g)).long()
        batches.append({"input_ids": torch.randint(0, 50, (8, 12), generator=g) * mask, "attention_mask": mask})
    options = dict(nsr_threshold=0.01, skip=["layers.0"])  # layer 1 sees the original layer 0 in both modes
    masked = dict(stat_mask_fn=lambda b: b["attention_mask"], show_progress=False)
    one = fxdeco.transform(model, batches, fxdeco.Falor(**options), **masked)
    seq = fxdeco.transform(model, batches, fxdeco.Falor(**options, sequential=True), **masked)
    unmasked = fxdeco.transform(model, batches, fxdeco.Falor(**options, sequential=True), show_progress=False)
    rows = {d.target: d.calib_rows for d in model_record(seq).decisions}
    assert rows["layers.1"] == sum(int(b["attention_mask"].sum()) for b in batches)  # real tokens only
    assert _ranks(seq) == _ranks(one)
    assert model_record(unmasked).decisions[1].calib_rows == 3 * 8 * 12


def test_a_misspelt_block_is_refused_before_any_batch_is_read() -> None:
    """blocks=["layers.0", "layer.1"] ran, with layer 1's Linears each a block of its own."""
    model, data = _model(), _data(width=32)
    read = []

    def loader():
        for x in data:
            read.append(x)
            yield x

    prepared = fxdeco.prepare(model, data[0], keep_batches=0)
    with pytest.raises(ValueError, match="no layer is inside 'layer.1' \\(closest: 'layers.1'"):
        BlockCalibration(prepared, loader(), scopes=["layers.0", "layer.1"])
    assert read == []
    with pytest.raises(ValueError, match="inside 'layer.1'"):  # the same through transform
        fxdeco.transform(model, data, fxdeco.Falor(sequential=True, blocks=["layers.0", "layer.1"]),
                         show_progress=False)


def _failing(case: str, data: list[torch.Tensor]) -> tuple[Any, dict[str, Any], dict[str, Any], type]:
    """(batches, Falor options, transform options, the error expected) for a sequential run that fails."""

    def interrupted():
        yield from data[:2]
        raise KeyboardInterrupt

    masks = []

    def failing_mask(batch: torch.Tensor) -> torch.Tensor:
        masks.append(batch)
        if len(masks) == 3:
            raise RuntimeError("no mask for this batch")
        return torch.ones(batch.shape[0])

    return {
        "loader raises": ((x if i < 3 else 1 / 0 for i, x in enumerate(data)), {}, {}, ZeroDivisionError),
        "Ctrl-C": (interrupted(), {}, {}, KeyboardInterrupt),
        "batch does not fit": ([*data[:2], (data[2], data[2])], {}, {}, fxdeco.CalibrationError),  # 2 inputs, not 1
        "stat_mask_fn fails": (data, {}, {"stat_mask_fn": failing_mask}, fxdeco.CalibrationError),
        "bad blocks": (data, {"blocks": ["nowhere"]}, {}, ValueError),
        "NaN in the walk": ([*data[:2], torch.full_like(data[2], float("nan"))], {}, {}, Exception),
    }[case]


@pytest.mark.parametrize("case", ["loader raises", "Ctrl-C", "batch does not fit", "stat_mask_fn fails",
                                  "bad blocks", "NaN in the walk"])
def test_failures_leave_no_spilled_files(case: str, tmp_path) -> None:
    """spill_dir kept fxdeco-boundaries-* directories (with batch*.pt files) when caching failed."""
    model, data = _model(), _data(width=32)
    batches, options, call, error = _failing(case, data)
    created = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(**kwargs: Any) -> str:
        created.append(real_mkdtemp(**kwargs))
        return created[-1]

    with mock.patch("tempfile.mkdtemp", mkdtemp), pytest.raises(error):
        fxdeco.transform(model, batches, fxdeco.Falor(sequential=True, spill_dir=str(tmp_path), **options),
                         show_progress=False, **call)
    assert list(tmp_path.iterdir()) == []
    assert len(created) == (0 if case == "bad blocks" else 2)  # the failure came after the directories were made


def test_an_unreachable_macs_budget_is_refused_before_the_walk_as_one_shot(monkeypatch) -> None:
    """The sequential refusal gave the knapsack's raw numbers, and only after a whole first walk."""
    model, data = _model(), _data(width=32)
    with pytest.raises(BudgetError) as one_shot:
        fxdeco.transform(model, data, fxdeco.Falor(keep_macs=0.01, budget_criterion="nsr"), show_progress=False)
    assert "keep_macs >= 0." in str(one_shot.value)

    def no_walk(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a block ran before the budget was checked")

    with monkeypatch.context() as patch:
        patch.setattr(BlockCalibration, "statistics", no_walk)
        with pytest.raises(BudgetError) as sequential:
            fxdeco.transform(model, data, fxdeco.Falor(keep_macs=0.01, sequential=True), show_progress=False)
    assert str(sequential.value) == str(one_shot.value)
    # where the first batch's rows are not known, the walk refuses it, in the same words
    monkeypatch.setattr(falor_sequential_module, "_first_batch_rows", lambda calibration: None)
    with pytest.raises(BudgetError) as walked:
        fxdeco.transform(model, data, fxdeco.Falor(keep_macs=0.01, sequential=True), show_progress=False)
    assert str(walked.value) == str(one_shot.value)


def test_first_batch_rows_are_what_the_statistics_count() -> None:
    """The budget check before the walk reads rows per sample off the cost pass's shapes: a convolution's pixels,
    a Linear's tokens, a layer called twice."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=2)
            self.proj = nn.Linear(8, 16)
            self.twice = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.proj(self.conv(x).flatten(2).transpose(1, 2))
            return self.twice(torch.relu(self.twice(tokens)))

    torch.manual_seed(0)
    prepared = fxdeco.prepare(Mixed().eval(), torch.randn(2, 3, 9, 9), keep_batches=0)
    calibration = BlockCalibration(prepared, [torch.randn(2, 3, 9, 9), torch.randn(2, 3, 9, 9)])
    rows = falor_sequential_module._first_batch_rows(calibration)
    counted = {}
    for index in range(len(calibration.blocks)):
        counted.update({t: s.rows_per_sample for t, s in calibration.statistics(index, advance=True).items()})
    assert counted == {t: r.rows_per_sample for t, r in rows.items()} == {"conv": 16, "proj": 16, "twice": 32}
