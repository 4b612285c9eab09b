"""The modules of a lockd branch: two factor layers, a gate between them, and an NSR tap.

For a site ``y = W x + b`` the prepared graph computes, beside the original node::

    h  = first(x)          # in -> r      (Linear, or a 1x1 / kxk Conv2d)
    g  = gate(h)           # one gate per intermediate channel
    yb = second(g)         # r -> out     (carries the bias)
    y  = tap(y0, yb)       # records NSR(yb vs y0), returns y0 unchanged

so the model keeps computing exactly what it computed before, while every
branch learns to imitate its layer with as few open gates as possible.
"""

from __future__ import annotations

import torch
from torch import nn

from fxdeco.methods.base import NSR_EPSILON


def channel_nsr(branch: torch.Tensor, original: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Mean over channels of ``E[(branch - original)²] / (Var[original] + 1e-3)``.

    Example:
        >>> y = torch.randn(64, 8)
        >>> float(channel_nsr(y, y, -1))
        0.0
        >>> round(float(channel_nsr(torch.zeros(64, 8), y, -1)), 1)  # E[y²]/Var[y] ~ 1
        1.0
    """
    original = original.detach().float()
    dims = [d for d in range(original.dim()) if d != channel_dim % original.dim()]
    error = (branch.float() - original).square().mean(dims)
    variance = original.var(dims, correction=0)
    return (error / (variance + NSR_EPSILON)).mean()


class GumbelGate(nn.Module):
    """Multiply each intermediate channel by a gate driven by a trainable logit.

    Training mode: a Gumbel-sigmoid (binary concrete) sample
    ``sigmoid((logit + log u - log(1-u)) / temperature)``, forced to 0 where
    the logit is negative, so a closed channel gets no gradient from the data
    and stays closed. Eval mode: the hard decision ``logit > 0``, which is what
    ``finalize`` keeps.

    Example:
        >>> gate = GumbelGate(3, channel_dim=-1, init_logit=1.0)
        >>> with torch.no_grad():
        ...     gate.logits[1] = -1.0
        >>> gate.eval()(torch.ones(2, 3))
        tensor([[1., 0., 1.],
                [1., 0., 1.]])
    """

    def __init__(self, channels: int, channel_dim: int, init_logit: float, temperature: float = 0.5) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.full((channels,), float(init_logit)))
        self.channel_dim = channel_dim
        self.temperature = temperature
        self.positions = 0.0  # spatial positions (or tokens) per sample of the last call, for MACs

    def mask(self) -> torch.Tensor:
        if not self.training:
            return (self.logits > 0).to(self.logits.dtype)
        u = torch.rand_like(self.logits).clamp(1e-6, 1 - 1e-6)
        sample = torch.sigmoid((self.logits + torch.log(u) - torch.log1p(-u)) / self.temperature)
        return torch.where(self.logits < 0, torch.zeros_like(sample), sample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = [1] * h.dim()
        shape[self.channel_dim] = -1
        self.positions = h.numel() / max(1, h.shape[0]) / h.shape[self.channel_dim]
        return h * self.mask().to(h.dtype).view(shape)

    def extra_repr(self) -> str:
        return f"channels={self.logits.numel()}, temperature={self.temperature}"


class NsrTap(nn.Module):
    """Return the original output unchanged; record the branch's NSR against it.

    ``nsr`` is the last value (with gradient, for the losses); ``nsr_eval_mean``
    averages the values seen in eval mode (hard gates), which ``finalize`` reports.
    """

    def __init__(self, target: str, channel_dim: int) -> None:
        super().__init__()
        self.target = target
        self.channel_dim = channel_dim
        self.nsr: torch.Tensor | None = None
        self.eval_sum = 0.0
        self.eval_count = 0
        self.positions = 0.0

    def forward(self, original: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        self.nsr = channel_nsr(branch, original, self.channel_dim)
        self.positions = original.numel() / max(1, original.shape[0]) / original.shape[self.channel_dim]
        if not self.training:
            self.eval_sum += float(self.nsr.detach())
            self.eval_count += 1
        return original

    @property
    def nsr_eval_mean(self) -> float | None:
        return self.eval_sum / self.eval_count if self.eval_count else None

    def __deepcopy__(self, memo: dict) -> "NsrTap":
        # A live NSR tensor carries autograd history, which deepcopy refuses; copies start clean.
        new = NsrTap(self.target, self.channel_dim)
        new.training = self.training
        new.eval_sum, new.eval_count, new.positions = self.eval_sum, self.eval_count, self.positions
        return new


class LockdBranch(nn.Module):
    """``first -> gate -> second`` for one layer, plus one NSR tap per call of the layer.

    ``taps`` has several entries when the layer is called several times (a
    shared block): each call is compared with its own original output.
    """

    def __init__(self, target: str, kind: str, conv_order: str, first: nn.Module, second: nn.Module,
                 gate: GumbelGate, calls: int) -> None:
        super().__init__()
        self.target, self.kind, self.conv_order = target, kind, conv_order
        self.first, self.gate, self.second = first, gate, second
        channel_dim = -1 if kind == "linear" else -3  # (N, C, H, W) or unbatched (C, H, W)
        self.taps = nn.ModuleList(NsrTap(target, channel_dim) for _ in range(calls))

    @property
    def rank(self) -> int:
        return self.gate.logits.numel()

    def kept_channels(self) -> torch.Tensor:
        """Indices of channels whose logit is positive; the strongest one if none is."""
        logits = self.gate.logits.detach()
        kept = torch.nonzero(logits > 0).flatten()
        return kept if kept.numel() else logits.argmax().reshape(1)

    def factored_params(self, channels: int) -> int:
        """Parameters of the pruned branch with ``channels`` kept (bias included)."""
        # one output row of the first factor and one input column of the second per channel
        per_channel = self.first.weight[0].numel() + self.second.weight[:, 0].numel()
        bias = self.second.bias.numel() if self.second.bias is not None else 0
        return channels * per_channel + bias


def svd_factors(weight: torch.Tensor, kind: str, conv_order: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors ``(first, second)`` of ``weight`` at full rank, singular values split evenly.

    Channels come out by decreasing singular value. For a conv, ``"kxk-first"``
    factors ``W`` as ``out x (in*kh*kw)``; ``"1x1-first"`` as ``(out*kh*kw) x in``
    so that a 1x1 conv to ``r`` channels followed by a kxk conv reproduces it.

    Example:
        >>> w = torch.randn(6, 4, 3, 3)
        >>> a, b = svd_factors(w, "conv2d", "1x1-first")
        >>> a.shape, b.shape
        (torch.Size([4, 4, 1, 1]), torch.Size([6, 4, 3, 3]))
        >>> x = torch.randn(1, 4, 5, 5)
        >>> y = torch.conv2d(torch.conv2d(x, a), b)
        >>> torch.allclose(y, torch.conv2d(x, w), atol=1e-5)
        True
    """
    w = weight.detach().double()
    if kind == "linear":
        matrix = w
    elif conv_order == "kxk-first":
        matrix = w.reshape(w.shape[0], -1)
    else:
        matrix = w.permute(0, 2, 3, 1).reshape(-1, w.shape[1])  # rows (out, kh, kw), columns in
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s.sqrt()
    first = root[:, None] * vh  # (r, columns)
    second = u * root  # (rows, r)
    r = s.numel()
    if kind == "linear":
        return first.to(weight.dtype), second.to(weight.dtype)
    out, cin, kh, kw = w.shape
    if conv_order == "kxk-first":
        return first.reshape(r, cin, kh, kw).to(weight.dtype), second.reshape(out, r, 1, 1).to(weight.dtype)
    second = second.reshape(out, kh, kw, r).permute(0, 3, 1, 2)
    return first.reshape(r, cin, 1, 1).to(weight.dtype), second.contiguous().to(weight.dtype)


def full_rank(weight_shape: tuple[int, ...], kind: str, conv_order: str) -> int:
    """Rank of the branch at which ``init="svd"`` is exact.

    Example:
        >>> full_rank((256, 128, 3, 3), "conv2d", "1x1-first"), full_rank((256, 128, 3, 3), "conv2d", "kxk-first")
        (128, 256)
    """
    out = weight_shape[0]
    if kind == "linear":
        return min(out, weight_shape[1])
    cin, kh, kw = weight_shape[1:]
    return min(cin, out * kh * kw) if conv_order == "1x1-first" else min(out, cin * kh * kw)

