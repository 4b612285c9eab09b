"""Exceptions raised by fxdeco, importable in one place, and how its warnings point at the caller."""

import os
import sys
import warnings

import torch.utils._contextlib

from passes.capture import CaptureError
from passes.stats import NonFiniteActivationError


class CalibrationError(ValueError):
    """Calibration data could not be run through the model."""


class NoSitesError(ValueError):
    """The model has no Linear/Conv2d layer fxdeco can decompose."""


# warnings are reported at the first frame outside these folders: the user's line, not fxdeco's
_FXDECO_DIR = os.path.dirname(os.path.abspath(__file__))
_LIBRARY_DIRS = (_FXDECO_DIR + os.sep, os.path.join(os.path.dirname(_FXDECO_DIR), "passes") + os.sep,
                 # the wrapper of decorators such as torch.inference_mode(False) on fxdeco's functions
                 torch.utils._contextlib.__file__)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the user's code that called into fxdeco (however deep the call came from).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_user("look out")
        >>> str(caught[0].message), caught[0].filename.startswith("<doctest")   # this line, not errors.py
        ('look out', True)
    """
    frame, level = sys._getframe(1), 2  # stacklevel 1 is this function, 2 its caller
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


__all__ = ["CalibrationError", "CaptureError", "NoSitesError", "NonFiniteActivationError"]
