"""Turn whatever a calibration loader yields into a model call ``(args, kwargs)``."""

from __future__ import annotations

import itertools
import operator
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
    # a DataLoader with drop_last=True over fewer samples than one batch drops its only batch
    dataset, batch_size = getattr(loader, "dataset", None), getattr(loader, "batch_size", None)
    if getattr(loader, "drop_last", False) and isinstance(batch_size, int) and not hint:
        try:
            samples = len(dataset)
        except TypeError:
            samples = None
        if samples is not None and 0 < samples < batch_size:
            hint = (f" (a DataLoader with drop_last=True drops its only, incomplete batch: the dataset holds "
                    f"{samples} samples for batch_size={batch_size}; pass drop_last=False or a smaller batch_size)")
    return CalibrationError(f"the {what} yielded no batches{hint}")


def check_finite(loader: Any, what: str = "calibration loader") -> None:
    """Refuse a loader that never ends, before any batch is read.

    Calibration reads every batch a loader yields: an ``itertools.cycle`` over a
    DataLoader (the usual way to feed a training loop of fixed steps) kept
    ``fxdeco.transform`` calibrating forever, holding more and more batches in
    sequential mode. Only the itertools objects known to be endless are recognised.

    Example:
        >>> check_finite(itertools.repeat(0, 3))
        >>> check_finite(itertools.cycle([1, 2]))
        Traceback (most recent call last):
        ...
        ValueError: the calibration loader is an endless itertools.cycle: calibration reads every batch it yields, \
so it would never end; pass a finite one, e.g. itertools.islice(loader, 32) for 32 batches
    """
    endless = isinstance(loader, (itertools.cycle, itertools.count)) or (
        isinstance(loader, itertools.repeat) and operator.length_hint(loader, -1) < 0)
    if endless:
        raise ValueError(f"the {what} is an endless itertools.{type(loader).__name__}: calibration reads every batch "
                         "it yields, so it would never end; pass a finite one, e.g. itertools.islice(loader, 32) for "
                         "32 batches")


