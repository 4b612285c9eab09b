"""Activation statistics of every site, accumulated in one Interpreter pass.

For each site we keep, in float64, the sums that define the second moment of
its bias-free output ``M = E[y yᵀ]``, its mean and the number of rows (one row
per token for a Linear, per output pixel for a Conv2d). Activations are never
kept, and statistics merge by addition so several processes or several
calibration runs can be combined (or all-reduced) afterwards.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
import torch.fx

from passes.sites import Site, fetch_attr


@dataclasses.dataclass
class SiteStatistics:
    """Streaming sums of a site's bias-free output ``y`` (float64).

    Example:
        >>> s = SiteStatistics.empty(2)
        >>> s.update(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
        >>> s.second_moment()
        tensor([[1., 1.],
                [1., 2.]], dtype=torch.float64)
    """

    sum_outer: torch.Tensor  # Σ y yᵀ, (out, out)
    sum: torch.Tensor  # Σ y, (out,)
    rows: int = 0  # number of output vectors seen
    samples: int = 0  # number of batch elements seen

    @classmethod
    def empty(cls, channels: int) -> "SiteStatistics":
        return cls(torch.zeros(channels, channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64))

    def update(self, rows: torch.Tensor, samples: int | None = None, weights: torch.Tensor | None = None) -> None:
        """Add a ``(n, channels)`` block of outputs (optionally weighted per row)."""
        rows = rows.detach().to(device="cpu", dtype=torch.float64)
        if weights is not None:
            w = weights.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
            self.sum_outer += (rows * w[:, None]).T @ rows
            self.sum += w @ rows
            self.rows += int(w.count_nonzero())
        else:
            self.sum_outer += rows.T @ rows
            self.sum += rows.sum(0)
            self.rows += rows.shape[0]
        self.samples += rows.shape[0] if samples is None else samples

    def __add__(self, other: "SiteStatistics") -> "SiteStatistics":
        return SiteStatistics(self.sum_outer + other.sum_outer, self.sum + other.sum,
                              self.rows + other.rows, self.samples + other.samples)

    def second_moment(self) -> torch.Tensor:
        """``E[y yᵀ]`` over all rows seen."""
        return self.sum_outer / max(self.rows, 1)

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.rows, 1)

    def variance(self) -> torch.Tensor:
        """Per-channel (population) variance of ``y``; the bias does not change it."""
        return (self.sum_outer.diagonal() / max(self.rows, 1) - self.mean() ** 2).clamp_min(0.0)

    @property
    def rows_per_sample(self) -> float:
        return self.rows / max(self.samples, 1)


class NonFiniteActivationError(ValueError):
    """A site produced NaN or Inf during calibration."""


def output_rows(site: Site, y: torch.Tensor) -> torch.Tensor:
    """Reshape a site output to ``(rows, channels)``: channels last."""
    if site.kind == "conv2d":
        y = y.movedim(1, -1)
    return y.reshape(-1, site.out_features)


class StatsInterpreter(torch.fx.Interpreter):
    """Run a graph and accumulate :class:`SiteStatistics` for every site.

    Statistics are keyed by ``site.target``, so a layer called at several
    places of the graph accumulates into one entry.

    Example:
        >>> from passes.sites import find_sites
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 3)))
        >>> sites, _ = find_sites(gm)
        >>> interp = StatsInterpreter(gm, sites)
        >>> _ = interp.run(torch.randn(5, 4))
        >>> interp.statistics["0"].rows
        5
    """

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        sites: Iterable[Site],
        statistics: dict[str, SiteStatistics] | None = None,
        row_weights: Callable[[Site, torch.Tensor], torch.Tensor | None] | None = None,
    ) -> None:
        super().__init__(gm)
        self.sites = {s.node: s for s in sites}
        self.biases = {s.node: fetch_attr(gm, s.bias).detach() if s.bias else None for s in self.sites.values()}
        self.statistics = statistics if statistics is not None else {}
        self.row_weights = row_weights
        self.batch_index = 0
        self.current_node: torch.fx.Node | None = None  # the node that was running when an error escaped

    def run_node(self, n: torch.fx.Node) -> Any:
        self.current_node = n
        out = super().run_node(n)
        site = self.sites.get(n.name)
        if site is not None:
            self._accumulate(site, out)
        return out

    def _accumulate(self, site: Site, out: torch.Tensor) -> None:
        y = out.detach()
        bias = self.biases[site.node]
        if bias is not None:
            y = y - (bias.reshape(-1, 1, 1) if site.kind == "conv2d" else bias)
        if not torch.isfinite(y).all():
            raise NonFiniteActivationError(
                f"site {site.target!r} (node {site.node}) produced NaN/Inf on calibration batch {self.batch_index}; "
                "check the inputs of that batch or skip the layer with skip=[...]"
            )
        stats = self.statistics.get(site.target)
        if stats is None:
            stats = self.statistics[site.target] = SiteStatistics.empty(site.out_features)
        weights = self.row_weights(site, y) if self.row_weights is not None else None
        stats.update(output_rows(site, y), samples=y.shape[0], weights=weights)
