"""CUDA: every method runs on a model that lives on the GPU, and what it returns stays there.

Skipped without a CUDA device (CI has none); run on a GPU machine with
``python -m pytest -q tests/test_cuda.py``. The CPU run of the same model is the
reference: the GPU statistics must choose the same ranks (within one, for
float rounding at a threshold's edge) and the decomposed models must agree.
"""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from torch import nn

import fxdeco
from fxdeco import lockd
from fxdeco.train.finetune import finetune, kd_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


class Net(nn.Module):
    """kxk and 1x1 convs, BatchNorm, a token-mixing Linear block and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1, stride=2)
        self.c3 = nn.Conv2d(64, 64, 1)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.c3(torch.relu(self.c2(x))))
        tokens = x.flatten(2).transpose(1, 2)  # (batch, tokens, channels)
        tokens = tokens + self.fc2(torch.nn.functional.gelu(self.fc1(tokens)))
        return self.head(tokens.mean(1))


def net() -> Net:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():  # low-rank-ish weights, so thresholds give ranks well below full
        for m in (model.c3, model.fc1, model.fc2):
            w = m.weight.reshape(m.weight.shape[0], -1)
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            w.copy_(u @ torch.diag(s * torch.logspace(0, -3, len(s))) @ vh)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def batches(n: int = 4, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 16, 16, generator=g).to(device) for _ in range(n)]


def ranks(gm: torch.fx.GraphModule) -> dict[str, int | None]:
    return {r["name"]: r["rank"] for r in fxdeco.report(gm).rows}


def assert_on_cuda(gm: nn.Module) -> None:
    devices = {p.device.type for p in gm.parameters()} | {b.device.type for b in gm.buffers()}
    assert devices == {"cuda"}, devices


def close_ranks(gpu: dict, cpu: dict) -> None:
    assert gpu.keys() == cpu.keys()
    for name in gpu:
        if gpu[name] is None or cpu[name] is None:
            assert gpu[name] == cpu[name], (name, gpu[name], cpu[name])
        else:
            assert abs(gpu[name] - cpu[name]) <= 1, (name, gpu[name], cpu[name])


@pytest.mark.parametrize("options", [{"nsr_threshold": 0.01}, {"keep_params": 0.5},
                                     {"nsr_final_threshold": 0.005, "num_metric_batches": 2}],
                         ids=["local", "budget", "final-output"])
def test_falor_on_cuda_matches_cpu(options: dict) -> None:
    model = net()
    cpu = fxdeco.transform(model, batches(), show_progress=False, **options)
    gpu = fxdeco.transform(copy.deepcopy(model).to(CUDA), batches(device=CUDA), show_progress=False, **options)
    assert_on_cuda(gpu)
    close_ranks(ranks(gpu), ranks(cpu))
    assert any(r is not None for r in ranks(gpu).values())
    x = batches(1)[0]
    with torch.no_grad():
        out_gpu, out_cpu, ref = gpu(x.to(CUDA)).cpu(), cpu(x), model(x)
    assert out_gpu.device.type == "cpu"
    err_gpu = float((out_gpu - ref).square().mean() / ref.var())
    err_cpu = float((out_cpu - ref).square().mean() / ref.var())
    assert err_gpu < 0.1 and abs(err_gpu - err_cpu) < 0.02 + 0.5 * err_cpu, (err_gpu, err_cpu)
    if "nsr_final_threshold" in options:
        measured = [d.nsr_final for d in gpu.meta["fxdeco"].decisions if d.decomposed]
        assert measured and max(measured) <= options["nsr_final_threshold"]


def test_dwain_on_cuda_matches_cpu() -> None:
    """dwain's replays, loss-gradient screen and factored replacements on CUDA: same ranks as on the CPU."""
    model = net()

    def run(device: torch.device | str) -> torch.fx.GraphModule:
        reference = copy.deepcopy(model).to(device)

        def distill(output: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:  # the original's labels
            with torch.no_grad():
                labels = reference(batch).argmax(-1)
            return nn.functional.cross_entropy(output, labels)

        config = fxdeco.Dwain(distill, trade_off_factor=0.05, min_rank=4, show_progress=False)
        return fxdeco.transform(copy.deepcopy(model).to(device), batches(device=device), config,
                                show_progress=False)

    cpu, gpu = run("cpu"), run(CUDA)
    assert_on_cuda(gpu)
    close_ranks(ranks(gpu), ranks(cpu))
    assert any(r is not None for r in ranks(gpu).values())
    decided = [d for d in gpu.meta["fxdeco"].decisions if d.decomposed]
    assert all(d.ppl_diff is not None and d.probes >= 1 for d in decided)


def test_stat_mask_on_cuda() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).to(CUDA).eval()
    data = [torch.randn(4, 12, 32, device=CUDA) for _ in range(3)]
    mask = lambda batch: torch.ones(batch.shape[:2], device=batch.device).tril()  # noqa: E731 (varying lengths)
    gm = fxdeco.transform(model, data, nsr_threshold=0.05, stat_mask_fn=mask, show_progress=False)
    assert_on_cuda(gm)
    assert gm(data[0]).device.type == "cuda"


def test_lockd_amp_train_finalize_finetune_on_cuda() -> None:
    model = net().to(CUDA)
    data = batches(8, CUDA)
    gm = lockd.prepare(model, nsr_threshold=0.05)
    assert_on_cuda(gm)
    with torch.no_grad():
        assert torch.equal(gm(data[0]), model(data[0]))
    history = lockd.train(gm, data, steps=150, lmbda=1.0, amp=True, eval_batches=0, show_progress=False)
    assert all(torch.isfinite(torch.tensor(history.loss)))
    assert history.proportion_loss[-1] < history.proportion_loss[0] and history.kept[-1] <= history.kept[0]
    small = lockd.finalize(gm, proportion_threshold=0.9)
    assert_on_cuda(small)
    student, teacher = small, model
    before = float(kd_loss(student(data[0]), teacher(data[0])).detach())
    tuned = finetune(student, teacher, data, steps=30, lr=1e-3, amp=True, show_progress=False)
    after = float(kd_loss(student(data[0]), teacher(data[0])).detach())
    assert len(tuned.loss) == 30 and after <= before + 1e-6, (before, after)


def test_save_load_on_cuda() -> None:
    model = net().to(CUDA)
    gm = fxdeco.transform(model, batches(device=CUDA), nsr_threshold=0.02, show_progress=False)
    with tempfile.TemporaryDirectory() as d:
        fxdeco.save(gm, d)
        loaded = fxdeco.load(d, net().to(CUDA))
    x = batches(1, CUDA)[0]
    assert torch.equal(loaded(x), gm(x))


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_backend_on_cuda(inner: str) -> None:
    torch._dynamo.reset()
    model = net().to(CUDA)
    data = batches(6, CUDA)
    compiled = torch.compile(model, backend=fxdeco.backend(inner=inner, calib_steps=4, nsr_threshold=0.02))
    for x in data:
        out = compiled(x)
    ref = model(data[-1])
    assert out.device.type == "cuda"
    err = float((out - ref).square().mean() / ref.var())
    assert 0 < err < 0.1, err
    torch._dynamo.reset()
