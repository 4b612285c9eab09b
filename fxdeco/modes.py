"""Temporarily switch a model to eval mode, restoring every module's own flag."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch  # noqa: F401  (the docstring example uses it)
from torch import nn


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
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training

