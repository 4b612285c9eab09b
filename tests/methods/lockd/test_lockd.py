"""lockd: prepared graphs keep the original outputs, training compresses, finalize decomposes, DDP stays in sync."""

from __future__ import annotations

import copy
import importlib
import os
import socket
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fxdeco
from fxdeco.metadata import factored_layers
from fxdeco import lockd
from fxdeco.errors import CalibrationError, NoSitesError
from fxdeco.train.finetune import finetune
from fxdeco.methods.lockd.finalize import _strip, pruned_chain
from passes.chains import replace_sites_with_chains
from tests.models import images, small_net

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("init", ["svd", "random"])
@pytest.mark.parametrize("conv_order", ["1x1-first", "kxk-first"])
def test_prepared_graph_returns_original_outputs_exactly(init: str, conv_order: str) -> None:
    model = small_net()
    gm = lockd.prepare(model, init=init, conv_order=conv_order)
    x = images(1)[0]
    expected = model(x)
    assert torch.equal(gm(x), expected)
    lockd.train_mode(gm)  # Gumbel gates sampling: still the original output is passed on
    assert torch.equal(gm(x), expected)
    assert set(lockd.branches(gm)) == {"c1", "c2", "c3", "fc"}
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable and all("_lockd." in n for n in trainable), "only branch weights and logits train"


def test_svd_branches_start_exact_and_random_ones_do_not() -> None:
    model = small_net()
    x = images(1)[0]
    for init, exact in (("svd", True), ("random", False)):
        gm = lockd.prepare(model, init=init)
        gm(x)  # eval mode: hard gates, all open at init
        nsr = lockd.nsr_values(gm)
        assert all((float(v.detach()) < 1e-8) == exact for v in nsr.values()), (init, nsr)


def test_input_model_state_dict_and_flags_unchanged() -> None:
    model = small_net().train()
    before = copy.deepcopy(model.state_dict())
    gm = lockd.prepare(model)
    lockd.train(gm, images(), steps=3, eval_batches=1)
    small = lockd.finalize(gm)
    finetune(small, model, images(), steps=2)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
    assert model.training
    assert not any("lockd" in n for n, _ in model.named_modules())


