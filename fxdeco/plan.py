"""Per-layer decisions a method makes, and the cost bookkeeping behind them."""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from typing import Any, Iterable

from passes import Site, SiteStatistics


@dataclasses.dataclass
class LayerDecision:
    """What a method decided for one layer (decomposed or kept dense, and why)."""

    target: str
    kind: str
    weight_shape: tuple[int, ...]
    full_rank: int
    rank: int | None  # None: kept dense
    nsr: float | None  # estimated layer-output NSR at ``rank``
    params_before: int
    params_after: int
    macs_before: float  # per sample
    macs_after: float
    reason: str
    # final-output mode: the measured final-output NSR / KL with only this layer decomposed, and the probes spent
    nsr_final: float | None = None
    kl_final: float | None = None
    probes: int = 0
    # dwain: the relative perplexity increase (exp(loss') - exp(loss)) / exp(loss) measured at ``rank``
    ppl_diff: float | None = None
    # output rows the statistics saw (padding excluded); fewer than ``full_rank`` means the spectrum was cut by
    # the amount of data, not by the layer (see :meth:`too_little_data`)
    calib_rows: float | None = None
    # seconds per call of the calibration batch, dense and at ``rank``, when falor timed the layer (fxdeco.latency)
    seconds_dense: float | None = None
    seconds_factored: float | None = None

    @property
    def decomposed(self) -> bool:
        return self.rank is not None

    @property
    def too_little_data(self) -> bool:
        """The layer saw fewer calibration rows than its full rank: its ranks and NSR are not to be trusted."""
        return self.calib_rows is not None and self.calib_rows < self.full_rank

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def dense_macs(site: Site, stats: SiteStatistics) -> float:
    """MACs per sample of the dense layer: one ``in``-long dot per output value."""
    return stats.rows_per_sample * site.in_features * site.out_features


def factored_macs(site: Site, stats: SiteStatistics, rank: int) -> float:
    """MACs per sample of the factored layer: ``rank * (in + out)`` per output row."""
    return stats.rows_per_sample * rank * (site.in_features + site.out_features)


