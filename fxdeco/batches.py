"""Turn whatever a calibration loader yields into a model call ``(args, kwargs)``."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from fxdeco.errors import CalibrationError


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


def no_batches(loader: Any, what: str = "calibration loader") -> CalibrationError:
    """The error for a loader that yielded nothing, with the likely cause when it is a spent iterator.

    Example:
        >>> gen = iter([])
        >>> str(no_batches(gen))  # doctest: +ELLIPSIS
        'the calibration loader yielded no batches (it is an iterator, which can be read only once, ...)'
    """
    hint = ""
    try:
        if iter(loader) is loader:
            hint = (" (it is an iterator, which can be read only once, e.g. a generator: was it read before? Pass a "
                    "list or a DataLoader to read the data again)")
    except TypeError:
        pass
    return CalibrationError(f"the {what} yielded no batches{hint}")


def check_input_fn(input_fn: Any) -> None:
    """Refuse an ``input_fn`` that is not a function, before any batch is read.

    Example:
        >>> check_input_fn(lambda b: b[0])
        >>> check_input_fn(0)
        Traceback (most recent call last):
        ...
        TypeError: input_fn must be a function of a batch (e.g. input_fn=lambda b: b[0]), got int
    """
    if input_fn is not None and not callable(input_fn):
        raise TypeError(f"input_fn must be a function of a batch (e.g. input_fn=lambda b: b[0]), got "
                        f"{type(input_fn).__name__}")


def adapt_batch(batch: Any, input_fn: Callable[[Any], Any] | None, index: int, what: str = "calibration batch") -> Any:
    """``input_fn(batch)``, or ``batch`` without one; a failure names the batch.

    Example:
        >>> adapt_batch((1, 2), lambda b: b[0], 0)
        1
        >>> adapt_batch({"x": 1}, lambda b: b["image"], 7)
        Traceback (most recent call last):
        ...
        fxdeco.errors.CalibrationError: input_fn failed on calibration batch 7 (a dict with keys ['x']): \
KeyError: 'image'
    """
    if input_fn is None:
        return batch
    try:
        return input_fn(batch)
    except Exception as exc:
        raise CalibrationError(f"input_fn failed on {what} {index} ({_describe(batch)}): "
                               f"{type(exc).__name__}: {exc}") from exc


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a dict with keys {sorted(map(str, batch))[:8]}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)}"
    return f"a {type(batch).__name__}"


def model_inputs(batch: Any, input_fn: Callable[[Any], Any] | None, index: int | None = None,
                 what: str = "training batch") -> tuple[tuple, dict[str, Any]]:
    """Apply ``input_fn`` (e.g. ``lambda b: b[0]`` for ``(x, y)`` loaders), then :func:`as_call`.

    ``index`` names the batch when ``input_fn`` fails.
    """
    return as_call(adapt_batch(batch, input_fn, index if index is not None else 0, what))


def leading_dim(args: tuple, kwargs: dict[str, Any]) -> int:
    """Batch size of a call: the first dimension of its first tensor input (1 if none)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return 1


def call_on_batch(model: Any, args: tuple, kwargs: dict[str, Any], index: int, what: str = "training batch") -> Any:
    """``model(*args, **kwargs)``; a batch that does not fit the model's signature is named, with the usual remedy.

    Example:
        >>> call_on_batch(torch.nn.Linear(2, 2), (torch.ones(1, 2), torch.ones(1)), {}, 0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fxdeco.errors.CalibrationError: training batch 0 does not fit the model's inputs (2 positional, keywords []): ... for (inputs, labels) batches pass input_fn=lambda b: b[0]
    """
    try:
        return model(*args, **kwargs)
    except TypeError as exc:
        if "argument" not in str(exc):  # a TypeError from inside the model, not from the call itself
            raise
        raise CalibrationError(f"{what} {index} does not fit the model's inputs ({len(args)} positional, keywords "
                               f"{sorted(kwargs)}): {exc}; for (inputs, labels) batches pass "
                               "input_fn=lambda b: b[0]") from exc
