"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` and small models trained on it.

``apt-get install -y dataset-fashion-mnist`` puts the IDX files under
``/usr/share/datasets/fashion-mnist``; nothing is downloaded. Trained weights
are cached under ``benchmarks/cache/`` (outside git), keyed by model name and
training settings, so later runs reuse them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE = Path(__file__).resolve().parent / "cache"
MEAN, STD = 0.2860, 0.3530
log = logging.getLogger(__name__)


def _read_idx(path: Path) -> torch.Tensor:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).reshape(dims)


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``: images normalised float32 ``(N, 1, 28, 28)``, labels int64."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = DATA_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise FileNotFoundError(f"{images_path} not found: apt-get install -y dataset-fashion-mnist")
    images = _read_idx(images_path).float().div(255).sub(MEAN).div(STD).unsqueeze(1)
    labels = _read_idx(DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz").long()
    return images, labels


class SmallCNN(nn.Module):
    """3x3 and 1x1 convolutions with BatchNorm, and a Linear head (~0.3M params)."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(1, 32, 3), block(32, 64, 3, 2), block(64, 64, 1), block(64, 128, 3, 2), block(128, 128, 3),
            block(128, 128, 1), block(128, 256, 3, 2), block(256, 256, 1),
        )
        self.head = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class SmallViT(nn.Module):
    """A ViT built from nn.Linear: 4x4 patches, 4 blocks, width 128, MLP 256."""

    def __init__(self, dim: int = 128, depth: int = 4, heads: int = 4, mlp: int = 256, patch: int = 4) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.zeros(1, (28 // patch) ** 2, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        p = self.patch
        patches = x.unfold(2, p, p).unfold(3, p, p).reshape(b, -1, p * p)
        h = self.embed(patches) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


MODELS = {"cnn": SmallCNN, "vit": SmallViT}


def train(name: str, epochs: int = 3, batch_size: int = 128, lr: float = 2e-3, seed: int = 0) -> nn.Module:
    """Train (or load from the cache) model ``name`` on the Fashion-MNIST training set."""
    settings = {"name": name, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "v": 1}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = CACHE / f"{name}-{key}.pt"
    torch.manual_seed(seed)
    model = MODELS[name]()
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    images, labels = load("train")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for i in range(len(images) // batch_size):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log.info("%s epoch %d: loss %.3f (%.0fs)", name, epoch, loss.item(), time.perf_counter() - start)
    CACHE.mkdir(exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    correct = sum(int((model(images[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    return 100.0 * correct / len(images)
