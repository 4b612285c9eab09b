"""Turn whatever a calibration loader yields into a model call ``(args, kwargs)``."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch


def as_call(batch: Any) -> tuple[tuple, dict[str, Any]]:
    """Map a batch to ``(args, kwargs)``.

    A tensor is the single positional input, a tuple/list the positional inputs
    and a mapping the keyword inputs.

    Example:
        >>> as_call({"input_ids": 1})
        ((), {'input_ids': 1})
        >>> as_call((1, 2))
        ((1, 2), {})
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise TypeError(
        f"a calibration batch must be a tensor, a tuple/list or a dict, got {type(batch).__name__}; "
        "pass input_fn=... to turn your loader's batches into model inputs"
    )


def model_inputs(batch: Any, input_fn: Callable[[Any], Any] | None) -> tuple[tuple, dict[str, Any]]:
    """Apply ``input_fn`` (e.g. ``lambda b: b[0]`` for ``(x, y)`` loaders), then :func:`as_call`."""
    return as_call(input_fn(batch) if input_fn is not None else batch)


def leading_dim(args: tuple, kwargs: dict[str, Any]) -> int:
    """Batch size of a call: the first dimension of its first tensor input (1 if none)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return 1