def check_loader(loader: Any, what: str = "calibration loader") -> None:
    """Refuse, before any batch is read, a loader that never ends (:func:`check_finite`) or that is one tensor.

    Iterating a tensor yields its rows: ``transform(model, x)`` with ``x`` of shape ``(64, 8)`` ran 64 batches of
    shape ``(8,)``, each read as 8 samples (the leading dimension), so the report's MACs per sample were 8x too small
    and the budget was allocated on them, silently; an image tensor ``(N, C, H, W)`` gives batches of ``C`` samples.

    Example:
        >>> check_loader([torch.zeros(4, 8)])
        >>> check_loader(torch.zeros(4, 8))
        Traceback (most recent call last):
        ...
        TypeError: the calibration loader is a tensor of shape (4, 8): iterating it gives its rows, each read as a batch; pass [x] for one batch, or list(x) if its first dimension numbers batches
    """
    if isinstance(loader, torch.Tensor):
        raise TypeError(f"the {what} is a tensor of shape {tuple(loader.shape)}: iterating it gives its rows, each "
                        "read as a batch; pass [x] for one batch, or list(x) if its first dimension numbers batches")
    check_finite(loader, what)


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
    """``input_fn(batch)``, or ``batch`` without one; a failure, or what is not a model call (see :func:`as_call`),
    names the batch.

    Example:
        >>> adapt_batch(("x", "y"), lambda b: [b[0]], 0)
        ['x']
        >>> adapt_batch({"x": 1}, lambda b: b["image"], 7)
        Traceback (most recent call last):
        ...
        fxdeco.errors.CalibrationError: input_fn failed on calibration batch 7 (a dict with keys ['x']): \
KeyError: 'image'
        >>> adapt_batch({"x": 1}, lambda b: None, 3)
        Traceback (most recent call last):
        ...
        fxdeco.errors.CalibrationError: input_fn returned a NoneType for calibration batch 3 (a dict with keys \
['x']): it must return a tensor (the positional input), a tuple/list (the positional inputs) or a dict (the keyword \
inputs)
    """
    if input_fn is None:
        adapted = batch
    else:
        try:
            adapted = input_fn(batch)
        except Exception as exc:
            raise CalibrationError(f"input_fn failed on {what} {index} ({_describe(batch)}): "
                                   f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(adapted, (torch.Tensor, Mapping, tuple, list)):  # as_call would refuse it without the index
        forms = "a tensor (the positional input), a tuple/list (the positional inputs) or a dict (the keyword inputs)"
        numpy = " (a NumPy array: input_fn=torch.as_tensor)" if type(adapted).__module__ == "numpy" else ""
        if input_fn is not None:
            raise CalibrationError(f"input_fn returned {_describe(adapted)} for {what} {index} ({_describe(batch)}): "
                                   f"it must return {forms}{numpy}")
        raise CalibrationError(f"{what} {index} is {_describe(batch)}, not a model call: a batch must be {forms}; "
                               f"pass input_fn=... to turn your loader's batches into model inputs{numpy}")
    return adapted


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


def misfit_hint(input_names: list[str], args: tuple, kwargs: dict[str, Any]) -> str:
    """The usual remedy for a batch that does not fit the graph's inputs ``input_names``: labels beside the inputs
    (an ``(x, y)`` tuple, a dict with a ``labels`` key the model does not take), or ``""``.

    Example:
        >>> misfit_hint(["x"], (1, 2), {})
        '; for (inputs, labels) batches pass input_fn=lambda b: b[0]'
        >>> print(misfit_hint(["x", "mask"], (), {"x": 1, "y": 2}))
        ; the batch has keys the model does not take (['y']): keep its inputs with input_fn=lambda b: {k: b[k] for k in ['x']}
    """
    if any(name.startswith("*") for name in input_names):
        return ""  # *args / **kwargs take anything: the misfit is elsewhere
    names = list(input_names)
    extra = [k for k in kwargs if k not in names]
    if extra:
        keep = [k for k in kwargs if k in names]
        return (f"; the batch has keys the model does not take ({extra}): keep its inputs with "
                f"input_fn=lambda b: {{k: b[k] for k in {keep!r}}}")
    if len(args) >= 2 and len(args) > len(names) - len(kwargs):
        return "; for (inputs, labels) batches pass input_fn=lambda b: b[0]"
    return ""


def leading_dim(args: tuple, kwargs: dict[str, Any]) -> int:
    """Batch size of a call: the first dimension of its first tensor input (1 if none)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return 1


def check_not_empty(args: tuple, kwargs: dict[str, Any], index: int, what: str = "calibration batch") -> None:
    """Refuse a batch of no samples (its first tensor input's leading dimension is 0), naming it.

    Such a batch adds nothing to the statistics, but a first batch divided the model's MACs by its 0 samples and
    an empty metric batch (final-output mode, dwain) failed after the whole calibration with an IndexError. It
    usually comes from slicing a tensor past its end (``x[i * bs:(i + 1) * bs]``).

    Example:
        >>> check_not_empty((torch.ones(2, 3),), {}, 0)
        >>> check_not_empty((), {"x": torch.ones(0, 3)}, 4)
        Traceback (most recent call last):
        ...
        fxdeco.errors.CalibrationError: calibration batch 4 holds no samples (its input 'x' has shape (0, 3)); \
drop empty batches from the loader (slicing a tensor past its end gives them)
    """
    named = [*((f"{i}", v) for i, v in enumerate(args)), *kwargs.items()]
    for name, value in named:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape[0] == 0:
                label = f"input {name!r}" if name in kwargs else f"positional input {name}"
                raise CalibrationError(f"{what} {index} holds no samples (its {label} has shape "
                                       f"{tuple(value.shape)}); drop empty batches from the loader (slicing a tensor "
                                       "past its end gives them)")
            return  # the first tensor input is the one leading_dim counts samples on


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