def decision(site: Site, stats: SiteStatistics, rank: int | None, nsr: float | None, reason: str,
             adds_bias: bool = False) -> LayerDecision:
    """Build a :class:`LayerDecision` with params (bias included) and MACs before/after filled in.

    ``adds_bias``: the factored layer carries a bias even if the original had none.
    """
    bias = site.out_features if site.bias else 0
    dense_params = site.dense_params
    factored = site.factor_params(rank) + (site.out_features if adds_bias else bias) if rank is not None else 0
    macs = dense_macs(site, stats)
    return LayerDecision(
        site.target, site.kind, site.weight_shape, site.full_rank, rank, nsr,
        dense_params, factored if rank is not None else dense_params,
        macs, factored_macs(site, stats, rank) if rank is not None else macs, reason,
    )


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """True when ``name`` matches one of the glob ``patterns`` (``"blocks.*.attn.*"``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# Characters that mean something in a regular expression but are taken literally by a glob: a skip pattern written
# as a regex ('.*', 'blocks\\.0', '^head$') matches no layer name, and skipping nothing must not pass unnoticed.
_REGEX_ONLY = ("^", "$", "\\", "+", "(", ")", "|", "{", ".*")


def warn_unmatched_patterns(option: str, patterns: Iterable[str], names: Iterable[str]) -> None:
    """Warn about every glob in ``patterns`` that matches none of the layer ``names``: a misspelt name or a regular
    expression (``'.*'``, ``'^head$'``) would otherwise skip nothing, silently, and those layers be decomposed.

    Example:
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_unmatched_patterns("skip", ["head", "^0$"], ["0", "head"])
        >>> [str(w.message)[:78] for w in caught]
        ["skip pattern '^0$' matches no layer, so it skips nothing (patterns are globs o"]
    """
    names = list(names)
    for pattern in dict.fromkeys(patterns):
        if any(fnmatch.fnmatchcase(name, pattern) for name in names):
            continue
        hint = (" (patterns are globs on layer names, not regular expressions: '*' for any characters, '?' for one)"
                if any(c in pattern for c in _REGEX_ONLY) else "")
        shown = ", ".join(repr(n) for n in names[:6]) + (", ..." if len(names) > 6 else "")
        warnings.warn(f"{option} pattern {pattern!r} matches no layer, so it skips nothing{hint}; the layers are "
                      f"{shown or 'none'}", stacklevel=3)


def unique_targets(sites: Iterable[Site]) -> list[Site]:
    """One site per layer: a layer called several times shares one factorization."""
    seen: dict[str, Site] = {}
    for s in sites:
        seen.setdefault(s.target, s)
    return list(seen.values())


# rank_multiple="auto": benchmarks/rank_multiple.py measured factored Linears of 128 to 1536 channels on this
# 2-core CPU running about 7% faster on average with ranks rounded up to multiples of 8 than at the exact rank
# (4: 6%, 16: 3%, 32: 6% slower). Narrower layers were not measured and keep exact ranks.
AUTO_MULTIPLE = 8
AUTO_MIN_WIDTH = 128


def site_multiple(site: Site, rank_multiple: int | str) -> int:
    """The rank granularity for ``site``: ``rank_multiple``, or for ``"auto"`` 8 on layers at least 128 wide.

    Example:
        >>> from passes import Site
        >>> wide, narrow = Site("a", "linear", "a", "a.weight", None, (384, 384)), Site("b", "linear", "b", "b.weight", None, (32, 64))
        >>> site_multiple(wide, "auto"), site_multiple(narrow, "auto"), site_multiple(narrow, 4)
        (8, 1, 4)
    """
    if rank_multiple == "auto":
        return AUTO_MULTIPLE if min(site.out_features, site.in_features) >= AUTO_MIN_WIDTH else 1
    return int(rank_multiple)


def round_rank(rank: int, multiple: int, full_rank: int) -> int:
    """Round ``rank`` up to a multiple of ``multiple``, at most ``full_rank``.

    Example:
        >>> round_rank(13, 8, 64), round_rank(61, 8, 64), round_rank(3, 8, 5)
        (16, 64, 5)
    """
    return min(full_rank, -(-rank // multiple) * multiple)


def rank_refusal(site: Site, rank: int, proportion_threshold: float, adds_bias: bool = False) -> str | None:
    """Why ``site`` may not be factorized at ``rank`` (it saves no parameters, or keeps too large a share of
    the full rank), or None when it may.

    ``adds_bias``: the factored layer carries a bias the dense one lacks (falor's centring of a bias-free
    layer), which counts against the saving.

    Example:
        >>> site = Site("fc", "linear", "fc", "fc.weight", None, (100, 10))  # 10 -> 100, no bias
        >>> rank_refusal(site, 9, 1.0), rank_refusal(site, 9, 1.0, adds_bias=True)
        (None, 'rank 9 would not reduce parameters')
    """
    added = site.out_features if adds_bias and not site.bias else 0
    if not site.saves_params(rank) or site.factor_params(rank) + added >= site.out_features * site.in_features:
        return f"rank {rank} would not reduce parameters"
    if rank / site.full_rank > proportion_threshold:
        return f"rank {rank}/{site.full_rank} above proportion_threshold"
    return None


def candidate_ranks(site: Site, min_rank: int, rank_multiple: int | str, proportion_threshold: float,
                    adds_bias: bool = False) -> list[int]:
    """The ranks a method may give ``site``, ascending: from ``min_rank``, rounded to the site's rank multiple,
    each saving parameters (counting a bias the factored layer adds, ``adds_bias``) and within
    ``proportion_threshold`` of the full rank.

    Example:
        >>> candidate_ranks(Site("fc", "linear", "fc", "fc.weight", None, (64, 64)), 4, 8, 1.0)
        [8, 16, 24]
    """
    multiple = site_multiple(site, rank_multiple)
    ranks = sorted({round_rank(k, multiple, site.full_rank) for k in range(max(min_rank, 1), site.full_rank + 1)})
    return [k for k in ranks if rank_refusal(site, k, proportion_threshold, adds_bias) is None]
