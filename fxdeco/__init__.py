"""fxdeco: low-rank decomposition of PyTorch models as a torch.fx compiler pass.

    >>> import torch, fxdeco
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> calib = [torch.randn(32, 8) @ torch.randn(8, 64) for _ in range(4)]
    >>> small = fxdeco.transform(model, calib, nsr_threshold=0.01)
    >>> table = str(fxdeco.report(small))

The pipeline: :func:`trace` captures the model, :func:`prepare` returns a model
that collects activation statistics while it runs, :func:`convert` turns them
into ranks and factors and rewrites the graph; :func:`transform` does all three.
"""

from fxdeco.api import calibrate, convert, prepare, transform
from fxdeco.backend import backend
from fxdeco.capture import trace
from fxdeco.dump import dump
from fxdeco import lockd
from fxdeco.finetune import finetune
from fxdeco.errors import CalibrationError, CaptureError, NonFiniteActivationError, NoSitesError
from fxdeco.prepared import PreparedModel
from fxdeco.report import Report, report
from fxdeco.serialize import PlanError, PlanFormatError, PlanMismatchError, PlanNotFoundError, load, save

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "CaptureError",
    "NoSitesError",
    "NonFiniteActivationError",
    "PlanError",
    "PlanFormatError",
    "PlanMismatchError",
    "PlanNotFoundError",
    "PreparedModel",
    "Report",
    "backend",
    "calibrate",
    "convert",
    "dump",
    "finetune",
    "load",
    "lockd",
    "prepare",
    "report",
    "save",
    "trace",
    "transform",
]
