"""Temporarily switch a model to eval mode, restoring every module's own flag."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch  # noqa: F401  (the docstring example uses it)
from torch import nn


@contextlib.contextmanager
def modes_restored(*models: nn.Module) -> Iterator[None]:
    """Give every module of ``models`` back its own train/eval flag after the block, whatever the block set.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Dropout().eval())
        >>> with modes_restored(m):
        ...     _ = m.train()
        >>> [x.training for x in m]
        [True, False]
    """
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block; restore each module's mode after.

    Calibration must not update BatchNorm running statistics or sample
    dropout masks, whatever mode the caller left the model in.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Dropout()).train()
        >>> with eval_mode(m): m.training
        False
        >>> m.training
        True
    """
    with modes_restored(model):
        model.eval()
        yield model
