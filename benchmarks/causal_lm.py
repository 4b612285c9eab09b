"""A small byte-level GPT trained here on real English: the Python standard library's docstrings.

The text is read from the standard library's own source files with ``ast``
(nothing is imported or downloaded): every module, class and function
docstring, in sorted file order. Files are split by a hash of their path into
training (95%) and held-out evaluation text, so no docstring is in both. The
model (4 blocks, width 256, 4 heads, context 128, bytes as tokens, about 3.2M
parameters) is trained once and cached under ``benchmarks/cache/``, keyed by
its settings. ``python -m benchmarks.causal_lm`` trains it (if not cached) and
prints its held-out perplexity.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import math
import sysconfig
import time
import zlib
from pathlib import Path

import torch
from torch import nn

CACHE = Path(__file__).resolve().parent / "cache"
CONTEXT = 128
log = logging.getLogger(__name__)


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:
                out.append(doc)
    return out


def corpus() -> tuple[bytes, bytes]:
    """(training text, evaluation text) as ASCII bytes (other characters dropped), from the stdlib's docstrings."""
    path = CACHE / "stdlib-docstrings.json"
    if path.exists():
        data = json.loads(path.read_text())
        return data["train"].encode("ascii"), data["eval"].encode("ascii")
    root = Path(sysconfig.get_paths()["stdlib"])
    train, evaluation = [], []
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "test/", "idlelib/idle_test/")) or "/tests/" in rel:
            continue
        text = "\n\n".join(_docstrings(file)).encode("ascii", "ignore").decode("ascii")
        if not text:
            continue
        (evaluation if zlib.crc32(rel.encode()) % 20 == 0 else train).append(text)
    data = {"train": "\n\n".join(train), "eval": "\n\n".join(evaluation)}
    CACHE.mkdir(exist_ok=True)
    path.write_text(json.dumps(data))
    return data["train"].encode("ascii"), data["eval"].encode("ascii")


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)

        a = nn.functional.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)),
                                                       is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """A GPT over bytes: ``forward(ids) -> logits`` of shape (batch, tokens, 256)."""

    def __init__(self, dim: int = 256, depth: int = 4, heads: int = 4, context: int = CONTEXT) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Parameter(torch.zeros(1, context, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, 256, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos[:, :ids.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.ln(h))


def windows(text: bytes, count: int, seed: int, length: int = CONTEXT + 1) -> torch.Tensor:
    """``count`` random windows of ``length`` bytes (a fixed ``seed``), as int64 (count, length)."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - length, (count,), generator=g)
    return torch.stack([data[s:s + length] for s in starts.tolist()]).long()


def batches(text: bytes, count: int, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches ``{"input_ids", "labels"}`` (labels: the next byte of each position)."""
    w = windows(text, count * batch_size, seed)
    return [{"input_ids": w[i:i + batch_size, :-1], "labels": w[i:i + batch_size, 1:]}
            for i in range(0, len(w), batch_size)]


def next_byte_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the next byte (nats): ``loss_fn(output, batch)`` for dwain."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))


def train(steps: int = 1500, batch_size: int = 16, lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """Train (or load from the cache) the TinyGPT on the training text."""
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "context": CONTEXT, "v": 1}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = CACHE / f"tinygpt-{key}.pt"
    torch.manual_seed(seed)
    model = TinyGPT()
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    text, _ = corpus()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    data = batches(text, steps, batch_size, seed=seed + 1)
    start = time.perf_counter()
    model.train()
    for step, batch in enumerate(data):
        loss = next_byte_loss(model(batch["input_ids"]), batch)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("tinygpt step %d/%d: loss %.3f (%.0fs)", step, steps, loss.item(), time.perf_counter() - start)
    CACHE.mkdir(exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


@torch.no_grad()
def perplexity(model: nn.Module, data: list[dict[str, torch.Tensor]]) -> float:
    """exp(mean next-byte cross-entropy) over ``data``."""
    losses = [float(next_byte_loss(model(b["input_ids"]), b)) for b in data]
    return math.exp(sum(losses) / len(losses))


def evaluation_batches(count: int = 16, batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """Held-out batches (files the model never trained on), fixed."""
    _, text = corpus()
    return batches(text, count, batch_size, seed=1234)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    text, held_out = corpus()
    print(f"corpus: {len(text) / 1e6:.2f} MB training, {len(held_out) / 1e6:.2f} MB held out")
    model = train()
    print(f"held-out perplexity: {perplexity(model, evaluation_batches()):.3f} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")


if __name__ == "__main__":
    main()
