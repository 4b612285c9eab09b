"""``fxdeco.Lockd``: every option of lockd (branches, training, finalising), its default and its range."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from fxdeco.checks import check_count, check_flag, check_number, check_patterns, check_positive, check_steps
from fxdeco.methods.base import MethodConfig

CONV_ORDERS = ("1x1-first", "kxk-first")


@dataclasses.dataclass(frozen=True)
class Lockd(MethodConfig):
    """lockd (LOCal Knowledge Distillation): a gated factored branch beside every layer, trained to imitate it.

    ``fxdeco.transform(model, loader, fxdeco.Lockd(steps=1000))`` prepares the
    branches, trains them for ``steps`` batches of ``loader`` and keeps the
    pruned branches that pay (``fxdeco.lockd.prepare`` / ``train`` /
    ``finalize`` run the same steps one by one, with these options and
    defaults). Validated at construction.

    Example:
        >>> import torch, fxdeco
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> small = fxdeco.transform(model, [torch.randn(64, 16) for _ in range(4)], fxdeco.Lockd(steps=20))
        >>> fxdeco.report(small).totals["method"]
        'lockd'
        >>> fxdeco.Lockd(lmbda=0)
        Traceback (most recent call last):
        ...
        ValueError: lmbda must be a positive number, got 0
    """

    name: ClassVar[str] = "lockd"

    # branches: the NSR each branch aims for (tau), their start ("svd": an exact factorization of the layer;
    # "random": PyTorch's initialisation, as ptdeco), a conv's factor order, the gates' starting logit and
    # Gumbel temperature, and glob patterns of layers that get no branch
    nsr_threshold: float = 0.1
    init: str = "svd"
    conv_order: str = "1x1-first"
    init_logit: float = 3.0
    temperature: float = 0.5
    skip: tuple[str, ...] = ()
    # training: batches, Adam's learning rates for the branch weights and for the gate logits, the weight of
    # the proportion (gate-closing) term and of the optional entropy term, bfloat16 autocast on CUDA, and the
    # last training batches that measure each branch's NSR afterwards
    steps: int = 1000
    lr: float = 1e-3
    logit_lr: float = 2e-2
    lmbda: float = 1.0
    entropy_weight: float = 0.0
    amp: bool = False
    eval_batches: int = 4
    # finalising: a branch replaces its layer when it keeps fewer than this fraction of its channels
    # (and has fewer parameters)
    proportion_threshold: float = 1.0
    show_progress: bool | None = None

    def __post_init__(self) -> None:
        if self.init not in ("svd", "random"):
            raise ValueError(f"init must be 'svd' or 'random', got {self.init!r}")
        if self.conv_order not in CONV_ORDERS:
            raise ValueError(f"conv_order must be one of {CONV_ORDERS}, got {self.conv_order!r}")
        check_positive("nsr_threshold (tau)", self.nsr_threshold)
        check_positive("temperature", self.temperature)
        if isinstance(self.init_logit, bool) or not isinstance(self.init_logit, (int, float)) \
                or not math.isfinite(self.init_logit):
            raise ValueError(f"init_logit must be a finite number, got {self.init_logit!r}")
        object.__setattr__(self, "skip", check_patterns("skip", self.skip))
        check_flag("amp", self.amp)
        check_flag("show_progress", self.show_progress, optional=True)
        check_steps(self.steps)
        for name in ("lr", "logit_lr", "lmbda"):
            check_positive(name, getattr(self, name))
        if isinstance(self.entropy_weight, bool) or not isinstance(self.entropy_weight, (int, float)) \
                or not 0 <= self.entropy_weight < float("inf"):  # (NaN fails the comparison too)
            raise ValueError(f"entropy_weight must be a finite number >= 0, got {self.entropy_weight!r}")
        object.__setattr__(self, "eval_batches", check_count("eval_batches", self.eval_batches, minimum=0))
        check_number("proportion_threshold", self.proportion_threshold)
