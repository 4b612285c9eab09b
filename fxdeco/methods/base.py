"""What every method config offers: its name, what calibration it needs, its options as plain data."""

from __future__ import annotations

import dataclasses
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

    def recorded_options(self) -> dict[str, Any]:
        """:meth:`options` as plain data: what a decomposed model and its plan.json record. A function (a loss)
        is recorded by its name; other objects (tensors) are left out, and so is ``show_progress`` (how the run
        looked, not what it made)."""
        recorded = {}
        for k, v in self.options().items():
            if k == "show_progress":
                continue
            if isinstance(v, (int, float, str, bool, tuple, list)):
                recorded[k] = v
            elif callable(v):
                recorded[k] = getattr(v, "__qualname__", type(v).__name__)
        return recorded
