"""lockd's losses, for ``lockd.train`` and for your own training loop.

After a forward pass of a prepared graph (training mode, see
``lockd.train_mode``), the loss to minimise is
``nsr_loss(gm) + lmbda * proportion_loss(gm)`` (optionally
``+ weight * entropy_loss(gm)``, which pushes gates towards 0 or 1).
"""

from __future__ import annotations

import torch
from torch import nn

from fxdeco.checks import check_positive
from fxdeco.methods.lockd.prepare import branches, lockd_state


class NonFiniteLossError(FloatingPointError):
    """A branch's NSR became NaN or infinite during lockd training."""


def nsr_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Layer name -> NSR of its branch in the last forward pass (mean over the calls of a shared layer)."""
    out: dict[str, torch.Tensor] = {}
    for target, branch in branches(model).items():
        values = [tap.nsr for tap in branch.taps]
        if any(v is None for v in values):
            raise RuntimeError(f"no NSR recorded for layer {target!r}: run a forward pass of the prepared graph "
                               "before computing lockd losses")
        out[target] = torch.stack(values).mean()
    return out


def check_finite(model: nn.Module, step: int | None = None) -> None:
    """Raise :class:`NonFiniteLossError` naming the first layer whose branch NSR is not finite."""
    for target, nsr in nsr_values(model).items():
        if not torch.isfinite(nsr):
            when = f" at step {step}" if step is not None else ""
            raise NonFiniteLossError(
                f"the NSR of layer {target!r} became {float(nsr.detach())}{when}: its original output or branch "
                "overflowed. Lower lr, check the inputs for NaN/inf, or skip the layer with prepare(..., skip=[...])")


def nsr_loss(model: nn.Module, nsr_threshold: float | None = None) -> torch.Tensor:
    """Mean over layers of ``relu(nsr - tau) / tau``: zero while every branch imitates its layer well enough.

    ``tau`` is ``prepare``'s ``nsr_threshold`` unless given here.

    Example:
        >>> import torch
        >>> from fxdeco import lockd
        >>> gm = lockd.prepare(torch.nn.Sequential(torch.nn.Linear(8, 8)), nsr_threshold=0.1)
        >>> _ = gm(torch.randn(16, 8))
        >>> lockd.nsr_loss(gm).item()  # an exact SVD branch with open gates
        0.0
    """
    tau = lockd_state(model).nsr_threshold if nsr_threshold is None else check_positive("nsr_threshold",
                                                                                          nsr_threshold)
    values = torch.stack(list(nsr_values(model).values()))
    return (torch.relu(values - tau) / tau).mean()


def proportion_loss(model: nn.Module) -> torch.Tensor:
    """Mean over layers of the mean ``sigmoid(logit)``: the expected share of open gates.

    Example:
        >>> import torch
        >>> from fxdeco import lockd
        >>> gm = lockd.prepare(torch.nn.Sequential(torch.nn.Linear(8, 8)), init_logit=0.0)
        >>> lockd.proportion_loss(gm).item()
        0.5
    """
    return torch.stack([torch.sigmoid(b.gate.logits).mean() for b in branches(model).values()]).mean()


def entropy_loss(model: nn.Module) -> torch.Tensor:
    """Mean over layers of the binary entropy of each gate's ``sigmoid(logit)`` (in nats).

    Example:
        >>> import torch
        >>> from fxdeco import lockd
        >>> gm = lockd.prepare(torch.nn.Sequential(torch.nn.Linear(8, 8)), init_logit=0.0)
        >>> round(lockd.entropy_loss(gm).item(), 4)  # log 2: undecided gates
        0.6931
    """
    per_layer = []
    for b in branches(model).values():
        p = torch.sigmoid(b.gate.logits)
        # the logsigmoid form stays finite where p rounds to 0 or 1
        entropy = -(p * nn.functional.logsigmoid(b.gate.logits) + (1 - p) * nn.functional.logsigmoid(-b.gate.logits))
        per_layer.append(entropy.mean())
    return torch.stack(per_layer).mean()


@torch.no_grad()
def kept_proportion(model: nn.Module) -> float:
    """Mean over layers of the share of gates open at eval time (``logit > 0``).

    Example:
        >>> import torch
        >>> from fxdeco import lockd
        >>> lockd.kept_proportion(lockd.prepare(torch.nn.Sequential(torch.nn.Linear(8, 8))))
        1.0
    """
    shares = [float((b.gate.logits > 0).float().mean()) for b in branches(model).values()]
    return sum(shares) / len(shares)
