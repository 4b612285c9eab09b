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
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it (relative to fxdeco)
_EXPORTS = {
    "calibrate": "api", "convert": "api", "decompose_": "api", "prepare": "api", "transform": "api",
    "trace": "capture",
    "CalibrationError": "errors", "CaptureError": "errors", "NonFiniteActivationError": "errors",
    "NoSitesError": "errors", "BudgetError": "methods.falor.budget", "DistributedError": "distributed",
    "PreparedModel": "prepared",
    "Dwain": "methods", "Falor": "methods", "Lockd": "methods", "MethodConfig": "methods",
    "backend": "compile.backend",
    "finetune": "train.finetune",
    "Report": "io.report", "report": "io.report", "dump": "io.dump",
    "PlanError": "io.serialize", "PlanFormatError": "io.serialize", "PlanMismatchError": "io.serialize",
    "PlanNotFoundError": "io.serialize", "load": "io.serialize", "save": "io.serialize",
    "ApplyError": "io.apply", "apply": "io.apply",
}
# public submodules by their short name: ``from fxdeco import lockd``
_SUBMODULES = {"lockd": "methods.lockd", "distributed": "distributed"}

__all__ = sorted([*_EXPORTS, *_SUBMODULES], key=lambda name: (name[0].islower(), name))

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from fxdeco.api import calibrate, convert, decompose_, prepare, transform
    from fxdeco.capture import trace
    from fxdeco.compile.backend import backend
    from fxdeco.errors import CalibrationError, CaptureError, NonFiniteActivationError, NoSitesError
    from fxdeco.io.apply import ApplyError, apply
    from fxdeco.io.dump import dump
    from fxdeco.io.report import Report, report
    from fxdeco.io.serialize import PlanError, PlanFormatError, PlanMismatchError, PlanNotFoundError, load, save
    from fxdeco.methods import Dwain, Falor, Lockd, MethodConfig
    from fxdeco.methods import lockd
    from fxdeco import distributed
    from fxdeco.distributed import DistributedError
    from fxdeco.methods.falor.budget import BudgetError
    from fxdeco.prepared import PreparedModel
    from fxdeco.train.finetune import finetune


def __getattr__(name: str) -> Any:
    """Import a public name, or a public submodule (``fxdeco.lockd``), when it is first used."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{_SUBMODULES[name]}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
