"""One layer's latency as a function of its rank: the dense time, and the factored time at measured ranks.

Between measured ranks the factored time is interpolated linearly (a factored
layer's cost is close to affine in its rank, with steps at the widths the
kernels like); outside them it is held or extended conservatively (see
:meth:`SiteLatency.factored`). Decisions that must not rest on a guess can ask
whether a rank was measured, and :func:`fxdeco.latency.probe.refine` measures more.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from fxdeco.latency.table import LatencyKey, LatencyTable


class RankTime(NamedTuple):
    """The factored form's seconds per call at a rank, and whether that rank was measured (not interpolated)."""

    seconds: float
    measured: bool


@dataclasses.dataclass(frozen=True)
class SiteLatency:
    """Measured latency of one layer (``target``): dense, and factored at the ranks in ``measured``.

    Times are seconds per call of the model; a layer the graph calls several
    times (a module reused) counts every call, so ``keys`` holds one
    :class:`~fxdeco.latency.table.LatencyKey` per call. ``device`` and
    ``table`` tell :func:`~fxdeco.latency.probe.refine` where to measure more
    ranks and where to keep them.

    Example:
        >>> lat = SiteLatency("fc", dense=10.0, measured={8: 2.0, 64: 6.0, 128: 11.0})
        >>> lat.factored(8), lat.factored(36)
        (RankTime(seconds=2.0, measured=True), RankTime(seconds=4.0, measured=False))
        >>> round(lat.speedup(64), 3), lat.is_faster(64), lat.is_faster(128)
        (1.667, True, False)
    """

    target: str
    dense: float
    measured: dict[int, float]
    full_rank: int | None = None
    keys: tuple[LatencyKey, ...] = dataclasses.field(default=(), repr=False)
    device: str = "cpu"
    table: LatencyTable | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "measured", {int(r): float(t) for r, t in sorted(self.measured.items())})

    @property
    def ranks(self) -> list[int]:
        """The measured ranks, ascending."""
        return list(self.measured)

    def factored(self, rank: int) -> RankTime:
        """Seconds per call of the factored form at ``rank``: measured, or estimated from the measured ranks.

        Between two measured ranks: linear interpolation. Below the smallest:
        the smallest's time (a thinner layer is rarely slower; this never
        flatters it). Above the largest: the last segment's slope continued
        (at least flat), or, with a single measured rank, the time scaled in
        proportion to the rank.

        Example:
            >>> lat = SiteLatency("fc", dense=10.0, measured={8: 2.0, 16: 3.0})
            >>> lat.factored(4).seconds, lat.factored(12).seconds, lat.factored(32).seconds
            (2.0, 2.5, 5.0)
        """
        rank = int(rank)
        if rank < 1:
            raise ValueError(f"{self.target}: rank must be >= 1, got {rank}")
        if not self.measured:
            raise ValueError(f"{self.target}: no factored rank has been measured (the layer may be too small to "
                             "save parameters by factoring); measure some with fxdeco.latency.refine")
        if rank in self.measured:
            return RankTime(self.measured[rank], True)
        ranks = self.ranks
        if rank < ranks[0]:
            return RankTime(self.measured[ranks[0]], False)
        if rank > ranks[-1]:
            if len(ranks) == 1:
                return RankTime(self.measured[ranks[0]] * rank / ranks[0], False)
            r0, r1 = ranks[-2], ranks[-1]
            slope = max(0.0, (self.measured[r1] - self.measured[r0]) / (r1 - r0))
            return RankTime(self.measured[r1] + slope * (rank - r1), False)
        hi = next(i for i, r in enumerate(ranks) if r > rank)
        r0, r1 = ranks[hi - 1], ranks[hi]
        t0, t1 = self.measured[r0], self.measured[r1]
        return RankTime(t0 + (t1 - t0) * (rank - r0) / (r1 - r0), False)

    def seconds(self, rank: int | None) -> float:
        """Seconds per call with the layer dense (``rank=None``) or factored at ``rank``.

        Example:
            >>> SiteLatency("fc", dense=10.0, measured={8: 2.0}).seconds(None)
            10.0
        """
        return self.dense if rank is None else self.factored(rank).seconds

    def speedup(self, rank: int) -> float:
        """Dense time over factored time at ``rank`` (above 1: factoring is faster).

        Example:
            >>> SiteLatency("fc", dense=10.0, measured={8: 2.0}).speedup(8)
            5.0
        """
        return self.dense / self.factored(rank).seconds

    def is_faster(self, rank: int, margin: float = 0.05, *, measured_only: bool = False) -> bool:
        """Whether the factored form at ``rank`` beats the dense layer by more than ``margin`` (0.05: 5%).

        Timing noise on a busy machine is a few percent, so a margin keeps a
        layer dense when factoring it gains nothing measurable.
        ``measured_only=True`` answers False for a rank that was not measured.

        Example:
            >>> lat = SiteLatency("fc", dense=10.0, measured={8: 9.8, 16: 12.0})
            >>> lat.is_faster(8), lat.is_faster(8, margin=0.0), lat.is_faster(12, margin=0.0, measured_only=True)
            (False, True, False)
        """
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        estimate = self.factored(rank)
        if measured_only and not estimate.measured:
            return False
        return self.dense > estimate.seconds * (1 + margin)

    def fastest_near(self, rank: int, ranks: Iterable[int] | None = None, *, window: float = 0.25,
                     tolerance: float = 0.0) -> int:
        """``rank``, or a larger measured rank within ``window`` that is faster: the fastest of them.

        Candidates are the measured ranks ``r`` with ``rank < r <= ceil(rank * (1 + window))``
        (only those in ``ranks`` when given); one is chosen only when it is
        faster than ``rank`` itself (measured or estimated), and among equally
        fast ones the smallest. A larger rank is never less accurate, so this
        snaps a rank up to a faster width nearby (a multiple of 16 on a GPU,
        say) and never down. With ``tolerance`` (0.03: 3%), the largest of the
        ranks within that much of the fastest is chosen instead: a difference
        of timing noise is not worth the accuracy of the larger rank.

        Example:
            >>> lat = SiteLatency("fc", dense=10.0, measured={30: 3.3, 32: 2.9, 33: 3.4, 48: 2.0})
            >>> lat.fastest_near(30), lat.fastest_near(30, [33]), lat.fastest_near(33), lat.fastest_near(30, window=1)
            (32, 30, 33, 48)
            >>> flat = SiteLatency("fc", dense=10.0, measured={19: 2.00, 20: 2.01, 22: 2.04, 24: 2.2})
            >>> flat.fastest_near(19), flat.fastest_near(19, tolerance=0.03)
            (19, 22)
        """
        if window < 0 or tolerance < 0:
            raise ValueError(f"window and tolerance must be >= 0, got {window} and {tolerance}")
        rank = int(rank)
        top = math.ceil(rank * (1 + window))
        allowed = None if ranks is None else {int(r) for r in ranks}
        near = {rank: self.factored(rank).seconds}
        near.update({r: t for r, t in self.measured.items() if rank < r <= top and (allowed is None or r in allowed)})
        fastest = min(near.values())
        if tolerance == 0:
            return min(r for r, t in near.items() if t == fastest)
        return max(r for r, t in near.items() if t <= fastest * (1 + tolerance))
