"""The maths every data-aware method shares (see DESIGN.md).

With ``M = E[y yᵀ] = U Λ Uᵀ`` the second moment of a site's bias-free output
(eigenvalues descending), the rank-k map minimising ``E‖W x − W' x‖²`` is the
projection ``W_k = U_k U_kᵀ W`` with factors ``A = U_kᵀ W`` and ``B = U_k``. Its
per-channel output error is ``e_c(k) = Σ_{j>k} λ_j U[c, j]²``, so the
noise-to-signal ratio of every rank follows from one eigen-decomposition,
without running the model.

Centring (our addition; ptdeco only centres the eigenvectors): decomposing the
covariance ``C = M − μμᵀ`` instead and folding the mean of the discarded
directions into the bias, ``b' = b + (I − U_k U_kᵀ) μ``, gives the best rank-k
*affine* approximation. Its error ``(I − P)(y − μ)`` is never larger than the
uncentred one, ``(I − P) y``, for the same projection; the closed-form NSR
is the same formula on the spectrum of ``C``.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from fxdeco.methods.base import NSR_EPSILON
from passes import Site, SiteStatistics
from passes.stats import weight_matrix


@dataclasses.dataclass
class Spectrum:
    """Eigen-decomposition of a site's output second moment (float64)."""

    eigenvalues: torch.Tensor  # (k,), descending, >= 0
    # (out, k), columns match eigenvalues; k = out, or k = in < out for an expanding layer (thin: the
    # eigenvalues of the directions left out are 0)
    eigenvectors: torch.Tensor
    variance: torch.Tensor  # (out,), per-channel variance of the output
    mean: torch.Tensor | None = None  # (out,), set when the spectrum is of the covariance
    # the number of leading directions kept by truncated(), None when all are (only complete spectra give the error
    # curves: their tails need every direction)
    kept: int | None = None

    def truncated(self, rank: int) -> "Spectrum":
        """The first ``rank`` directions only, in new storage (the rest is freed): all that factors, centred biases and
        output projections up to ``rank`` read, at a fraction of the memory (a 4096-wide layer's eigenvectors are
        0.13 GB of float64, and a layer that saves parameters has a rank below half its width).

        Example:
            >>> s = SiteStatistics.empty(3); s.update(torch.tensor([[3.0, 0.0, 1.0], [0.0, 1.0, 2.0]]))
            >>> spectrum(s).truncated(1).eigenvectors.shape
            torch.Size([3, 1])
        """
        if rank >= self.eigenvectors.shape[1]:
            return self
        return dataclasses.replace(self, eigenvalues=self.eigenvalues[:rank].clone(),
                                   eigenvectors=self.eigenvectors[:, :rank].clone(), kept=rank)

    def check_complete(self) -> None:
        if self.kept is not None:
            raise ValueError(f"the error curves need the whole spectrum; this one was truncated to {self.kept} "
                             "directions (compute the curves before truncating)")


def spectrum(stats: SiteStatistics, damping: float = 0.0, center: bool = False) -> Spectrum:
    """Eigen-decompose ``E[y yᵀ]`` (or the covariance when ``center``).

    ``damping`` adds ``damping * mean(diag)`` to the diagonal.

    Damping only steadies the eigen-solver on near-singular moments: a
    multiple of the identity leaves the eigenvectors unchanged, and it is
    subtracted again from the eigenvalues.

    Example:
        >>> s = SiteStatistics.empty(2); s.update(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
        >>> spectrum(s).eigenvalues
        tensor([4.5000, 0.5000], dtype=torch.float64)
    """
    if stats.mapped_from is not None and stats.mapped_from[1].shape[0] > stats.mapped_from[1].shape[1]:
        return _mapped_spectrum(stats, center)
    m = stats.second_moment()  # new storage: changed in place below (one out x out matrix, not three)
    mean = stats.mean() if center else None
    if mean is not None:
        m.sub_(torch.outer(mean, mean))
    shift = damping * float(m.diagonal().mean()) if damping > 0 else 0.0
    if shift:
        m.diagonal().add_(shift)
    values, vectors = torch.linalg.eigh(m)
    del m
    values = (values.flip(0) - shift).clamp_min(0.0)
    return Spectrum(values, vectors.flip(1), stats.variance(), mean)


