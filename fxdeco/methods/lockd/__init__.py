"""lockd (LOCal Knowledge Distillation): gated factored branches trained beside every layer.

The rhythm is prepare -> train -> finalize -> fine-tune:

    >>> import torch, fxdeco
    >>> from fxdeco import lockd
    >>> from fxdeco.train.finetune import finetune
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    >>> with torch.no_grad():  # a first layer of rank 4, so most of its branch channels are useless
    ...     _ = model[0].weight.copy_(torch.randn(64, 4) @ torch.randn(4, 16) / 4)
    >>> data = [torch.randn(64, 16) for _ in range(4)]
    >>> gm = lockd.prepare(model, nsr_threshold=0.05)        # branches start as exact SVD factorizations
    >>> history = lockd.train(gm, data, steps=150, lmbda=1.0)
    >>> small = lockd.finalize(gm, proportion_threshold=0.5)
    >>> fxdeco.report(small).totals["params_after"] < fxdeco.report(small).totals["params_before"]
    True
    >>> _ = finetune(small, model, data, steps=20)

:func:`prepare` adds, beside each Linear/Conv2d node, ``first -> gate -> second``
and a tap that returns the original output while recording the branch's NSR;
:func:`train` minimises ``nsr_loss + lmbda * proportion_loss``; :func:`finalize`
replaces layers by their pruned branches where that pays.
"""

from fxdeco.methods.lockd.branch import GumbelGate, LockdBranch, NsrTap, channel_nsr
from fxdeco.methods.lockd.finalize import finalize
from fxdeco.methods.lockd.losses import (NonFiniteLossError, check_finite, entropy_loss, kept_proportion, nsr_loss,
                                 nsr_values, proportion_loss)
from fxdeco.methods.lockd.prepare import LockdState, branches, prepare, train_mode
from fxdeco.methods.lockd.train import TrainHistory, measure_nsr, record_macs, train

__all__ = [
    "GumbelGate",
    "LockdBranch",
    "LockdState",
    "NonFiniteLossError",
    "NsrTap",
    "TrainHistory",
    "branches",
    "channel_nsr",
    "check_finite",
    "entropy_loss",
    "finalize",
    "kept_proportion",
    "measure_nsr",
    "nsr_loss",
    "nsr_values",
    "prepare",
    "proportion_loss",
    "record_macs",
    "train",
    "train_mode",
]
