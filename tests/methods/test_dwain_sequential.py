"""dwain one block at a time (``Dwain(sequential=True)``): ptdeco's rule per layer, blocks first to last."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import fxdeco
from fxdeco.methods.dwain.search import Thresholds, removed_params
from fxdeco.metadata import model_record
from tests.models import trained_state

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, WIDTH, TOKENS = 24, 48, 10


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.relu(self.up(h)))


class BlockLM(nn.Module):
    """Embedding, two residual MLP blocks (``blocks.0``, ``blocks.1``: the walk's blocks), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _batches(n: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, targets): each target a fixed function of its token, 10% of them random."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (16, TOKENS), generator=g)
        targets = (ids * 5 + 3) % VOCAB
        noise = torch.rand(ids.shape, generator=g) < 0.1
        targets[noise] = torch.randint(0, VOCAB, (int(noise.sum()),), generator=g)
        out.append((ids, targets))
    return out


def loss_fn(output: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(output.reshape(-1, VOCAB), batch[1].reshape(-1))


@functools.cache
def _trained_state() -> dict[str, torch.Tensor]:
    return trained_state(BlockLM, _batches(120, seed=2), loss_fn)


def _model() -> BlockLM:
    model = BlockLM()
    model.load_state_dict(_trained_state())
    return model.eval()


def _config(**options) -> fxdeco.Dwain:
    return fxdeco.Dwain(loss_fn, min_rank=4, show_progress=False, skip=["head"], **options)


def _ranks(small: nn.Module) -> dict[str, int | None]:
    return {d.target: d.rank for d in model_record(small).decisions}


def _ids(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return batch[0]


def test_one_block_holding_every_layer_is_one_shot_dwain() -> None:
    """With every decomposable layer in one block, the walk has nothing upstream to compensate and takes the layers
    last first, as one-shot dwain does: with every rank measured (predict=False) the decisions are the same."""
    data = _batches()
    options = dict(trade_off_factor=0.3, predict=False)  # ranks 12, 6, 4, 4: the rule and the order decide
    one_shot = fxdeco.transform(_model(), data, _config(**options), input_fn=_ids, show_progress=False)
    walked = fxdeco.transform(_model(), data, _config(**options, sequential=True, blocks=["blocks"]),
                              input_fn=_ids, show_progress=False)
    assert _ranks(walked) == _ranks(one_shot)
    assert len({r for r in _ranks(walked).values() if r is not None}) > 1  # not every layer at one rank
    x = torch.randint(0, VOCAB, (4, TOKENS))
    torch.testing.assert_close(walked(x), one_shot(x), rtol=1e-4, atol=1e-5)
    summary = model_record(walked).summary
    assert summary["sequential"]["blocks"] >= 1 and summary["probes"] >= 1


@pytest.mark.parametrize("predict", [False, True])
def test_every_decomposed_layer_passed_the_rule(predict: bool) -> None:
    """Two blocks walked first to last: every decomposed layer's recorded ppl_diff is under its threshold
    (ptdeco's rule), at a candidate rank, and the result computes what its factors say."""
    data = _batches()
    config = _config(trade_off_factor=0.1, predict=predict, sequential=True)
    model = _model()
    small = fxdeco.transform(model, data, config, input_fn=_ids, show_progress=False)
    record = model_record(small)
    total = sum(p.numel() for p in model.parameters())
    limits = Thresholds(config.trade_off_factor, config.max_accepted_ppl_diff, config.nsr_final_threshold, total)
    sites = {s.target: s for s in fxdeco.prepare(_model(), data[0][0]).sites}
    decomposed = [d for d in record.decisions if d.decomposed]
    assert decomposed and record.summary["sequential"]["blocks"] == 3  # blocks.0, blocks.1, head
    for d in decomposed:
        site = sites[d.target]
        assert d.rank in config.candidate_ranks(site)
        assert d.ppl_diff < limits.ppl_limit(removed_params(site, d.rank)), d.target
        assert d.probes >= 1 and d.nsr_final is not None
    assert _ranks(small)["head"] is None  # skipped
    # the factored model is a model: its loss on the metric batches is finite and close to the original's
    with torch.no_grad():
        before = sum(float(loss_fn(model(b[0]), b)) for b in data[:2])
        after = sum(float(loss_fn(small(b[0]), b)) for b in data[:2])
    assert after < before * 1.5


def test_decompose_in_place_equals_transform() -> None:
    data = _batches()
    config = _config(trade_off_factor=2.0, sequential=True)
    small = fxdeco.transform(_model(), data, config, input_fn=_ids, show_progress=False)
    model = _model()
    same = fxdeco.decompose_(model, data, config, input_fn=_ids, show_progress=False)
    assert same is model and _ranks(model) == _ranks(small)
    x = torch.randint(0, VOCAB, (4, TOKENS))
    with torch.no_grad():
        torch.testing.assert_close(model(x), small(x), rtol=1e-4, atol=1e-5)


def test_metric_batches_are_the_loader_batches_before_input_fn() -> None:
    """loss_fn receives the loader's batch (the targets are there), not the model's input."""
    seen = []

    def recording(output: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        seen.append(batch)
        return loss_fn(output, batch)

    data = _batches()
    config = fxdeco.Dwain(recording, min_rank=4, show_progress=False, skip=["head"], sequential=True,
                          num_metric_batches=2)
    fxdeco.transform(_model(), (b for b in data), config, input_fn=_ids, show_progress=False)
    assert seen and all(isinstance(b, tuple) and len(b) == 2 for b in seen)
    assert all(any(torch.equal(b[1], d[1]) for d in data[:2]) for b in seen)


def test_options_of_the_walk_are_checked() -> None:
    with pytest.raises(ValueError, match="finetune_fn trains the whole graph"):
        fxdeco.Dwain(loss_fn, sequential=True, finetune_fn=lambda graph, names: None)
    with pytest.raises(ValueError, match="blocks is an option of sequential mode"):
        fxdeco.Dwain(loss_fn, blocks=["blocks.0"])
    with pytest.raises(TypeError, match="sequential"):
        fxdeco.Dwain(loss_fn, sequential="yes")
    data = _batches()
    prepared = fxdeco.calibrate(fxdeco.prepare(_model(), data[0][0], keep_batches=2), data, input_fn=_ids)
    with pytest.raises(ValueError, match=r"fxdeco.Dwain\(..., sequential=True\)"):
        fxdeco.convert(prepared, _config(sequential=True))
    with pytest.raises(ValueError, match="num_metric_batches=5 but the calibration loader"):
        fxdeco.transform(_model(), (b for b in data), _config(sequential=True, num_metric_batches=5),
                         input_fn=_ids, show_progress=False)


def test_an_output_final_nsr_cannot_compare_fails_before_any_block_statistics(monkeypatch) -> None:
    """A tuple output without output_fn (nsr_final_threshold set) fails on the first block's probe inputs, before
    the statistics pass over every calibration batch (one-shot dwain fails on the first batch)."""
    from fxdeco.sequential import BlockCalibration

    class TwoOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            for block in self.blocks:
                x = x + block(x).relu()
            return x, x.mean(-1)

    passes: list[int] = []
    original = BlockCalibration.statistics
    monkeypatch.setattr(BlockCalibration, "statistics",
                        lambda self, index, *a, **k: passes.append(index) or original(self, index, *a, **k))
    config = fxdeco.Dwain(lambda out, batch: out[0].square().mean(), min_rank=2, nsr_final_threshold=0.1,
                          sequential=True, show_progress=False)
    with pytest.raises(TypeError, match="output_fn"):
        fxdeco.transform(TwoOutputs().eval(), [torch.randn(8, 16) for _ in range(3)], config, show_progress=False)
    assert passes == []