def test_a_few_steps_lower_the_combined_loss() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    data = [torch.randn(32, 16) for _ in range(4)]
    gm = lockd.prepare(model, init="random", nsr_threshold=0.05)
    history = lockd.train(gm, data, steps=30, lr=1e-2, lmbda=0.1, eval_batches=0)
    first, last = sum(history.loss[:5]) / 5, sum(history.loss[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    stopped = lockd.train(gm, data, steps=30, callback=lambda step, h: step == 4, eval_batches=0)
    assert len(stopped.loss) == 5 and gm.meta["lockd"].steps_trained == 35


def _linear_net_with_rank(rank: int, width: int = 16) -> nn.Sequential:
    """A first layer of rank ``rank``: its SVD branch needs only ``rank`` channels."""
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(width, rank) @ torch.randn(rank, width) / 4)
    return model.eval()


def test_training_closes_gates_the_layer_does_not_need() -> None:
    model = _linear_net_with_rank(4, width=24)
    data = [torch.randn(64, 24) for _ in range(4)]
    gm = lockd.prepare(model, nsr_threshold=0.05)
    history = lockd.train(gm, data, steps=150, lmbda=1.0)
    assert history.kept[-1] < history.kept[0]
    small = lockd.finalize(gm, proportion_threshold=0.9)
    rows = {r["name"]: r for r in fxdeco.report(small).rows}
    assert rows["0"]["rank"] is not None and rows["0"]["rank"] <= 12, rows["0"]
    x = data[0]
    err = (small(x) - model(x)).square().mean() / model(x).var()
    assert err < 0.1


def test_finalize_with_positive_logits_reproduces_the_original() -> None:
    model = _linear_net_with_rank(3)
    gm = lockd.prepare(model, init="svd")
    with torch.no_grad():  # keep the 3 channels with non-zero singular values, all with positive logits
        lockd.branches(gm)["0"].gate.logits[3:] = -1.0
    small = lockd.finalize(gm, proportion_threshold=1.0)
    x = torch.randn(10, 16)
    assert torch.allclose(small(x), model(x), atol=1e-5)
    rows = {r["name"]: r for r in fxdeco.report(small).rows}
    assert rows["0"]["rank"] == 3 and rows["2"]["rank"] is None
    assert sum(p.numel() for p in small.parameters()) == 3 * 32 + 16 + 16 * 4 + 4


@pytest.mark.parametrize("conv_order", ["1x1-first", "kxk-first"])
def test_full_rank_pruned_chains_reproduce_every_layer(conv_order: str) -> None:
    # At full rank a branch never has fewer params than its layer, so finalize keeps the layer;
    # the substitution it would make is checked directly here.
    model = small_net()
    gm = lockd.prepare(model, init="svd", conv_order=conv_order)
    state = gm.meta["lockd"]
    chains = {t: pruned_chain(b) for t, b in lockd.branches(gm).items()}
    work = copy.deepcopy(gm)
    _strip(work, state)
    full = replace_sites_with_chains(work, state.sites, chains)
    x = images(1)[0]
    assert torch.allclose(full(x), model(x), atol=1e-4)


def test_finalize_honours_the_proportion_threshold() -> None:
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    gm = lockd.prepare(model)
    with torch.no_grad():
        lockd.branches(gm)["0"].gate.logits[8:] = -1.0  # 25% kept
        lockd.branches(gm)["2"].gate.logits[12:] = -1.0  # 37.5% kept
    rows = lambda small: {r["name"]: r for r in fxdeco.report(small).rows}  # noqa: E731
    at_30 = rows(lockd.finalize(gm, proportion_threshold=0.3))
    assert at_30["0"]["rank"] == 8 and at_30["2"]["rank"] is None
    assert "kept proportion 0.375" in at_30["2"]["note"]
    at_40 = rows(lockd.finalize(gm, proportion_threshold=0.4))
    assert at_40["0"]["rank"] == 8 and at_40["2"]["rank"] == 12
    small = lockd.finalize(gm, proportion_threshold=0.3)
    meta = [n.meta["factored"] for n in small.graph.nodes if "factored" in n.meta]
    assert {m.target: m.method_meta["kept_proportion"] for m in meta} == {"0": 0.25, "2": 0.375}
    assert all(p.requires_grad for p in small.parameters())


def test_finalize_keeps_the_strongest_channel_when_all_close() -> None:
    model = nn.Sequential(nn.Linear(32, 32))
    gm = lockd.prepare(model)
    with torch.no_grad():
        lockd.branches(gm)["0"].gate.logits[:] = -1.0
        lockd.branches(gm)["0"].gate.logits[5] = -0.5
    small = lockd.finalize(gm, proportion_threshold=0.5)
    assert fxdeco.report(small).rows[0]["rank"] == 1


def test_train_then_finalize_reports_macs_nsr_and_params() -> None:
    model = small_net()
    gm = lockd.prepare(model, nsr_threshold=0.2, init_logit=1.0)
    lockd.train(gm, images(), steps=6, logit_lr=0.5, lmbda=5.0)
    small = lockd.finalize(gm)
    rep = fxdeco.report(small)
    t = rep.totals
    assert t["method"] == "lockd" and t["params_before"] == sum(p.numel() for p in model.parameters())
    assert t["params_after"] == sum(p.numel() for p in small.parameters()) < t["params_before"]
    assert t["macs_before"] > t["macs_after"] > 0
    decomposed = [r for r in rep.rows if r["rank"] is not None]
    assert decomposed and all(r["nsr"] is not None and r["nsr"] >= 0 for r in decomposed)
    x = images(1)[0]
    assert small(x).shape == model(x).shape


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mix(torch.relu(self.mix(x))))


def test_a_layer_called_twice_has_one_branch_and_a_tap_per_call() -> None:
    model = _Shared().eval()
    gm = lockd.prepare(model)
    assert len(lockd.branches(gm)["mix"].taps) == 2
    with torch.no_grad():
        lockd.branches(gm)["mix"].gate.logits[4:] = -1.0
    small = lockd.finalize(gm, proportion_threshold=0.5)
    calls = [n.target for n in small.graph.nodes if n.op == "call_module"]
    assert calls == ["mix.0", "mix.1", "mix.0", "mix.1", "out"]