def _mapped_spectrum(stats: SiteStatistics, center: bool) -> Spectrum:
    """The spectrum of ``y = W x`` for an expanding layer (``out > in``), from the moment of ``x``.

    ``E[y yᵀ] = W M_x Wᵀ`` has rank at most ``in``. With ``M_x = V Λ Vᵀ``, the
    left singular vectors of ``W V Λ^½`` (``out x in``) are its eigenvectors
    with non-zero eigenvalues, the squared singular values: an ``in x in``
    eigen-decomposition and a thin SVD instead of an ``out x out``
    eigen-decomposition (BERT's 384 -> 1536 layer: about 7x less time). The
    spectrum is thin (``in`` eigenvectors); the other ``out − in`` eigenvalues are 0.
    """
    source, weight = stats.mapped_from
    values, vectors = _source_eigh(source, center)
    root = vectors * values.clamp_min(0.0).sqrt()
    left, squares = _thin_left_singular(weight.to(root) @ root)
    return Spectrum(squares, left, stats.variance(), stats.mean() if center else None)


# Squared singular values below this fraction of the largest are dropped by _thin_left_singular: their vectors,
# computed through the Gram matrix, are not orthogonal enough to the others (see there).
THIN_NOISE_FLOOR = 1e-10


def _thin_left_singular(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and squared singular values of a tall ``z`` (``out x in``, ``out > in``), descending.

    From the ``in x in`` Gram matrix ``zᵀz = R Σ² Rᵀ`` and ``U = z R Σ⁻¹``: an eigen-solve and two products
    instead of a thin SVD, about 3x faster on a LLaMA MLP (11008 x 4096: 91 s for the SVD on 2 cores). Squaring
    costs the accuracy of the small ones: a column ``z r / σ`` whose squared singular value is ``ρ`` times the
    largest is orthogonal to the others only to about ``1e-8 / sqrt(ρ)`` (float64; measured: 7e-5 at ``ρ = 1e-8``,
    2e-3 at 1e-12, 0.35 at 2e-14). Normalised, such a column lies partly along the leading directions, so
    ``U_k U_kᵀ`` is no projection at a rank that keeps it (a rank rounded up, ``min_rank``, a budget): an input
    with constant features made a layer wrong by 54%. Columns below :data:`THIN_NOISE_FLOOR` of the largest
    squared singular value are therefore zero and their squares 0: each carries at most that fraction of the
    output's energy, and every rank stays a projection (overlaps under about 1e-3).
    """
    squares, right = torch.linalg.eigh(z.T @ z)
    squares, right = squares.flip(0).clamp_min(0.0), right.flip(1)
    left = z @ right
    left /= left.norm(dim=0).clamp_min(torch.finfo(left.dtype).tiny)  # in place: an (out, in) float64 less
    if squares.numel():
        noise = squares <= float(squares[0]) * THIN_NOISE_FLOOR
        left[:, noise] = 0.0
        squares[noise] = 0.0
    return left, squares


# The last input moment decomposed by _source_eigh: (a weak reference to its statistics, their size, the result)
_last_source: tuple[weakref.ref, tuple, tuple[torch.Tensor, torch.Tensor]] | None = None


def _forget(ref: weakref.ref) -> None:
    """Drop the kept decomposition once its statistics are gone (a sequential walk's block: an in x in matrix)."""
    global _last_source
    if _last_source is not None and _last_source[0] is ref:
        _last_source = None


def _source_eigh(source: SiteStatistics, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigen-decomposition of an input moment, solved once for consecutive expanding layers reading that input
    (a LLaMA MLP's gate and up projections). Only the last one is kept (one matrix, not one per input), and only
    while no batch was added to the statistics."""
    global _last_source
    key = (source.rows, source.weight, center)
    if _last_source is not None and _last_source[0]() is source and _last_source[1] == key:
        return _last_source[2]
    m = source.second_moment()
    if center:
        m = m - torch.outer(source.mean(), source.mean())
    values, vectors = torch.linalg.eigh(m)
    _last_source = (weakref.ref(source, _forget), key, (values, vectors))  # dropped with the statistics
    return values, vectors


def _pad_ranks(curve: torch.Tensor, spec: Spectrum) -> torch.Tensor:
    """Extend a per-rank curve of a thin spectrum to ranks ``0..out`` (the missing directions carry nothing)."""
    missing = spec.eigenvectors.shape[0] + 1 - curve.shape[-1]
    return torch.nn.functional.pad(curve, (0, missing)) if missing > 0 else curve


def nsr_by_rank(spec: Spectrum, epsilon: float = NSR_EPSILON) -> torch.Tensor:
    """Layer-output NSR for every rank ``k = 0..out`` (index k), in closed form.

    ``nsr(k) = mean_c e_c(k) / (var_c + epsilon)`` — ptdeco's per-channel
    definition applied to the rank-k projection. Summed over channels first,
    ``nsr(k) = Σ_{j>k} λ_j w_j / out`` with ``w_j = Σ_c U[c, j]² / (var_c + epsilon)``:
    a vector per direction, never an ``out x k`` table (columns are taken in
    chunks, so the working memory stays small on 4096-wide layers).
    """
    spec.check_complete()
    u = spec.eigenvectors
    inverse = 1.0 / (spec.variance + epsilon)
    weights = torch.cat([inverse @ chunk.square() for chunk in u.split(_CHUNK, dim=1)]) * spec.eigenvalues
    tail = weights.flip(0).cumsum(0).flip(0) / u.shape[0]  # [k] = Σ_{j>=k} λ_j w_j / out
    return _pad_ranks(torch.cat([tail, tail.new_zeros(1)]), spec)


# Columns of the eigenvectors squared at once by nsr_by_rank (bounds its working memory to out x _CHUNK).
_CHUNK = 512


def projection_factors(site: Site, weight: torch.Tensor, spec: Spectrum, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(A, B)`` of the rank-``rank`` projection, shaped for the rewrite pass."""
    basis = spec.eigenvectors[:, :rank]
    first = basis.T @ weight_matrix(site, weight)
    if site.kind == "conv2d":
        first = first.reshape(rank, *site.weight_shape[1:])
    return first, basis


def centred_bias(spec: Spectrum, bias: torch.Tensor | None, rank: int) -> torch.Tensor | None:
    """``b + (I − U_k U_kᵀ) μ``: the bias that keeps the mean of the discarded directions.

    ``None`` when the spectrum is not centred (the layer's own bias is kept).
    """
    if spec.mean is None:
        return None
    basis = spec.eigenvectors[:, :rank]
    residual_mean = spec.mean - basis @ (basis.T @ spec.mean)
    if bias is None:
        return residual_mean
    return bias.detach().to(device=residual_mean.device, dtype=torch.float64).reshape(-1) + residual_mean


def output_error_by_rank(spec: Spectrum, sensitivity: torch.Tensor) -> torch.Tensor:
    """Predicted final-output error for every rank ``k = 0..out`` (index k).

    With the output-gradient moment ``G`` of the site (``passes.sensitivity``),
    dropping the directions ``j > k`` of the spectrum changes the final output by
    ``tr(G Σ_{j>k} λ_j u_j u_jᵀ) = Σ_{j>k} λ_j u_jᵀ G u_j`` (to first order).

    Example:
        >>> s = SiteStatistics.empty(2); s.update(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
        >>> output_error_by_rank(spectrum(s), torch.eye(2, dtype=torch.float64))  # G = I: the tail of λ
        tensor([5.0000, 0.5000, 0.0000], dtype=torch.float64)
    """
    spec.check_complete()
    u = spec.eigenvectors
    weights = spec.eigenvalues * ((sensitivity.to(u.dtype) @ u) * u).sum(0)
    tail = weights.flip(0).cumsum(0).flip(0)
    return _pad_ranks(torch.cat([tail, tail.new_zeros(1)]), spec)


def output_projection(site: Site, spec: Spectrum, bias: torch.Tensor | None, rank: int):
    """``y -> U_k U_kᵀ (y − b) + b'``: the rank-``rank`` factored layer's output, from the dense layer's output
    ``y`` (channels last for Linear, channels at dimension 1 for Conv2d). ``b'`` is the centred bias
    (:func:`centred_bias`) when the spectrum is centred, else the layer's own bias.

    What final-output probes substitute for a layer's output in a replay (falor's final-output mode, its
    budget rounds, dwain's Conv2d layers).

    Example:
        >>> s = SiteStatistics.empty(2); s.update(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
        >>> site = Site("n", "linear", "t", "t.weight", None, (2, 2))
        >>> output_projection(site, spectrum(s), None, 1)(torch.tensor([[1.0, 1.0]]))  # keeps the first direction
        tensor([[1., 0.]])
    """
    basis = spec.eigenvectors[:, :rank]
    new_bias = centred_bias(spec, bias, rank)
    if new_bias is None and bias is not None:
        new_bias = bias.detach().to(torch.float64).reshape(-1)
    conv = site.kind == "conv2d"

    def project(y: torch.Tensor) -> torch.Tensor:
        rows = y.movedim(-3, -1) if conv else y  # channels are dim -3 of (N, C, H, W) and of unbatched (C, H, W)
        b = bias.reshape(-1).to(rows) if bias is not None else 0
        p = basis.to(rows)
        out = ((rows - b) @ p) @ p.T
        if new_bias is not None:
            out = out + new_bias.to(rows)
        return out.movedim(-1, -3) if conv else out

    return project
