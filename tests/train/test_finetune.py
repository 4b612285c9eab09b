"""fxdeco.train.finetune: knowledge distillation of a student from its teacher, with an optional task loss and
another distillation loss for embeddings (moved from test_lockd.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fxdeco.train.finetune import finetune, kd_loss
from tests.models import images, small_net

pytestmark = pytest.mark.usefixtures("one_thread")


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
