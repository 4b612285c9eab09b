"""What every method config offers: its name, what calibration it needs, its options as plain data."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

# ptdeco's guard in the NSR's denominator, mean_c E[(y' - y)_c²] / (Var[y_c] + NSR_EPSILON): keeps the ratio
# finite for constant channels. falor's closed-form NSR and lockd's branch losses both use it.
NSR_EPSILON = 1e-3


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of method configs (frozen dataclasses validated in ``__post_init__``)."""

    name: ClassVar[str] = ""  # the method's name, as ``transform(method=...)`` takes it

    @property
    def needs_sensitivity(self) -> bool:
        """Whether calibration must also collect output-gradient moments (one backward pass per batch)."""
        return False

    @property
    def kept_batches(self) -> int:
        """How many calibration batches the method measures on afterwards (kept by ``prepare``)."""
        return 0

    def options(self) -> dict[str, Any]:
        """The options set to something else than their default, as ``transform(..., **options)`` takes them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}


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
