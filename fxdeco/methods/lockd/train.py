"""``lockd.train``: the ready training loop for a prepared graph.

Adam trains the branch weights at ``lr`` and the gate logits at ``logit_lr``.
The split matters: Adam moves every parameter by about its learning rate per
step whatever the gradient's size, so logits sharing the weights' 1e-3 (as in
ptdeco) drift by about one unit per thousand steps and never cross zero in a
short run; at 2e-2 a channel the NSR does not need closes within ~100 steps.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.fx
from torch import nn

from fxdeco.batches import call_on_batch, check_input_fn, leading_dim, model_inputs
from fxdeco.methods.lockd.config import Lockd
from fxdeco.modes import eval_mode
from fxdeco.train.finetune import TrainingBatches, autocast_context, model_device, to_device, use_amp
from fxdeco.methods.lockd.losses import check_finite, entropy_loss, kept_proportion, nsr_loss, proportion_loss
from fxdeco.methods.lockd.prepare import ROLE, branches, lockd_state, train_mode, unwrap
from fxdeco.progress import Progress
from passes import CostProp
from passes.inputs import flatten_inputs

log = logging.getLogger(__name__)



@dataclasses.dataclass
class TrainHistory:
    """Per-step values of :func:`train`: total loss, its terms, and the share of gates open at eval time."""

    loss: list[float] = dataclasses.field(default_factory=list)
    nsr_loss: list[float] = dataclasses.field(default_factory=list)
    proportion_loss: list[float] = dataclasses.field(default_factory=list)
    kept: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def record_macs(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> float:
    """MACs per sample of the original model (branch nodes excluded), from one cost pass on a batch.

    Stored in ``gm.meta["lockd"]`` for ``finalize``'s report; ``train`` calls it on its first batch.
    """
    gm = unwrap(model)
    state = lockd_state(gm)
    with eval_mode(gm):
        _run_cost(gm, args, kwargs)
    total = sum(n.meta["cost"].macs for n in gm.graph.nodes
                if "cost" in n.meta and n.meta.get("chain_role") != ROLE)
    state.macs_per_sample = total / leading_dim(args, kwargs)
    reset_eval_nsr(gm)
    return state.macs_per_sample


def _run_cost(gm: torch.fx.GraphModule, args: tuple, kwargs: dict[str, Any]) -> None:
    # Interpreter.run takes positional inputs: the placeholders' values as a call binds them, defaults included (an
    # input traced as its default, timm ViT's is_causal=False, failed the graph's check when given None).
    CostProp(gm).run(*flatten_inputs(gm, args, kwargs))


def reset_eval_nsr(model: nn.Module) -> None:
    """Forget the eval-mode NSR the taps have averaged so far."""
    for branch in branches(model).values():
        for tap in branch.taps:
            tap.eval_sum, tap.eval_count = 0.0, 0


@torch.no_grad()
def measure_nsr(model: nn.Module, batches: Iterable[Any], input_fn: Callable[[Any], Any] | None = None) -> dict:
    """Run ``batches`` in eval mode (hard gates); return layer -> mean NSR, also kept for ``finalize``."""
    gm = unwrap(model)
    device = model_device(gm)
    reset_eval_nsr(gm)
    train_mode(gm, False)
    for batch in batches:
        args, kwargs = model_inputs(to_device(batch, device), input_fn)
        gm(*args, **kwargs)
    return {t: sum(tap.nsr_eval_mean or 0.0 for tap in b.taps) / len(b.taps) for t, b in branches(gm).items()}


def _optimizer(model: nn.Module, lr: float, logit_lr: float) -> torch.optim.Optimizer:
    weights, logits = [], []
    for branch in branches(model).values():
        logits.append(branch.gate.logits)
        weights += [p for m in (branch.first, branch.second) for p in m.parameters()]
    return torch.optim.Adam([{"params": weights, "lr": lr}, {"params": logits, "lr": logit_lr}])


def train(
    gm: nn.Module,
    loader: Iterable[Any],
    *,
    steps: int,
    lr: float = Lockd.lr,
    logit_lr: float = Lockd.logit_lr,
    lmbda: float = Lockd.lmbda,
    entropy_weight: float = Lockd.entropy_weight,
    input_fn: Callable[[Any], Any] | None = None,
    amp: bool = Lockd.amp,
    eval_batches: int = Lockd.eval_batches,
    show_progress: bool | None = Lockd.show_progress,
    log_every: int = 100,
    callback: Callable[[int, TrainHistory], bool | None] | None = None,
) -> TrainHistory:
    """Train the branches of a prepared graph for ``steps`` batches of ``loader``; return the loss history.

    Each step minimises ``nsr_loss + lmbda * proportion_loss (+ entropy_weight *
    entropy_loss)`` with Adam (branch weights at ``lr``, gate logits at
    ``logit_lr``). A re-iterable loader (a list, a DataLoader) is read as often
    as needed; a one-shot iterator (a generator) is read once, and when it runs
    out before ``steps`` training stops there with a warning, keeping its
    history. ``input_fn`` turns a batch into the model's inputs (``lambda b:
    b[0]`` for ``(x, y)``).
    ``gm`` may be wrapped in DistributedDataParallel (gradients are averaged
    across processes, so gates stay identical everywhere). ``amp=True``
    autocasts to bfloat16 on CUDA. A NaN or infinite loss stops training with
    the name of the layer whose NSR went bad. The original layers stay in eval
    mode; afterwards the last ``eval_batches`` training batches (kept, so the
    loader is not read again) measure each branch's NSR with hard gates (what
    ``finalize`` reports), and the graph is left in eval mode.
    ``callback(step, history)`` runs after every step; returning True stops
    training early (``history`` then has fewer than ``steps`` entries).

    Example:
        >>> import torch
        >>> from fxdeco import lockd
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> with torch.no_grad():  # a first layer of rank 4: 12 of its 16 branch channels are useless
        ...     _ = model[0].weight.copy_(torch.randn(32, 4) @ torch.randn(4, 16) / 4)
        >>> gm = lockd.prepare(model, nsr_threshold=0.1)
        >>> history = lockd.train(gm, [torch.randn(64, 16) for _ in range(4)], steps=120, lmbda=1.0)
        >>> history.kept[-1] < history.kept[0]
        True
    """
    state = lockd_state(gm)
    Lockd(steps=steps, lr=lr, logit_lr=logit_lr, lmbda=lmbda, entropy_weight=entropy_weight,
          eval_batches=eval_batches)  # the options' one check (fxdeco.Lockd)
    check_input_fn(input_fn)
    device = model_device(unwrap(gm))
    amp = use_amp(amp, device)
    optimizer = _optimizer(gm, lr, logit_lr)
    history = TrainHistory()
    bar = Progress("lockd", steps, show_progress)
    # the last eval_batches training batches measure the branches afterwards: the loader is never read again
    batches = TrainingBatches(loader, keep=eval_batches)
    start = time.perf_counter()
    try:
        for step in range(steps):
            batch = batches.next()
            if batch is None:
                warnings.warn(batches.ran_out_message(steps), UserWarning, stacklevel=2)
                break
            args, kwargs = model_inputs(to_device(batch, device), input_fn, step)
            if step == 0 and state.macs_per_sample is None:
                _try_record_macs(gm, args, kwargs)
            train_mode(gm, True)
            with autocast_context(amp):
                call_on_batch(gm, args, kwargs, step)
            nsr_term, prop_term = nsr_loss(gm), proportion_loss(gm)
            loss = nsr_term + lmbda * prop_term
            if entropy_weight:
                loss = loss + entropy_weight * entropy_loss(gm)
            if not torch.isfinite(loss):
                check_finite(gm, step)
                raise FloatingPointError(f"lockd loss became {float(loss)} at step {step}; lower logit_lr/lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _append(history, loss, nsr_term, prop_term, kept_proportion(gm))
            bar.update(loss=history.loss[-1], nsr=history.nsr_loss[-1], prop=history.proportion_loss[-1],
                       kept=history.kept[-1])
            if log_every and (step + 1) % log_every == 0:
                log.info("lockd step %d/%d: loss %.4g (nsr %.4g, proportion %.4g), kept %.1f%%", step + 1, steps,
                         history.loss[-1], history.nsr_loss[-1], history.proportion_loss[-1], 100 * history.kept[-1])
            if callback is not None and callback(step, history):
                log.info("lockd: stopped by the callback after %d steps", step + 1)
                break
        state.steps_trained += len(history.loss)
        if eval_batches and history.loss:
            measure_nsr(gm, batches.recent, input_fn)
    finally:
        bar.close()
        train_mode(gm, False)
    history.seconds = time.perf_counter() - start
    log.info("lockd trained %d steps in %.1fs: loss %.4g, %.1f%% of gates open", len(history.loss), history.seconds,
             history.loss[-1], 100 * history.kept[-1])
    return history


def _try_record_macs(gm: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    try:
        record_macs(gm, args, kwargs)
    except Exception as exc:  # MACs are for the report only: never stop training for them
        log.warning("could not count MACs on the first batch (%s); the report will show none", exc)


def _append(history: TrainHistory, loss: torch.Tensor, nsr_term: torch.Tensor, prop_term: torch.Tensor,
            kept: float) -> None:
    history.loss.append(float(loss.detach()))
    history.nsr_loss.append(float(nsr_term.detach()))
    history.proportion_loss.append(float(prop_term.detach()))
    history.kept.append(kept)
