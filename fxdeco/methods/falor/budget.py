"""Global rank allocation under a size budget (``keep_params=`` / ``keep_macs=``).

Every layer offers a few options (dense, or factorized at one of its candidate
ranks), each with a cost (parameters or MACs) and an error. Choosing one option
per layer so that the total cost fits the budget with the least summed error is
a multiple-choice knapsack: we solve it by dynamic programming over the budget
cut into ``resolution`` steps (costs rounded down), repair the rare overshoot
that rounding allows with the cheapest downgrades, then spend what is left on
the upgrades that remove the most error per unit of cost.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class LayerOptions:
    """The choices for one layer: option 0 must be the dense layer (error 0)."""

    name: str
    costs: torch.Tensor  # (n_options,) float64
    errors: torch.Tensor  # (n_options,) float64


class BudgetError(ValueError):
    """The requested budget cannot be reached."""


def _total(layers: list[LayerOptions], choice: list[int]) -> float:
    return float(sum(layer.costs[i] for layer, i in zip(layers, choice)))


def allocate(layers: list[LayerOptions], budget: float, fixed_cost: float = 0.0,
             resolution: int = 4000) -> list[int]:
    """Pick an option index per layer with ``fixed_cost + Σ cost <= budget``, minimising ``Σ error``.

    Raises :class:`BudgetError` (with the smallest reachable total) when even the
    cheapest option of every layer does not fit.

    Example:
        >>> a = LayerOptions("a", torch.tensor([10., 4., 2.]), torch.tensor([0., .1, .5]))
        >>> b = LayerOptions("b", torch.tensor([10., 4., 2.]), torch.tensor([0., .01, .02]))
        >>> allocate([a, b], budget=12)   # squeeze b, whose error barely grows; keep a dense
        [0, 2]
        >>> allocate([a, b], budget=8)
        [1, 1]
    """
    cheapest = [int(torch.argmin(layer.costs)) for layer in layers]
    floor = fixed_cost + _total(layers, cheapest)
    if floor > budget * (1 + 1e-12):
        raise BudgetError(f"budget {budget:.6g} is below the smallest reachable total {floor:.6g}")
    if fixed_cost + _total(layers, [0] * len(layers)) <= budget:
        return [0] * len(layers)
    room = budget - fixed_cost
    unit = room / resolution
    best = torch.zeros(resolution + 1, dtype=torch.float64)  # best[c]: least error using at most c units
    picks = []
    for layer in layers:
        steps = torch.floor(layer.costs / unit + 1e-9).long()
        candidates = torch.full((len(steps), resolution + 1), float("inf"), dtype=torch.float64)
        for o, w in enumerate(steps.tolist()):
            if w <= resolution:
                candidates[o, w:] = best[: resolution + 1 - w] + layer.errors[o]
        best, pick = candidates.min(0)
        picks.append(pick)
    choice, c = [], resolution
    for layer, pick in zip(reversed(layers), reversed(picks)):
        o = int(pick[c])
        choice.append(o)
        c -= int(torch.floor(layer.costs[o] / unit + 1e-9))
    return _spend_slack(layers, _repair(layers, choice[::-1], room), room)


def _repair(layers: list[LayerOptions], choice: list[int], budget: float) -> list[int]:
    """Downgrade, cheapest error per saved cost first, until the (rounded-down) choice truly fits."""
    choice = list(choice)
    while _total(layers, choice) > budget:
        best, best_ratio = None, float("inf")
        for li, layer in enumerate(layers):
            saved = layer.costs[choice[li]] - layer.costs
            loss = layer.errors - layer.errors[choice[li]]
            ok = saved > 0
            if not bool(ok.any()):
                continue
            ratio = torch.where(ok, loss.clamp_min(0) / saved.clamp_min(1e-30), torch.full_like(loss, float("inf")))
            j = int(torch.argmin(ratio))
            if float(ratio[j]) < best_ratio:
                best, best_ratio = (li, j), float(ratio[j])
        if best is None:
            break
        choice[best[0]] = best[1]
    return choice


def _spend_slack(layers: list[LayerOptions], choice: list[int], budget: float) -> list[int]:
    """Greedily take the upgrade with the best error reduction per extra cost while it fits."""
    choice = list(choice)
    while True:
        slack = budget - _total(layers, choice)
        best, best_gain = None, 0.0
        for li, layer in enumerate(layers):
            current_cost, current_err = layer.costs[choice[li]], layer.errors[choice[li]]
            extra = layer.costs - current_cost
            gain = current_err - layer.errors
            ok = (extra > 0) & (extra <= slack) & (gain > 0)
            if not bool(ok.any()):
                continue
            ratio = torch.where(ok, gain / extra.clamp_min(1e-30), torch.zeros_like(gain))
            j = int(torch.argmax(ratio))
            if float(ratio[j]) > best_gain:
                best, best_gain = (li, j), float(ratio[j])
        if best is None:
            return choice
        choice[best[0]] = best[1]