def test_export_captured_graph() -> None:
    model = small_net()
    x = images(1)[0]
    gm = lockd.prepare(model, x, capture="export")
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    with torch.no_grad():
        lockd.branches(gm)["c2"].gate.logits[2:] = -1.0  # 2 of 8 channels
    small = lockd.finalize(gm, proportion_threshold=0.5)
    assert fxdeco.report(small).totals["decomposed"] == 1
    assert small(x).shape == (8, 5)


class _Strided(nn.Module):
    """A padded kxk conv, a strided dilated kxk conv, a strided padded 1x1 conv and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2, padding=2, dilation=2, bias=False)
        self.c3 = nn.Conv2d(16, 24, 1, stride=2, padding=1)
        self.fc = nn.Linear(24, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


def _close_most_gates(gm: torch.fx.GraphModule) -> None:
    """As if training had kept a quarter of every branch's channels."""
    with torch.no_grad():
        for branch in lockd.branches(gm).values():
            branch.gate.logits[max(1, branch.rank // 4):] = -1.0


def _round_trip(small: torch.fx.GraphModule, fresh: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    from fxdeco.io.serialize import load, save

    with tempfile.TemporaryDirectory() as folder:
        save(small, folder)
        plan = (Path(folder) / "plan.json").read_text()
        again = load(folder, fresh)
        with tempfile.TemporaryDirectory() as other:  # a loaded model saves to the same plan
            assert (save(again, other) / "plan.json").read_text() == plan
    assert torch.equal(again(x), small(x))
    assert again.state_dict().keys() == small.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in small.state_dict().items())
    assert str(fxdeco.report(again)) == str(fxdeco.report(small))
    factored = lambda gm: [info for _, info in factored_layers(gm)]  # noqa: E731
    assert factored(again) == factored(small)
    return again


@pytest.mark.parametrize("conv_order", ["1x1-first", "kxk-first"])
def test_finalized_convs_save_and_load_bit_exactly(conv_order: str) -> None:
    torch.manual_seed(0)
    gm = lockd.prepare(_Strided().eval(), conv_order=conv_order)
    _close_most_gates(gm)
    small = lockd.finalize(gm)
    assert fxdeco.report(small).totals["decomposed"] == 4
    kernels = [tuple(small.get_submodule(f"{t}.{i}").kernel_size) for t in ("c1", "c2") for i in (0, 1)]
    assert kernels == ([(1, 1), (3, 3)] * 2 if conv_order == "1x1-first" else [(3, 3), (1, 1)] * 2)
    assert small.get_submodule("c3.1" if conv_order == "1x1-first" else "c3.0").stride == (2, 2)
    torch.manual_seed(1)  # other initial weights: everything must come from the weights file
    again = _round_trip(small, _Strided().eval(), torch.randn(3, 3, 12, 12))
    assert [type(m).__name__ for m in again.get_submodule("c2")] == ["Conv2d", "Conv2d"]


def test_finalized_linear_model_saves_and_loads_bit_exactly() -> None:
    model = _linear_net_with_rank(4, width=24)
    gm = lockd.prepare(model, nsr_threshold=0.05)
    with torch.no_grad():
        lockd.branches(gm)["0"].gate.logits[6:] = -1.0  # the head keeps all its gates: it stays dense
    small = lockd.finalize(gm)
    assert [r["rank"] for r in fxdeco.report(small).rows] == [6, None]
    _round_trip(small, _linear_net_with_rank(2, width=24), torch.randn(7, 24))


def test_losses_values() -> None:
    gm = lockd.prepare(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), init_logit=0.0)
    assert float(lockd.proportion_loss(gm).detach()) == pytest.approx(0.5)
    with torch.no_grad():
        for b in lockd.branches(gm).values():
            b.gate.logits.fill_(20.0)
    assert float(lockd.entropy_loss(gm).detach()) < 1e-6
    with pytest.raises(RuntimeError, match="run a forward pass"):
        lockd.nsr_loss(gm)
    gm(torch.randn(4, 8))
    assert float(lockd.nsr_loss(gm, nsr_threshold=0.01).detach()) == 0.0


# ---- bad input -------------------------------------------------------------------------------------------


def test_all_sites_skipped() -> None:
    with pytest.raises(NoSitesError, match="skipped by pattern"):
        lockd.prepare(small_net(), skip=["*"])
    with pytest.raises(TypeError, match="write skip="):
        lockd.prepare(small_net(), skip="fc")


@pytest.mark.parametrize("value", [0.0, -0.1, float("nan")])
def test_non_positive_tau_and_lambda(value: float) -> None:
    with pytest.raises(ValueError, match="nsr_threshold"):
        lockd.prepare(small_net(), nsr_threshold=value)
    gm = lockd.prepare(small_net())
    with pytest.raises(ValueError, match="lmbda"):
        lockd.train(gm, images(), steps=1, lmbda=value)
    with pytest.raises(ValueError, match="nsr_threshold"):
        lockd.nsr_loss(gm, nsr_threshold=value)


def test_finalize_or_train_on_a_graph_that_was_not_prepared() -> None:
    gm = torch.fx.symbolic_trace(small_net())
    with pytest.raises(ValueError, match="not prepared for lockd"):
        lockd.finalize(gm)
    with pytest.raises(ValueError, match="not prepared for lockd"):
        lockd.train(small_net(), images(), steps=1)
    prepared = lockd.prepare(small_net())
    with pytest.raises(ValueError, match="already prepared"):
        lockd.prepare(prepared)


def test_training_on_an_empty_loader() -> None:
    gm = lockd.prepare(small_net())
    with pytest.raises(CalibrationError, match="no batches"):
        lockd.train(gm, [], steps=3)


def test_nan_stops_training_and_names_the_layer() -> None:
    gm = lockd.prepare(small_net())
    with torch.no_grad():
        lockd.branches(gm)["c3"].second.weight[0, 0] = float("nan")
    with pytest.raises(lockd.NonFiniteLossError, match="layer 'c3'.*step 0"):
        lockd.train(gm, images(), steps=3)


def test_failing_prepare_leaves_nothing_half_prepared(monkeypatch: pytest.MonkeyPatch) -> None:
    prep = importlib.import_module("fxdeco.methods.lockd.prepare")  # the package's ``prepare`` is the function
    model = small_net()
    before = copy.deepcopy(model.state_dict())
    real, calls = prep.build_branch, []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(prep, "build_branch", fail_on_third)
    with pytest.raises(RuntimeError, match="boom"):
        lockd.prepare(model)
    assert not any("lockd" in n for n, _ in model.named_modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


# ---- DistributedDataParallel -----------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same model and branches everywhere
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.LazyLinear(4))
        model(torch.randn(1, 3, 6, 6))
        gm = lockd.prepare(model.eval())
        ddp = nn.parallel.DistributedDataParallel(gm)
        torch.manual_seed(100 + rank)  # different data and Gumbel noise on each rank
        data = [torch.randn(8, 3, 6, 6) for _ in range(3)]
        lockd.train(ddp, data, steps=6, lr=1e-2, logit_lr=0.2, lmbda=2.0, eval_batches=1)
        logits = torch.cat([b.gate.logits.detach() for b in lockd.branches(ddp).values()])
        torch.save(logits, os.path.join(out_dir, f"logits{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_keeps_gate_logits_identical_across_ranks() -> None:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_ddp_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
        logits = [torch.load(os.path.join(out_dir, f"logits{r}.pt")) for r in range(2)]
    assert torch.equal(logits[0], logits[1])
    assert not torch.equal(logits[0], torch.full_like(logits[0], logits[0][0].item())), "logits must have moved"


class _OptionalMask(nn.Module):
    """``forward(x, mask=None)``, calibrated without a mask: traced as ``mask=None`` (timm's ViT has such inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.b(torch.relu(self.a(x)))
        return h if mask is None else h * mask


def test_a_lockd_plan_records_the_inputs_traced_as_their_default(tmp_path: Path) -> None:
    """load() must trace the same case as the saved graph: without the record it traced ``mask`` as an input, warned
    that the model's code differs, and the loaded graph refused calls without a mask."""
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(64, 4, generator=g) @ torch.randn(4, 32, generator=g) for _ in range(2)]
    torch.manual_seed(0)
    small = fxdeco.transform(_OptionalMask().eval(), calib, fxdeco.Lockd(steps=5), show_progress=False)
    folder = fxdeco.save(small, tmp_path)
    x = torch.randn(5, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "the model's code differs" warning
        loaded = fxdeco.load(folder, _OptionalMask())
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
