"""Small models several test files share (one definition each)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


class SmallNet(nn.Module):
    """kxk and 1x1 convs (strided, padded, dilated), BatchNorm, and a Linear head (lockd, finetune)."""

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


class Residual(nn.Module):
    """A residual MLP whose middle layer is called twice (shared weights), and a conv branch (final-output
    mode, replays)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(24, 48)
        self.mid = nn.Linear(48, 48)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Linear(48 + 8, 10)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = h + torch.tanh(self.mid(h))
        h = h + torch.tanh(self.mid(h))
        pooled = self.conv(image).mean((2, 3))
        return self.out(torch.cat([h, pooled], dim=1))


def residual_batches(n: int = 4, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(6, 24, generator=g)
    return [(torch.randn(size, 6, generator=g) @ basis, torch.randn(size, 3, 6, 6, generator=g)) for _ in range(n)]


class Block(nn.Module):
    """A residual block with a full conv (decomposable) and a depthwise conv (skipped: grouped)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.dw(self.conv(x)))


class Net(nn.Module):
    """A stem, two :class:`Block` s and an MLP head (dumps, graph views)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.blocks = nn.Sequential(Block(32), Block(32))
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x)).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


class SmallCNN(nn.Module):
    """Convs, BatchNorm and Linears (the compile backend, Dynamo's lifted parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)  # its buffers stay graph inputs, its parameters are lifted
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.bn(self.conv1(x)))))
        return self.head(F.relu(self.fc(x.mean((2, 3)))))


def trained_state(make: Callable[[], nn.Module], batches: Iterable[Any],
                  loss: Callable[[torch.Tensor, Any], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of ``make()`` (built after ``torch.manual_seed(0)``) trained with Adam (lr 1e-2), one step per
    ``(input, target)`` batch, on ``loss(output, batch)``: a small model whose loss rises when a layer loses rank."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch in batches:
        value = loss(model(batch[0]), batch)
        opt.zero_grad()
        value.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
