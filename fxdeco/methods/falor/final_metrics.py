"""Final-output error measures, with ptdeco.falor's definitions.

* per-channel noise-to-signal ratio: every element of a sample's output is a
  channel; ``mean_c E_b[(y'_c − y_c)²] / (Var_b[y_c] + 1e-3)`` over a batch;
* symmetric KL of the softmax over the last dimension:
  ``max(KL(p‖q), KL(q‖p))`` per row, averaged.
"""

from __future__ import annotations

import torch

from fxdeco.errors import CalibrationError
from fxdeco.methods.falor.lowrank import NSR_EPSILON


def channel_variance(reference: torch.Tensor) -> torch.Tensor:
    """Per-channel variance over the batch (dimension 0), shaped like one sample."""
    if reference.dim() == 0 or reference.shape[0] < 2:
        raise ValueError(f"final-output NSR needs batches of at least 2 samples, got output shape "
                         f"{tuple(reference.shape)}")
    return reference.to(torch.float64).var(0)


def check_metric_batch(output: torch.Tensor, index: int, metric_batches: int) -> None:
    """Refuse a metric batch whose compared output has fewer than 2 samples, naming it (fxdeco.transform checks
    each metric batch as it is read, rather than failing in :func:`channel_variance` after the whole calibration).

    Example:
        >>> check_metric_batch(torch.zeros(4, 3), 1, 2)
        >>> check_metric_batch(torch.zeros(1, 3), 1, 2)
        Traceback (most recent call last):
        ...
        fxdeco.errors.CalibrationError: calibration batch 1 is one of the 2 metric batches the final-output error is \
measured on, and its output of shape (1, 3) holds fewer than 2 samples: the per-channel NSR divides by each channel's \
variance over a batch's samples. Give batches of at least 2 samples (the loader's first 2)
    """
    if output.dim() == 0 or output.shape[0] < 2:
        raise CalibrationError(f"calibration batch {index} is one of the {metric_batches} metric batches the "
                               f"final-output error is measured on, and its output of shape {tuple(output.shape)} "
                               "holds fewer than 2 samples: the per-channel NSR divides by each channel's variance "
                               f"over a batch's samples. Give batches of at least 2 samples (the loader's first "
                               f"{metric_batches})")


def final_nsr(reference: torch.Tensor, approx: torch.Tensor, epsilon: float = NSR_EPSILON) -> float:
    """Per-channel NSR of ``approx`` against ``reference`` (dimension 0 is the batch).

    Example:
        >>> y = torch.tensor([[1.0, 0.0], [-1.0, 2.0]])
        >>> round(final_nsr(y, y + 0.1), 6)   # 0.01 / (2 + 1e-3) on both channels
        0.004998
    """
    reference64, approx64 = reference.detach().to(torch.float64), approx.detach().to(torch.float64)
    error = (approx64 - reference64).square().mean(0)
    return float((error / (channel_variance(reference64) + epsilon)).mean())


def symmetric_kl(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``max(KL(p‖q), KL(q‖p))`` of the softmax over the last dimension, averaged over the other dimensions.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
        >>> symmetric_kl(logits, logits)
        0.0
        >>> symmetric_kl(logits, logits.flip(-1)) > 0
        True
    """
    log_p = torch.log_softmax(reference.detach().to(torch.float64), dim=-1)
    log_q = torch.log_softmax(approx.detach().to(torch.float64), dim=-1)
    forward = (log_p.exp() * (log_p - log_q)).sum(-1)
    backward = (log_q.exp() * (log_q - log_p)).sum(-1)
    return float(torch.maximum(forward, backward).mean())
