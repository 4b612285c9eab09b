"""ptdeco 0.5.0's lockd run as its authors run it, shared by the CNN and MiniLM lockd benchmarks.

Example (not run: ptdeco is a benchmark-only dependency)::

    wrapped, losses, proportion, seconds = train_ptdeco_lockd(model, batches, lambda m, b: m(b), PTDECO)
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn


def train_ptdeco_lockd(model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any],
                       settings: dict[str, float]) -> tuple[nn.Module, list[float], float, float]:
    """Wrap a copy of ``model`` (eval mode: frozen BatchNorm statistics, no dropout) with ptdeco's lockd, train
    its branches and gates with ``nsr_loss + lmbda * proportion_loss`` (Adam at ``settings["lr"]``, one step per
    batch, ``forward(model, batch)`` runs it), then ``decompose_in_place``.

    Returns the decomposed copy, the loss of every step, the mean gate proportion before decomposing and the
    wall time in seconds.
    """
    from ptdeco import lockd as plockd

    torch.manual_seed(0)
    start = time.perf_counter()
    wrapped = copy.deepcopy(model).eval()
    plockd.wrap_in_place(wrapped)
    params = plockd.get_parameters_trainable(wrapped)
    for p in wrapped.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=settings["lr"])
    losses = []
    for batch in batches:
        forward(wrapped, batch)
        loss = plockd.get_nsr_loss(wrapped, settings["nsr_threshold"]) + \
            settings["lmbda"] * plockd.get_proportion_loss(wrapped)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    proportion = float(plockd.get_proportion_loss(wrapped).detach())
    plockd.decompose_in_place(wrapped, proportion_threshold=settings["proportion_threshold"])
    seconds = time.perf_counter() - start
    for p in wrapped.parameters():
        p.requires_grad_(True)
    return wrapped, losses, proportion, seconds
