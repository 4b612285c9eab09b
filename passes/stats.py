"""Activation statistics of every site, accumulated in one Interpreter pass.

For each site we keep float64 sums that define the second moment of
its bias-free output ``M = E[y yᵀ]``, its mean and the number of rows (one row
per token for a Linear, per output pixel for a Conv2d). Activations are never
kept, and statistics merge by addition so several processes or several
calibration runs can be combined (or all-reduced) afterwards.

Rows may carry weights (``row_weights=`` of :class:`StatsInterpreter`), e.g. an
attention mask so that padding tokens do not count: :class:`LeadingDimWeights`
turns a ``(batch, tokens)`` mask into the row weights of every Linear whose
rows have those leading dimensions.

Where it is cheaper, a Linear's moments are accumulated on its *input* and
mapped through the weight afterwards (``E[y yᵀ] = W E[x xᵀ] Wᵀ`` exactly, for
the bias-free output): an ``in x in`` sum instead of ``out x out``, shared by
every Linear reading the same tensor (the query/key/value projections of an
attention block). On a BERT layer this is about 5x fewer float64 MACs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
import torch.fx

from passes.sites import Site, fetch_attr, has_side_effects, site_input


@dataclasses.dataclass
class SiteStatistics:
    """Streaming sums of a site's bias-free output ``y``.

    With row weights ``w`` the sums are ``Σ w y yᵀ`` and ``Σ w y`` and the moments
    are normalised by ``weight = Σ w``; rows of weight 0 (padding) add nothing to
    the moments but still count in ``rows``, which is the cost basis (a layer
    computes padded rows too). Without weights ``weight == rows``.

    How the sums are kept, and why: each batch's product ``Yᵀ Y`` is computed on
    the rows' own device in their precision (float32 for float32, bfloat16 or
    float16 activations; float64 stays float64), which is 2-3x faster than
    float64 on a CPU and keeps a GPU model's activations on the GPU; only the
    ``(channels, channels)`` result is added to float64 sums. The rows are first
    shifted by a fixed centre (the first batch's mean), so the float32 products
    see ``y − c`` and keep their precision on channels whose mean is large
    against their spread; :attr:`sum_outer` and :attr:`sum` undo the shift, in
    float64, on the CPU.

    Example:
        >>> s = SiteStatistics.empty(2)
        >>> s.update(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
        >>> s.second_moment()
        tensor([[1., 1.],
                [1., 2.]], dtype=torch.float64)
        >>> s.update(torch.tensor([[9.0, 9.0]]), weights=torch.tensor([0.0]))  # a padded row
        >>> s.rows, s.weight, bool((s.second_moment() == torch.tensor([[1., 1.], [1., 2.]])).all())
        (3, 2.0, True)
    """

    shifted_outer: torch.Tensor  # Σ w (y − c)(y − c)ᵀ, (out, out), float64
    shifted_sum: torch.Tensor  # Σ w (y − c), (out,), float64
    rows: int = 0  # number of output vectors seen, weighted or not (MACs are counted on these)
    samples: int = 0  # number of batch elements seen
    weight: float | None = None  # Σ w, the moments' denominator (None: equal to rows, i.e. unweighted)
    centre: torch.Tensor | None = None  # c, (out,), float64; None: zero (set by the first non-empty update)
    # E[g gᵀ] per sample of the final-output gradient at y (passes.sensitivity), when collected
    sensitivity: torch.Tensor | None = dataclasses.field(default=None, compare=False)
    # (statistics of x, W) when these are the statistics of y = W x (see through): an expanding layer's
    # spectrum is then cheaper to take from x's (in x in) moment than from y's (out x out)
    mapped_from: tuple["SiteStatistics", torch.Tensor] | None = dataclasses.field(default=None, compare=False,
                                                                                   repr=False)

    def __post_init__(self) -> None:
        if self.weight is None:
            self.weight = float(self.rows)

    @classmethod
    def empty(cls, channels: int) -> "SiteStatistics":
        return cls(torch.zeros(channels, channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64))

    @classmethod
    def from_sums(cls, sum_outer: torch.Tensor, total: torch.Tensor, rows: int, samples: int,
                  weight: float) -> "SiteStatistics":
        """Statistics from plain (unshifted) float64 sums ``Σ w y yᵀ`` and ``Σ w y``."""
        return cls(sum_outer.to(torch.float64), total.to(torch.float64), rows, samples, weight)

    def update(self, rows: torch.Tensor, samples: int | None = None, weights: torch.Tensor | None = None,
               product_dtype: torch.dtype | None = None) -> None:
        """Add a ``(n, channels)`` block of outputs, optionally with ``n`` non-negative row weights.

        ``product_dtype`` is the precision of the batch product ``Yᵀ Y``: by
        default float32 (float64 for float64 rows). float32 products carry a
        noise floor near 1e-7 of the largest variance, far below useful NSR
        thresholds; ask for ``torch.float64`` to resolve exact rank deficiency
        (thresholds under ~1e-6).

        Rows of weight 0 are dropped before the products, so a 0/1 mask gives
        exactly the sums of the kept rows (and costs nothing for the padding).
        Raises :class:`NonFiniteRowsError`, adding nothing, when a kept row holds
        NaN or Inf.
        """
        self.apply(self.contribution(rows, samples, weights, product_dtype))

    def contribution(self, rows: torch.Tensor, samples: int | None = None, weights: torch.Tensor | None = None,
                     product_dtype: torch.dtype | None = None) -> "PendingUpdate":
        """What :meth:`update` would add, computed but not added (:meth:`apply` adds it).

        Lets a caller add a whole batch's contributions to many statistics only
        once all of them were computed, so a failure or an interrupt in the
        middle of a batch adds nothing. The centre may be set here (the sums are
        then re-expressed exactly around it), which leaves them unchanged.
        """
        n = rows.shape[0]
        rows = rows.detach()
        if weights is not None:
            w = weights.detach().reshape(-1).to(device=rows.device, dtype=torch.float64)
            if w.numel() != n:
                raise ValueError(f"{w.numel()} row weights for {n} rows")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError("row weights must be finite and non-negative")
            keep = w != 0
            if not bool(keep.all()):
                rows, w = rows[keep], w[keep]
            if bool((w == 1).all()):
                weights = None  # a 0/1 mask: the plain sums of the kept rows
        if product_dtype is None:
            product_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
        rows = rows.to(product_dtype)
        if self.centre is None and rows.shape[0]:
            self._set_centre(rows.mean(0).to(torch.float64))
        centre = self.centre if self.centre is not None else torch.zeros(rows.shape[1], dtype=torch.float64)
        shifted = rows - centre.to(rows)
        weighted = shifted * w.to(rows)[:, None] if weights is not None else shifted
        outer = weighted.T @ shifted
        if not bool(torch.isfinite(outer.diagonal()).all()):  # y_i² on the diagonal: any NaN/Inf shows there
            if bool(torch.isfinite(shifted).all()):  # finite rows whose squares left the product's range
                raise StatisticsOverflowError(float(shifted.abs().max()), product_dtype)
            raise NonFiniteRowsError("NaN or Inf in the rows")
        return PendingUpdate(outer, weighted.sum(0), float(w.sum()) if weights is not None else rows.shape[0], n,
                             n if samples is None else samples, self.centre)

    def apply(self, pending: "PendingUpdate") -> None:
        """Add a :meth:`contribution` of these statistics."""
        if pending.centre is not self.centre:
            raise ValueError("this contribution was computed around another centre")
        self.shifted_outer += pending.outer.to(device=self.shifted_outer.device, dtype=torch.float64)
        self.shifted_sum += pending.shifted_sum.to(device=self.shifted_sum.device, dtype=torch.float64)
        self.weight += pending.weight
        self.rows += pending.rows
        self.samples += pending.samples

    def _set_centre(self, centre: torch.Tensor) -> None:
        """Move the sums to a new centre ``c'`` (exact algebra on the float64 sums)."""
        centre = centre.detach().to(device="cpu", dtype=torch.float64)
        old = self.centre if self.centre is not None else torch.zeros_like(centre)
        d = old - centre  # y − c' = (y − c) + d
        s1 = self.shifted_sum
        self.shifted_outer = self.shifted_outer + torch.outer(d, s1) + torch.outer(s1, d) + self.weight * torch.outer(d, d)
        self.shifted_sum = s1 + self.weight * d
        self.centre = centre

    @property
    def sum_outer(self) -> torch.Tensor:
        """``Σ w y yᵀ`` (float64, CPU)."""
        if self.centre is None:
            return self.shifted_outer.clone()
        c, s1 = self.centre, self.shifted_sum
        return self.shifted_outer + torch.outer(c, s1) + torch.outer(s1, c) + self.weight * torch.outer(c, c)

    @property
    def sum(self) -> torch.Tensor:
        """``Σ w y`` (float64, CPU)."""
        return self.shifted_sum.clone() if self.centre is None else self.shifted_sum + self.weight * self.centre

    def __add__(self, other: "SiteStatistics") -> "SiteStatistics":
        return SiteStatistics.from_sums(self.sum_outer + other.sum_outer, self.sum + other.sum, self.rows + other.rows,
                                        self.samples + other.samples, self.weight + other.weight)

    def through(self, weight: torch.Tensor) -> "SiteStatistics":
        """The statistics of ``W x`` given these of ``x`` (``weight``: ``(out, in)``, any float dtype; the
        products are taken in float64).

        The centre maps through too (``W y − W c = W (y − c)``), so the shifted sums stay well conditioned.
        An expanding ``W`` is kept as given (see :class:`ExpandedStatistics`): pass the layer's own weight,
        not a float64 copy, and no copy of it is held.
        """
        w = weight.to(torch.float64)
        centre = w @ self.centre if self.centre is not None else None
        if w.shape[0] > w.shape[1]:  # expanding: the (out, out) sums only when read (see ExpandedStatistics)
            return ExpandedStatistics(None, w @ self.shifted_sum, self.rows, self.samples, self.weight, centre,
                                      mapped_from=(self, weight))
        return SiteStatistics(w @ self.shifted_outer @ w.T, w @ self.shifted_sum, self.rows, self.samples,
                              self.weight, centre)

    def _denominator(self) -> float:
        return self.weight if self.weight > 0 else 1.0

    def second_moment(self) -> torch.Tensor:
        """``E[y yᵀ]`` over all rows seen (weighted)."""
        return self.sum_outer / self._denominator()

    def mean(self) -> torch.Tensor:
        return self.sum / self._denominator()

    def variance(self) -> torch.Tensor:
        """Per-channel (population) variance of ``y``; the bias does not change it."""
        return (self._sum_squares() / self._denominator() - self.mean() ** 2).clamp_min(0.0)

    def _sum_squares(self) -> torch.Tensor:
        """``Σ w y_c²`` per channel: the diagonal of :attr:`sum_outer` without forming it (an out x out matrix)."""
        squares = self.shifted_outer.diagonal()
        if self.centre is None:
            return squares.clone()
        c, s1 = self.centre, self.shifted_sum
        return squares + 2 * c * s1 + self.weight * c * c

    @property
    def rows_per_sample(self) -> float:
        """Rows per batch element, padding included: the cost basis of the layer's MACs."""
        return self.rows / max(self.samples, 1)


class ExpandedStatistics(SiteStatistics):
    """The statistics of ``y = W x`` for an expanding ``W`` (``out > in``), kept as those of ``x``.

    The ``(out, out)`` sums are computed from ``x``'s ``(in, in)`` ones each time
    they are read, never stored: on a LLaMA-7B MLP (4096 -> 11008) that is 0.97 GB
    of float64 per layer that the spectrum (``mapped_from``, a thin solve) and the
    per-channel variance (its diagonal, below) do without. ``W`` is held as the
    layer's own weight (its dtype and storage, converted to float64 when read), not
    as a float64 copy: 0.36 GB less per such layer there.

    Example:
        >>> x = SiteStatistics.empty(2); x.update(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
        >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y = x.through(w)
        >>> type(y).__name__, torch.allclose(y.variance(), y.second_moment().diagonal() - y.mean() ** 2)
        ('ExpandedStatistics', True)
    """

    @property  # type: ignore[override]
    def shifted_outer(self) -> torch.Tensor:
        source, weight = self.mapped_from
        weight = weight.to(torch.float64)
        return weight @ source.shifted_outer @ weight.T

    @shifted_outer.setter
    def shifted_outer(self, value: torch.Tensor | None) -> None:
        pass  # computed from the source's sums

    def variance(self) -> torch.Tensor:
        source, weight = self.mapped_from
        weight = weight.to(torch.float64)
        diagonal = ((weight @ source.second_moment()) * weight).sum(1)  # diag(W E[x xᵀ] Wᵀ), (out, in) at most
        return (diagonal - self.mean() ** 2).clamp_min(0.0)


@dataclasses.dataclass
class PendingUpdate:
    """One block of rows' addition to a :class:`SiteStatistics`, computed and not yet added.

    ``outer``/``shifted_sum`` are in the product's precision and on the rows' device, shifted by ``centre``.
    """

    outer: torch.Tensor
    shifted_sum: torch.Tensor
    weight: float
    rows: int
    samples: int
    centre: torch.Tensor | None


class NonFiniteRowsError(ValueError):
    """Rows given to :meth:`SiteStatistics.update` hold NaN or Inf (nothing was added)."""


class StatisticsOverflowError(NonFiniteRowsError):
    """Finite rows whose products overflow the product's precision (e.g. values near 1e20 in float32)."""

    def __init__(self, largest: float, dtype: torch.dtype) -> None:
        super().__init__(f"values up to {largest:.3g} overflow the {dtype} products of the statistics")
        self.largest, self.dtype = largest, dtype


class NonFiniteActivationError(ValueError):
    """A site produced NaN or Inf during calibration."""


class ActivationOverflowError(NonFiniteActivationError):
    """A site's activations are finite but their products overflow ``dtype`` (a float64 product would not)."""

    def __init__(self, message: str, dtype: torch.dtype) -> None:
        super().__init__(message)
        self.dtype = dtype


def output_rows(site: Site, y: torch.Tensor) -> torch.Tensor:
    """Reshape a site output to ``(rows, channels)``: channels last.

    A Conv2d output is ``(N, C, H, W)``, or ``(C, H, W)`` for an unbatched input (a model fed single images):
    its channels are dimension -3 in both. Dimension 1 of an unbatched output is the height, and taking it for
    the channels mixed pixels into each row (statistics of nothing the layer computes, so ranks whose reported
    NSR said 0.009 gave a model 99.8% wrong).

    Example:
        >>> site = Site("c", "conv2d", "c", "c.weight", None, (2, 1, 1, 1))
        >>> y = torch.arange(8.0).reshape(2, 2, 2)  # unbatched: 2 channels of 2x2 pixels
        >>> output_rows(site, y)[:, 0].tolist(), output_rows(site, y[None])[:, 0].tolist()
        ([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0])
    """
    if site.kind == "conv2d":
        y = y.movedim(-3, -1)
    return y.reshape(-1, site.out_features)


class LeadingDimWeights:
    """Row weights from a mask over the leading dimensions of Linear rows, e.g. an attention mask.

    A Linear site's input and output are ``(*lead, channels)``; when ``lead``
    starts with ``mask.shape`` (``(batch, tokens)`` for a text model), each row
    gets the mask value of its position. Other sites get no weights: Conv2d
    (its rows are output pixels) and Linears whose rows have other leading
    dimensions (e.g. a classifier after pooling, whose input is ``(batch,
    features)``). Pass an instance as ``row_weights`` of :class:`StatsInterpreter`;
    ``matched`` / ``unmatched`` record the sites (and row shapes) it was asked about.

    Example:
        >>> from passes.sites import find_sites
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 3)))
        >>> sites, _ = find_sites(gm)
        >>> mask = torch.tensor([[1, 1, 0], [1, 0, 0]])           # 2 sentences, 3 positions
        >>> weights = LeadingDimWeights(mask)
        >>> interp = StatsInterpreter(gm, sites, row_weights=weights)
        >>> _ = interp.run(torch.randn(2, 3, 4))
        >>> interp.statistics["0"].rows, interp.statistics["0"].weight, sorted(weights.matched)
        (6, 3.0, ['0'])
    """

    def __init__(self, mask: torch.Tensor) -> None:
        if mask.dim() == 0:
            raise ValueError("a row mask needs at least one dimension, e.g. (batch, tokens)")
        self.mask = mask.detach()
        self.matched: set[str] = set()  # site targets that were weighted
        self.unmatched: dict[str, tuple[int, ...]] = {}  # site target -> leading dims of its rows

    def __call__(self, site: Site, tensor: torch.Tensor) -> torch.Tensor | None:
        lead = tuple(tensor.shape[:-1]) if site.kind == "linear" else None
        dims = self.mask.dim()
        if lead is None or len(lead) < dims or lead[:dims] != tuple(self.mask.shape):
            self.unmatched[site.target] = tuple(tensor.shape)
            return None
        self.matched.add(site.target)
        m = self.mask.reshape(*self.mask.shape, *([1] * (len(lead) - dims)))
        return m.expand(lead).reshape(-1)


def weight_matrix(site: Site, weight: torch.Tensor, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """The site's weight as an ``(out, in)`` matrix (conv: ``in * kh * kw``) on the CPU, in float64 (``dtype=None``:
    its own dtype, a view of the parameter where it is on the CPU already)."""
    w = weight.detach().to(device="cpu", dtype=dtype)
    if site.weight_transposed:
        w = w.T
    return w.reshape(site.out_features, -1)


def input_side_groups(gm: torch.fx.GraphModule, sites: Iterable[Site]) -> dict[str, list[Site]]:
    """Group Linear sites by input node where an input-side sum is cheaper.

    A group of sites reading the same tensor costs ``in²`` per row on the input
    side against ``Σ out²`` on the output side. Layers called at several places
    stay on the output side (their per-call inputs differ).
    """
    sites = list(sites)
    calls: dict[str, int] = {}
    for s in sites:
        calls[s.target] = calls.get(s.target, 0) + 1
    nodes = {n.name: n for n in gm.graph.nodes}
    groups: dict[str, list[Site]] = {}
    for s in sites:
        x = site_input(nodes[s.node])
        # an input changed in place between its readers (x.relu_() after the first) is not one tensor for all
        changed = isinstance(x, torch.fx.Node) and any(has_side_effects(u) for u in x.users)
        if s.kind == "linear" and calls[s.target] == 1 and isinstance(x, torch.fx.Node) and not changed:
            groups.setdefault(x.name, []).append(s)
    return {name: group for name, group in groups.items()
            if group[0].in_features ** 2 < sum(s.out_features ** 2 for s in group)}


@dataclasses.dataclass
class ActivationStatistics:
    """All sums of one calibration: output moments per layer, input moments per shared input.

    Merge two by ``+`` (e.g. across processes); :meth:`per_site` gives every
    layer's output statistics, mapping input moments through the weights.
    """

    outputs: dict[str, SiteStatistics] = dataclasses.field(default_factory=dict)  # by site target
    inputs: dict[str, SiteStatistics] = dataclasses.field(default_factory=dict)  # by input node name

    def __add__(self, other: "ActivationStatistics") -> "ActivationStatistics":
        def merge(a: dict[str, SiteStatistics], b: dict[str, SiteStatistics]) -> dict[str, SiteStatistics]:
            return {k: a[k] + b[k] if k in a and k in b else a.get(k, b.get(k)) for k in {*a, *b}}

        return ActivationStatistics(merge(self.outputs, other.outputs), merge(self.inputs, other.inputs))

    def clear(self) -> None:
        self.outputs.clear()
        self.inputs.clear()

    def per_site(self, gm: torch.fx.GraphModule, sites: Iterable[Site]) -> dict[str, SiteStatistics]:
        """``{site target: SiteStatistics of its bias-free output}``."""
        result = dict(self.outputs)
        nodes = {n.name: n for n in gm.graph.nodes}
        for s in sites:
            x = site_input(nodes[s.node])
            if s.target not in result and isinstance(x, torch.fx.Node) and x.name in self.inputs:
                # the layer's own weight, not a float64 copy: an expanding layer's statistics hold it
                result[s.target] = self.inputs[x.name].through(weight_matrix(s, fetch_attr(gm, s.weight), None))
        return result


class StatsInterpreter(torch.fx.Interpreter):
    """Run a graph and accumulate the :class:`ActivationStatistics` of every site.

    Statistics are keyed by ``site.target``, so a layer called at several
    places of the graph accumulates into one entry. Pass ``collected`` to keep
    adding to the sums of earlier batches; ``input_side=False`` forces every
    layer to accumulate on its output.

    A run is all-or-nothing: each layer's contribution is computed as the
    graph runs and added to ``collected`` only when the whole forward pass has
    finished, so an error or a Ctrl-C in the middle of a batch adds nothing
    (the price: one batch's products, about half the size of the sums, are held
    until then). With ``defer_commit=True`` the caller adds them with
    :meth:`commit` (e.g. after other passes over the same batch succeeded).

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
        collected: ActivationStatistics | None = None,
        row_weights: Callable[[Site, torch.Tensor], torch.Tensor | None] | None = None,
        input_side: bool = True,
        product_dtype: torch.dtype | None = None,
        defer_commit: bool = False,
    ) -> None:
        super().__init__(gm)
        self.defer_commit = defer_commit
        # (container, key, statistics, contribution) of the batch being run, added by commit()
        self.pending: list[tuple[dict[str, SiteStatistics], str, SiteStatistics, PendingUpdate]] = []
        self.product_dtype = product_dtype  # of each batch's Yᵀ Y (SiteStatistics.update); None: float32
        self.all_sites = list(sites)
        self.input_groups = input_side_groups(gm, self.all_sites) if input_side else {}
        # input-side site node -> its input node's name
        self.node_by_name = {n.name: n for n in gm.graph.nodes}
        self.input_of = {s.node: name for name, group in self.input_groups.items() for s in group}
        on_input = set(self.input_of)
        self.sites = {s.node: s for s in self.all_sites}
        self.output_sites = {s.node: s for s in self.all_sites if s.node not in on_input}
        self.biases = {s.node: fetch_attr(gm, s.bias).detach() if s.bias else None for s in self.output_sites.values()}
        self.collected = collected if collected is not None else ActivationStatistics()
        self.row_weights = row_weights
        self.batch_index = 0
        # the batch's number of samples (the model input's leading dimension), set by the caller for each batch; None:
        # each layer's own leading dimension, which over-counts samples where a layer sees rows flattened across the
        # batch and tokens (GPT-2's Conv1D: ``addmm`` on ``(batch * tokens, in)``) and so under-counts its MACs
        self.samples: int | None = None
        self.current_node: torch.fx.Node | None = None  # the node that was running when an error escaped
        self._inputs_seen: set[str] = set()
        self._targets_seen: set[str] = set()  # layers that counted this batch's samples (a layer called twice: once)

    @property
    def statistics(self) -> dict[str, SiteStatistics]:
        """Output statistics of every site seen so far."""
        return self.collected.per_site(self.module, self.all_sites)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.start_batch()
        out = super().run(*args, **kwargs)
        if not self.defer_commit:
            self.commit()
        return out

    def commit(self) -> None:
        """Add the finished batch's contributions to ``collected`` (new layers' statistics included)."""
        for container, key, stats, contribution in self.pending:
            container.setdefault(key, stats).apply(contribution)
        self.pending = []

    def _statistics(self, container: dict[str, SiteStatistics], key: str, channels: int) -> SiteStatistics:
        """The statistics a contribution goes to: the collected ones, this batch's new ones, or new ones."""
        found = container.get(key)
        if found is None:
            found = next((stats for c, k, stats, _ in self.pending if c is container and k == key), None)
        return found if found is not None else SiteStatistics.empty(channels)

    def run_node(self, n: torch.fx.Node) -> Any:
        self.current_node = n
        out = super().run_node(n)
        self.observe(n, out)
        return out

    def start_batch(self) -> None:
        """Begin a batch run node by node by someone else (``passes.blocks.BlockRun``), observed by :meth:`observe`;
        :meth:`commit` adds it."""
        self._inputs_seen = set()
        self._targets_seen = set()
        self.pending = []

    def observe(self, n: torch.fx.Node, out: Any) -> None:
        """Stage the statistics of node ``n``'s value ``out`` if it is a site (its input read from ``self.env``)."""
        site = self.sites.get(n.name)
        if site is None:
            return
        if site.node in self.output_sites:
            self._accumulate(site, out)
            return
        # The input is counted once per call, when the first layer reading it has run (so the
        # layer itself, or the graph's shape guards, report a malformed input first).
        name = self.input_of[site.node]
        if name not in self._inputs_seen:
            self._inputs_seen.add(name)
            self._accumulate_input(name, self.input_groups[name], self.env[self.node_by_name[name]])

    def _update(self, container: dict[str, SiteStatistics], key: str, site: Site, rows: torch.Tensor, samples: int,
                weights: torch.Tensor | None) -> None:
        """Stage rows for ``container[key]``; NaN/Inf rows raise an error naming ``site`` and the batch.

        The check comes with the products (a NaN or Inf row makes the diagonal of
        ``Yᵀ Y`` non-finite), so finite activations cost no separate pass.
        Rows of weight 0 (padding) are not checked: they add nothing.
        """
        stats = self._statistics(container, key, rows.shape[-1])
        try:
            contribution = stats.contribution(rows, samples=samples, weights=weights, product_dtype=self.product_dtype)
        except StatisticsOverflowError as exc:
            raise ActivationOverflowError(
                f"the statistics of site {site.target!r} (node {site.node}) overflowed on calibration batch "
                f"{self.batch_index}: its activations are finite but reach {exc.largest:.3g}, whose squares exceed "
                f"{exc.dtype}'s range", exc.dtype) from None
        except NonFiniteRowsError:
            raise NonFiniteActivationError(
                f"site {site.target!r} (node {site.node}) produced NaN/Inf on calibration batch {self.batch_index}; "
                "check the inputs of that batch or skip the layer with skip=[...]"
            ) from None
        self.pending.append((container, key, stats, contribution))

    def _accumulate_input(self, name: str, group: list[Site], x: torch.Tensor) -> None:
        x = x.detach()
        weights = self.row_weights(group[0], x) if self.row_weights is not None else None
        samples = self.samples if self.samples is not None else x.shape[0]
        self._update(self.collected.inputs, name, group[0], x.reshape(-1, group[0].in_features), samples, weights)

    def _accumulate(self, site: Site, out: torch.Tensor) -> None:
        y = out.detach()
        bias = self.biases[site.node]
        if bias is not None:
            y = y - (bias.reshape(-1, 1, 1) if site.kind == "conv2d" else bias)
        weights = self.row_weights(site, y) if self.row_weights is not None else None
        # a batch's samples count once per layer: a layer called twice computes twice the rows per sample (its MACs)
        samples = 0 if site.target in self._targets_seen else self.samples if self.samples is not None else y.shape[0]
        self._targets_seen.add(site.target)
        self._update(self.collected.outputs, site.target, site, output_rows(site, y), samples, weights)
