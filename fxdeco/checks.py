"""Checks of option values, shared by the method configs (``fxdeco.Falor``, ``fxdeco.Lockd``) and the training
loops: each raises a ValueError that names the option, the allowed range and the value given."""

from __future__ import annotations

import math
import os
from typing import Any


def check_number(name: str, value: Any, *, low: float = 0.0, high: float = 1.0, low_open: bool = True) -> float:
    """``low < value <= high`` (``low <= value`` with ``low_open=False``) and not NaN, else a ValueError naming it.

    Example:
        >>> check_number("keep_params", 0.5)
        0.5
        >>> check_number("keep_params", 1.5)
        Traceback (most recent call last):
        ...
        ValueError: keep_params must be a number in (0.0, 1.0], got 1.5
    """
    # bool is an int subclass: ``nsr_threshold=True`` is a mistake, not 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not ((low < value if low_open else low <= value) and value <= high):
        raise ValueError(f"{name} must be a number in {'(' if low_open else '['}{low}, {high}], got {value!r}")
    return float(value)


def check_damping(value: Any) -> float:
    """Eigenvalue damping, a fraction of the mean eigenvalue in ``[0, 1]``, else a ValueError.

    The shift is added before the eigen-solve and subtracted from the eigenvalues after it, so it only steadies the
    solver: above the mean eigenvalue it steadies nothing more, and a large one erases the spectrum in float64
    (damping=1e16 left every eigenvalue 0, so every layer went to its smallest rank with a reported NSR of 0 while
    its measured NSR was 0.27, over nsr_threshold=0.05).

    Example:
        >>> check_damping(0.01)
        0.01
        >>> check_damping(1e16)
        Traceback (most recent call last):
        ...
        ValueError: damping must be a number in [0.0, 1.0] (a fraction of the mean eigenvalue; it only steadies the \
eigen-solver, and large values erase the spectrum in float64), got 1e+16
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= 1:
        raise ValueError("damping must be a number in [0.0, 1.0] (a fraction of the mean eigenvalue; it only steadies "
                         f"the eigen-solver, and large values erase the spectrum in float64), got {value!r}")
    return float(value)


def check_count(name: str, value: Any, *, minimum: int = 1) -> int:
    """An integer (a float with an integer value is accepted) of at least ``minimum``, else a ValueError.

    Example:
        >>> check_count("min_rank", 0)
        Traceback (most recent call last):
        ...
        ValueError: min_rank must be a positive integer, got 0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return int(value)


def check_positive(name: str, value: Any) -> float:
    """A positive finite number, or a ValueError naming the option.

    Example:
        >>> check_positive("lr", 0)
        Traceback (most recent call last):
        ...
        ValueError: lr must be a positive number, got 0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_steps(steps: Any) -> int:
    """A positive ``int`` count of training steps (a float is refused), or a ValueError."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return steps


def check_flag(name: str, value: Any, *, optional: bool = False) -> bool | None:
    """``True`` or ``False`` (or None with ``optional``), else a TypeError naming the option: a string such as
    ``"no"`` is truthy, and would switch the option on.

    Example:
        >>> check_flag("center", "no")
        Traceback (most recent call last):
        ...
        TypeError: center must be True or False, got 'no'
    """
    if not (isinstance(value, bool) or (optional and value is None)):
        raise TypeError(f"{name} must be True or False{' (or None)' if optional else ''}, got {value!r}")
    return value


def check_patterns(name: str, value: Any) -> tuple[str, ...]:
    """A list of glob patterns (strings) as a tuple, else a TypeError naming the option.

    Example:
        >>> check_patterns("skip", ["head", "blocks.*.fc"])
        ('head', 'blocks.*.fc')
        >>> check_patterns("skip", "head")
        Traceback (most recent call last):
        ...
        TypeError: skip must be a list of glob patterns, got the string 'head'; write skip=['head']
    """
    if isinstance(value, str):  # a bare string would be read as one pattern per character
        raise TypeError(f"{name} must be a list of glob patterns, got the string {value!r}; write {name}=[{value!r}]")
    try:
        patterns = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a list of glob patterns, got {value!r}") from None
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{name} must hold glob patterns (strings) of layer names, got {bad[0]!r}")
    return patterns


def check_spill_dir(path: Any) -> str:
    """``spill_dir`` as a string, refused now if it is no writable directory (else the walk would fail after
    capture, naming a generated subdirectory).

    Example:
        >>> check_spill_dir("/no/such/dir")
        Traceback (most recent call last):
        ...
        ValueError: spill_dir='/no/such/dir' does not exist: give a writable directory for the cached block inputs
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"spill_dir must be a directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        problem = "does not exist"
    elif not os.path.isdir(path):
        problem = "is not a directory"
    elif not os.access(path, os.W_OK | os.X_OK):  # mkdtemp needs to create an entry there
        problem = "is not writable"
    else:
        return path
    raise ValueError(f"spill_dir={path!r} {problem}: give a writable directory for the cached block inputs")


def check_walk_options(sequential: bool, blocks: Any, spill_dir: Any) -> tuple[tuple[str, ...] | None, str | None]:
    """The block walk's options (``sequential=True``): ``blocks`` as a tuple of module names, ``spill_dir`` checked
    (:func:`check_spill_dir`); either of them without ``sequential=True`` is refused (it would be ignored).

    Example:
        >>> check_walk_options(True, ["model.layers.0"], None)
        (('model.layers.0',), None)
        >>> check_walk_options(False, None, "/tmp")
        Traceback (most recent call last):
        ...
        ValueError: spill_dir is an option of sequential mode: add sequential=True or drop it
    """
    if isinstance(blocks, str):
        raise TypeError(f"blocks must be a list of module names, got the string {blocks!r}; write blocks=[{blocks!r}]")
    if blocks is not None:
        blocks = tuple(blocks)
        if not blocks or not all(isinstance(b, str) and b for b in blocks):
            raise ValueError(f"blocks must be a non-empty list of qualified module names ('model.layers.0'), "
                             f"got {list(blocks)!r}; None: automatic blocks")
    if not sequential:
        given = [n for n, v in (("blocks", blocks), ("spill_dir", spill_dir)) if v is not None]
        if given:
            raise ValueError(f"{given[0]} is an option of sequential mode: add sequential=True or drop it")
        return blocks, None
    return blocks, None if spill_dir is None else check_spill_dir(spill_dir)
