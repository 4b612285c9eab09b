"""fxdeco.train.finetune: knowledge distillation of a student from its teacher, with an optional task loss and
another distillation loss for embeddings (moved from test_lockd.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fxdeco.train.finetune import finetune, kd_loss

pytestmark = pytest.mark.usefixtures("one_thread")


class SmallNet(nn.Module):
    """kxk and 1x1 convs (strided, padded, dilated), BatchNorm, and a Linear head.

    The model of tests/methods/lockd/test_lockd.py, where these tests were before.
    """

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, bias=False)
        self.c3 = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.c3(torch.relu(self.c2(x))))
        return self.fc(x.mean((2, 3)))


def small_net() -> SmallNet:
    torch.manual_seed(0)
    model = SmallNet()
    with torch.no_grad():  # non-trivial running statistics, so eval mode matters
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def images(n: int = 4, batch: int = 8) -> list[torch.Tensor]:
    return [torch.randn(batch, 3, 10, 10) for _ in range(n)]


def test_finetune_distils_the_teacher() -> None:
    teacher = small_net()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    data = images(4)
    before = float(kd_loss(student(data[0]), teacher(data[0])).detach())
    labels = lambda logits, batch: nn.functional.cross_entropy(logits, teacher(batch).argmax(-1))  # noqa: E731
    history = finetune(student, teacher, data, steps=40, lr=3e-3, task_loss=labels, task_weight=0.1,
                       train_mode=False)
    after = float(kd_loss(student(data[0]), teacher(data[0])).detach())
    assert after < 0.5 * before and len(history.loss) == 40 and history.task[0] > 0
    assert not student.training


class _Embedder(nn.Module):
    """Unit-length embeddings, like a sentence encoder: a softmax over them means nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.body(x), dim=-1)


def test_finetune_distils_embeddings_with_another_loss() -> None:
    from fxdeco.train.finetune import cosine_distance, mse_distance

    teacher = _Embedder().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    data = [torch.randn(16, 12) for _ in range(4)]
    # the first step's distillation term is the named loss of the untouched student: KL by default
    for name, fn in (("kl", kd_loss), ("mse", mse_distance), ("cosine", cosine_distance)):
        probe = copy.deepcopy(student)
        expected = fn(probe(data[0]), teacher(data[0])).item()
        options = {} if name == "kl" else {"distill_loss": name}
        assert finetune(probe, teacher, data, steps=1, **options).kd[0] == pytest.approx(expected, rel=1e-6)
    before = cosine_distance(student(data[0]), teacher(data[0])).item()
    calls = []

    def custom(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(s.shape)
        return cosine_distance(s, t)

    finetune(student, teacher, data, steps=40, lr=3e-3, distill_loss=custom)
    assert len(calls) == 40 and calls[0] == (16, 16)
    assert cosine_distance(student(data[0]), teacher(data[0])).item() < 0.5 * before
    with pytest.raises(ValueError, match="distill_loss must be one of"):
        finetune(student, teacher, data, steps=1, distill_loss="cos")
