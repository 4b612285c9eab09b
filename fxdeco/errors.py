"""Exceptions raised by fxdeco, importable in one place."""

from passes.capture import CaptureError
from passes.stats import NonFiniteActivationError


class CalibrationError(ValueError):
    """Calibration data could not be run through the model."""


class NoSitesError(ValueError):
    """The model has no Linear/Conv2d layer fxdeco can decompose."""


__all__ = ["CalibrationError", "CaptureError", "NoSitesError", "NonFiniteActivationError"]
