"""fxdeco: low-rank decomposition of PyTorch models as a torch.fx compiler pass.

    >>> import torch, fxdeco
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> calib = [torch.randn(32, 8) @ torch.randn(8, 64) for _ in range(4)]
    >>> small = fxdeco.transform(model, calib, nsr_threshold=0.01)
    >>> table = str(fxdeco.report(small))

The pipeline: :func:`trace` captures the model, :func:`prepare` returns a model
that collects activation statistics while it runs, :func:`convert` turns them
into ranks and factors and rewrites the graph; :func:`transform` does all three.

The public names are imported on first use (PEP 562), so that ``import fxdeco``
does not import torch until something needs it: the ``fxdeco`` command
(:mod:`fxdeco.cli`) prints a saved report, its help and its usage errors
without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "calibrate": "api", "convert": "api", "prepare": "api", "transform": "api",
    "backend": "backend",
    "trace": "capture",
    "dump": "dump",
    "finetune": "finetune",
    "CalibrationError": "errors", "CaptureError": "errors", "NonFiniteActivationError": "errors",
    "NoSitesError": "errors",
    "PreparedModel": "prepared",
    "Falor": "methods", "MethodConfig": "methods",
    "Report": "report", "report": "report",
    "PlanError": "serialize", "PlanFormatError": "serialize", "PlanMismatchError": "serialize",
    "PlanNotFoundError": "serialize", "load": "serialize", "save": "serialize",
}
# Functions named like the submodule that defines them: ``fxdeco.report`` is the function, as it always was,
# even after ``import fxdeco.report`` (the import system sets the submodule on the package; see _Package).
_SHADOWED = {name for name, module in _EXPORTS.items() if name == module}

__all__ = sorted([*_EXPORTS, "lockd"], key=lambda name: (name[0].islower(), name))

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from fxdeco import lockd
    from fxdeco.api import calibrate, convert, prepare, transform
    from fxdeco.backend import backend
    from fxdeco.capture import trace
    from fxdeco.dump import dump
    from fxdeco.errors import CalibrationError, CaptureError, NonFiniteActivationError, NoSitesError
    from fxdeco.finetune import finetune
    from fxdeco.methods import Falor, MethodConfig
    from fxdeco.prepared import PreparedModel
    from fxdeco.report import Report, report
    from fxdeco.serialize import PlanError, PlanFormatError, PlanMismatchError, PlanNotFoundError, load, save


def __getattr__(name: str) -> Any:
    """Import a public name, or a submodule (``fxdeco.lockd``, ``fxdeco.api`` ...), when it is first used."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Keeps ``fxdeco.report``, ``fxdeco.dump``, ``fxdeco.backend`` and ``fxdeco.finetune`` the functions.

    Importing a submodule sets it as an attribute of its package; the eager
    ``from fxdeco.report import report`` used to rebind the name to the
    function right after, so this does the same whenever it happens.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType) and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
