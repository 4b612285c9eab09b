"""Calibration on several processes: every statistic and every measured decision summed over torch.distributed.

Each process (a *rank*) calibrates on its own shard of the data; before any
decision, :func:`fxdeco.convert` (and :func:`fxdeco.transform`) all-reduce what
the ranks collected, so every rank makes the same plan:

* the activation statistics (:class:`passes.stats.ActivationStatistics`, outputs and
  shared inputs), re-expressed around one common centre and summed in float64
  (:func:`all_reduce_statistics`), the output-gradient moments and the number
  of calibration batches;
* every error a method *measures* on its kept batches (falor's budget rounds and
  final-output probes, dwain's ``ppl_diff`` and final NSR): each rank measures on
  its own kept batches and the sums and counts are all-reduced before the mean is
  compared with a threshold (:func:`means`, :func:`all_sum_tensors`);
* measured latency (``keep_latency``, ``acceptance="faster"``) is the one thing
  that is not a sum: rank 0 times and broadcasts its times (:func:`on_rank0`), so
  the plan is timed once, on rank 0's device, and the ranks do not disturb each
  other's timings on a shared machine.

Before anything is summed, every rank's model is compared (:func:`check_same_model`):
its layers, parameter count, an exact checksum of every parameter and buffer
(:func:`weight_checksum`) and, in sequential mode, its blocks; summing the
statistics of two different models (only rank 0 loaded the checkpoint) would
give each rank another model without any error. After planning, every rank's
plan digest (the rank of every layer) is gathered and compared
(:func:`check_same_plan`): ranks that would write different models raise
:class:`DistributedError` instead.

Which group: ``fxdeco.convert(prepared, ..., process_group=...)`` and
``fxdeco.transform(..., process_group=...)`` take ``None`` (the default: the
default group when ``torch.distributed`` is initialised with more than one
process, else no reduction), a ``ProcessGroup`` (that group, even of one
process), or ``False`` (no reduction: each process plans from its own data).
Helpers here act on the group of the running convert (:func:`reducing`) and do
nothing outside one, so the methods call them unconditionally.

Works with gloo (tensors on the CPU) and NCCL (tensors moved to the current CUDA
device; call ``torch.cuda.set_device(local_rank)`` first, as usual with NCCL).

Example (one process; :func:`shard` is what each rank keeps of a list of batches):
    >>> shard(list(range(7)), rank=1, world=3)
    [1, 4]
    >>> means([(3.0, 2.0)])   # outside a reducing convert: the local mean
    [1.5]
    >>> weight_checksum(torch.tensor([1.0, -2.0])) == weight_checksum(torch.tensor([1.0, -2.0]))
    True
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import itertools
import logging
import math
import pickle
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import torch

from passes.stats import ActivationStatistics, SiteStatistics

if TYPE_CHECKING:
    from fxdeco.plan import LayerDecision
    from fxdeco.prepared import PreparedModel

log = logging.getLogger(__name__)

T = TypeVar("T")

# Largest number of float64 elements all-reduced at once (128 MB): statistics are packed into buckets of about
# this size, so a model with many small layers costs few collectives and one with huge layers no huge buffer.
BUCKET_ELEMENTS = 1 << 24

# Elements of one tensor a weight checksum sums at once: each chunk is widened to int64 (2 MB, in cache: several
# times faster than widening a whole matrix), so checking a large embedding never copies the whole of it.
CHECKSUM_ELEMENTS = 1 << 18

# One parameter or buffer as the ranks compare it: (name, dtype, shape, weight_checksum).
WeightEntry = tuple[str, str, tuple[int, ...], int | None]


class DistributedError(RuntimeError):
    """The ranks of a process group disagree (other models, other options, different plans), or rank 0 failed
    in a step the other ranks waited for."""


@dataclasses.dataclass(frozen=True)
class Collective:
    """A process group as fxdeco uses it: this process's rank, the group's size, and where its tensors go.

    ``group`` is None for the default group. ``device`` is the CPU for gloo and
    the current CUDA device for NCCL.
    """

    group: Any
    rank: int
    world: int
    device: torch.device

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The float64 sum of ``tensor`` over the ranks (every rank passes one of the same shape), on the CPU."""
        import torch.distributed as dist

        buffer = tensor.detach().to(device=self.device, dtype=torch.float64).contiguous()
        if buffer is tensor:  # all_reduce works in place: never on the caller's tensor
            buffer = buffer.clone()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        return buffer.cpu()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (the others pass anything, e.g. None)."""
        import torch.distributed as dist

        source = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        box = [obj]
        dist.broadcast_object_list(box, src=source, group=self.group)
        return box[0]


def _device_of(group: Any) -> torch.device:
    """Where the group's collectives take tensors: the current CUDA device for NCCL, else the CPU."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective(process_group: Any = None) -> Collective | None:
    """The :class:`Collective` that ``process_group`` (as :func:`fxdeco.convert` takes it) stands for, or None.

    ``None``: the default group if ``torch.distributed`` is initialised with more
    than one process, else None (one process: nothing to reduce). ``False``: None.
    A ``ProcessGroup``: that group (even of size 1; this process must belong to it).

    Example:
        >>> collective(False) is None, collective(None) is None   # not initialised here
        (True, True)
    """
    if process_group is False:
        return None
    if isinstance(process_group, Collective):
        return process_group
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch built without distributed support
        dist = None  # type: ignore[assignment]
    available = dist is not None and dist.is_available()
    if process_group is None:
        if not available or not dist.is_initialized() or dist.get_world_size() <= 1:
            return None
        group = None
    elif process_group is True:
        if not available or not dist.is_initialized():
            raise DistributedError("process_group=True needs an initialised torch.distributed: call "
                                   "torch.distributed.init_process_group(...) first (torchrun sets its environment)")
        group = None
    else:
        if not available or not dist.is_initialized():
            raise DistributedError("process_group= was given, but torch.distributed is not initialised: call "
                                   "torch.distributed.init_process_group(...) first")
        group = process_group
    rank = dist.get_rank(group)
    if rank < 0:
        raise DistributedError("this process is not a member of the process_group given to fxdeco")
    return Collective(group, rank, dist.get_world_size(group), _device_of(group))


_ACTIVE: contextvars.ContextVar[Collective | None] = contextvars.ContextVar("fxdeco_collective", default=None)


@contextlib.contextmanager
def reducing(group: Collective | None) -> Iterator[Collective | None]:
    """Within the block, the helpers of this module reduce over ``group`` (None: they act locally).

    :func:`fxdeco.convert` runs its method inside this block.

    Example:
        >>> with reducing(None):
        ...     world()
        1
    """
    token = _ACTIVE.set(group)
    try:
        yield group
    finally:
        _ACTIVE.reset(token)


def current() -> Collective | None:
    """The group of the running convert, or None (one process, or inside a rank-0-only step)."""
    return _ACTIVE.get()


def world() -> int:
    """The number of ranks the running convert reduces over (1 outside one)."""
    active = current()
    return active.world if active is not None else 1


def rank() -> int:
    """This process's rank in the running convert's group (0 outside one)."""
    active = current()
    return active.rank if active is not None else 0


def all_sum(values: Sequence[float]) -> list[float]:
    """``values`` summed element-wise over the ranks in float64 (unchanged outside a reducing convert).

    Example:
        >>> all_sum([1.0, 2.5])
        [1.0, 2.5]
    """
    active = current()
    if active is None:
        return [float(v) for v in values]
    return active.sum(torch.tensor([float(v) for v in values], dtype=torch.float64)).tolist()


def means(pairs: Sequence[tuple[float, float]]) -> list[float]:
    """Means from ``(sum, count)`` pairs, the sums and counts first added over the ranks.

    Each rank passes the sum of what it measured on its own kept batches and
    how many it measured; the result is the mean over every rank's batches,
    the same on every rank. A count of 0 overall gives NaN. Outside a reducing
    convert this is ``sum / count`` exactly.

    Example:
        >>> means([(3.0, 2.0), (0.0, 0.0)])
        [1.5, nan]
    """
    totals = all_sum([v for pair in pairs for v in pair])
    return [s / c if c else math.nan for s, c in zip(totals[0::2], totals[1::2])]


def all_sum_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` summed over the ranks (float64 sums; each tensor keeps its dtype and device).

    Ranks may hold different keys: the union is agreed first, a rank without a
    key adds zeros. Keys present on several ranks must have the same shape.
    Unchanged outside a reducing convert.

    Example:
        >>> all_sum_tensors({"fc": torch.ones(2)})["fc"]
        tensor([1., 1.])
    """
    active = current()
    if active is None:
        return dict(tensors)
    shapes = _agreed_shapes(active, {k: tuple(t.shape) for k, t in tensors.items()}, "tensors")
    summed = _sum_packed(active, [(k, tensors.get(k), shapes[k]) for k in sorted(shapes)])
    return {k: summed[k].to(dtype=tensors[k].dtype, device=tensors[k].device) if k in tensors else summed[k]
            for k in sorted(shapes)}


def _agreed_shapes(active: Collective, local: dict[str, tuple[int, ...]], what: str) -> dict[str, tuple[int, ...]]:
    """The union of every rank's ``{key: shape}``; a key with two shapes is an error on every rank."""
    shapes: dict[str, tuple[int, ...]] = {}
    for r, theirs in enumerate(active.gather(local)):
        for key, shape in theirs.items():
            if shapes.setdefault(key, tuple(shape)) != tuple(shape):
                raise DistributedError(f"the ranks hold {what} of different shapes for {key!r} ({shapes[key]} and "
                                       f"{tuple(shape)} on rank {r}): every rank must prepare the same model")
    return shapes


def _sum_packed(active: Collective, items: Sequence[tuple[str, torch.Tensor | None, tuple[int, ...]]]
                ) -> dict[str, torch.Tensor]:
    """Sum ``(key, tensor or None for zeros, shape)`` items over the ranks, packed into few collectives."""
    result: dict[str, torch.Tensor] = {}
    bucket: list[tuple[str, torch.Tensor | None, tuple[int, ...]]] = []
    size = 0

    def flush() -> None:
        nonlocal bucket, size
        if not bucket:
            return
        flat = torch.cat([(t.detach().to(device="cpu", dtype=torch.float64).reshape(-1) if t is not None
                           else torch.zeros(math.prod(shape), dtype=torch.float64)) for _, t, shape in bucket])
        summed = active.sum(flat)
        offset = 0
        for key, _, shape in bucket:
            n = math.prod(shape)
            result[key] = summed[offset: offset + n].reshape(shape)
            offset += n
        bucket, size = [], 0

    for item in items:
        n = math.prod(item[2])
        if size and size + n > BUCKET_ELEMENTS:
            flush()
        bucket.append(item)
        size += n
    flush()
    return result


def on_rank0(fn: Callable[[], T], what: str, share: Callable[[T], Any] | None = None) -> T:
    """Run ``fn`` on rank 0 only and give every rank its result (outside a reducing convert: ``fn()``).

    For measurements that differ between machines and must not be averaged
    (latency): every rank uses rank 0's. ``share(result)`` is what is sent to
    the other ranks (default: the result itself; it must pickle); rank 0 keeps
    ``result``. Inside ``fn`` the helpers of this module act locally. An
    exception in ``fn`` is raised on every rank (on the others as the same
    exception when it pickles, else as :class:`DistributedError` naming ``what``).

    Example:
        >>> on_rank0(lambda: 41 + 1, "the answer")
        42
    """
    active = current()
    if active is None:
        return fn()
    if active.rank == 0:
        token = _ACTIVE.set(None)
        try:
            value = fn()
        except Exception as exc:
            _ACTIVE.reset(token)
            active.broadcast(("error", _picklable_error(exc, what)))
            raise
        _ACTIVE.reset(token)
        active.broadcast(("ok", share(value) if share is not None else value))
        return value
    status, payload = active.broadcast(None)
    if status == "error":
        raise payload
    return payload


def agree(failure: Exception | None, what: str, group: Collective | None = None) -> None:
    """Tell every rank whether each one succeeded at ``what`` (a local step, before the first collective that
    would otherwise wait for a rank that stopped): raise :class:`DistributedError` naming the first rank that
    failed, on the ranks that did not (the one that failed raises its own error after this). One gather of a
    short string per rank; nothing outside a process group (``group`` default: the current one).

    Example:
        >>> agree(None, "reading its calibration loader")   # one process: nothing to tell
    """
    active = group if group is not None else current()
    if active is None:
        return
    told = active.gather(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        return  # the caller raises its own error
    for r, message in enumerate(told):
        if message is not None:
            raise DistributedError(f"rank {r} failed {what} ({message}); every rank stops here")


@contextlib.contextmanager
def agreeing(what: str | Callable[[], str], group: Collective | None = None) -> Iterator[None]:
    """Run the block, then :func:`agree` on whether it succeeded on every rank (``group`` default: the current
    one; nothing outside a process group). ``what`` names the step (a callable: read when the block ends).

    For a local step before a collective (a block's calibration before its
    statistics are summed): a rank that fails in it tells the others, which
    raise :class:`DistributedError` naming it, instead of waiting for it in the
    collective. A :class:`DistributedError` raised in the block came from a
    collective, so every rank already raised it: nothing more is gathered.

    Example:
        >>> with agreeing("calibrating block 'layers.0'"):   # one process: just the block
        ...     pass
    """
    active = group if group is not None else current()
    if active is None:
        yield
        return
    try:
        yield
    except DistributedError:
        raise
    except Exception as exc:
        agree(exc, what() if callable(what) else what, active)
        raise
    agree(None, what() if callable(what) else what, active)


def _picklable_error(exc: Exception, what: str) -> Exception:
    """``exc`` if it survives pickling, else a :class:`DistributedError` with its message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return DistributedError(f"{what} failed on rank 0: {type(exc).__name__}: {exc}")


# ----------------------------------------------------------------------------- statistics


def weight_checksum(tensor: torch.Tensor) -> int | None:
    """An exact checksum of ``tensor``'s values: its bytes read as integers and summed in int64, chunk by chunk.

    Integer sums are exact and do not depend on the order of the additions, so
    the same values give the same checksum on every rank and device (a float
    sum may round differently on two devices, and identical weights must never
    differ). Each chunk's sum is weighted by its position, so values moved
    between chunks change it too. One pass over the tensor, no copy of it (only
    one chunk is widened at a time). None for a tensor whose values cannot be
    read this way (meta, sparse, quantized): its name, dtype and shape are still
    compared.

    Example:
        >>> weight_checksum(torch.tensor([1.0, 2.0])) == weight_checksum(torch.tensor([2.0, 1.0]))
        True
        >>> weight_checksum(torch.tensor([1.0, 2.0])) == weight_checksum(torch.tensor([1.0, 2.5]))
        False
    """
    if tensor.is_meta or tensor.layout != torch.strided or tensor.is_quantized:
        return None
    flat = tensor.detach().reshape(-1)  # the values in logical order, whatever the strides
    size = flat.element_size()
    flat = flat.view(torch.int8 if size == 1 else torch.int16 if size == 2 else torch.int32)  # int32: no overflow
    chunks = [flat[begin: begin + CHECKSUM_ELEMENTS].sum(dtype=torch.int64)
              for begin in range(0, flat.numel(), CHECKSUM_ELEMENTS)]
    if not chunks:
        return 0
    # one transfer per tensor (on a GPU: one synchronisation); Python integers: the weighted sum cannot overflow
    return sum((index + 1) * value for index, value in enumerate(torch.stack(chunks).tolist()))


def _weights(gm: torch.nn.Module) -> list[WeightEntry]:
    """``[(name, dtype, shape, checksum)]`` of every parameter and buffer of ``gm``, in registration order."""
    tensors = itertools.chain(gm.named_parameters(), gm.named_buffers())
    return [(name, str(t.dtype), tuple(t.shape), weight_checksum(t)) for name, t in tensors]


def _model_summary(prepared: PreparedModel, blocks: Sequence[Any] | Exception = ()) -> dict[str, Any]:
    """What every rank must share before anything is summed: the layers, their weights and (sequential) blocks,
    or the error finding the blocks raised (a string)."""
    return {
        "sites": sorted({s.target for s in prepared.sites}),
        "params": prepared.params_original,
        "blocks": f"{type(blocks).__name__}: {blocks}" if isinstance(blocks, Exception)
        else [(b.name, tuple(b.sites)) for b in blocks],
        "weights": _weights(prepared.gm),
    }


def _other_macs(prepared: PreparedModel) -> float | None:
    from fxdeco.metadata import original_totals

    return original_totals(prepared.gm).other_macs


def _local_summary(prepared: PreparedModel) -> dict[str, Any]:
    """What the other ranks need to know of this rank's calibration before anything is summed."""
    moments = prepared.sensitivity_moments
    return {
        **_model_summary(prepared),
        "outputs": {k: s.shifted_sum.shape[0] for k, s in prepared.collected.outputs.items()},
        "inputs": {k: s.shifted_sum.shape[0] for k, s in prepared.collected.inputs.items()},
        "moments": None if moments is None else {k: tuple(m.shape) for k, m in moments.items()},
        "sensitivity_samples": prepared.sensitivity_samples,
        "batches": prepared.batches,
        "kept": len(prepared.kept_inputs),
        "kept_raw": len(prepared.kept_raw),
        "macs": prepared.macs_per_sample,
        "other_macs": _other_macs(prepared),
    }


def check_same_model(prepared: PreparedModel, blocks: Sequence[Any] | Exception = ()) -> None:
    """Gather every rank's model summary and raise :class:`DistributedError` (on every rank) if they differ.

    Compared: the layers, the parameter count, the checksum of every parameter
    and buffer, and ``blocks`` (sequential mode's ``passes.blocks.Block`` cut:
    the per-block all-reduces must go in step). ``blocks`` may be the error
    finding them raised on this rank (a ``blocks=`` scope that holds no layer):
    it is raised here once the summaries are gathered, and a DistributedError
    naming it on the other ranks, so no rank waits for one that left.
    :func:`all_reduce_statistics` does this for one-shot mode; sequential mode
    calls it before its block walk. Outside a reducing convert only ``blocks``'s
    error is raised.
    """
    active = current()
    if active is None:  # one process: nothing to compare (and no pass over the weights)
        if isinstance(blocks, Exception):
            raise blocks
        return
    summaries = active.gather(_model_summary(prepared, blocks))
    if isinstance(blocks, Exception):  # the others know it now
        raise blocks
    for r, theirs in enumerate(summaries):
        if isinstance(theirs["blocks"], str):
            raise DistributedError(f"rank {r} could not cut the model into blocks ({theirs['blocks']}): pass the same "
                                   "blocks= on every rank")
    _check_same_model(summaries)


def _first_weight_difference(first: list[WeightEntry], theirs: list[WeightEntry]
                             ) -> tuple[str, tuple | None, tuple | None] | None:
    """The first tensor (in rank 0's order) whose dtype, shape or checksum differs, or that one rank lacks."""
    mine, other = {e[0]: tuple(e[1:]) for e in first}, {e[0]: tuple(e[1:]) for e in theirs}
    for name in dict.fromkeys([*mine, *other]):
        if mine.get(name) != other.get(name):
            return name, mine.get(name), other.get(name)
    return None


def _check_same_weights(r: int, first: list[WeightEntry], theirs: list[WeightEntry]) -> None:
    """Rank ``r`` holds the weights of rank 0 (``[(name, dtype, shape, checksum)]`` each), else an error."""
    differing = _first_weight_difference(first, theirs)
    if differing is None:
        return
    name, mine, other = differing

    def shown(entry: tuple | None) -> str:
        return "absent" if entry is None else f"{entry[0]} {tuple(entry[1])}"

    values_only = mine is not None and other is not None and mine[:2] == other[:2]  # same dtype and shape
    detail = "" if values_only else f"; {shown(mine)} on rank 0, {shown(other)} on rank {r}"
    raise DistributedError(f"rank {r}'s weights differ from rank 0's (first: {name!r}{detail}): load the same "
                           "checkpoint on every rank before calling fxdeco")


def _check_same_model(summaries: list[dict[str, Any]]) -> None:
    """Every rank prepared the same model, with the same weights, blocks and statistics switched on (else an
    error on every rank: each rank compares the same gathered summaries, so all raise alike)."""
    first = summaries[0]
    for r, theirs in enumerate(summaries[1:], start=1):
        if theirs["sites"] != first["sites"] or theirs["params"] != first["params"]:
            only = sorted(set(first["sites"]) ^ set(theirs["sites"]))[:3]
            raise DistributedError(
                f"rank {r} prepared another model than rank 0 ({theirs['params']} vs {first['params']} parameters"
                + (f"; layers on one rank only: {only}" if only else "") + "): every rank must prepare the same "
                "model with the same options")
        if theirs.get("blocks") != first.get("blocks"):
            names = [[name for name, _ in summary["blocks"]] for summary in (first, theirs)]
            raise DistributedError(f"rank {r} cut the model into other blocks than rank 0 ({names[1][:4]} vs "
                                   f"{names[0][:4]}): pass the same blocks= on every rank")
        _check_same_weights(r, first["weights"], theirs["weights"])
        if (theirs.get("moments") is None) != (first.get("moments") is None):
            raise DistributedError(f"rank {r} {'did not collect' if theirs.get('moments') is None else 'collected'} "
                                   "output-gradient moments and rank 0 did the opposite: prepare every rank with "
                                   "the same options (sensitivity=, sensitivity_loss=)")


def _recentred(stats: SiteStatistics | None, channels: int, centre: torch.Tensor) -> SiteStatistics:
    """A copy of ``stats`` (empty statistics when None) with its shifted sums re-expressed around ``centre``."""
    if stats is None:
        stats = SiteStatistics.empty(channels)
    moved = SiteStatistics(stats.shifted_outer.clone(), stats.shifted_sum.clone(), stats.rows, stats.samples,
                           stats.weight, stats.centre)
    moved._set_centre(centre)  # exact float64 algebra on the sums (passes.stats)
    return moved


def _sum_statistics(active: Collective, local: dict[str, SiteStatistics], channels: dict[str, int]
                    ) -> dict[str, SiteStatistics]:
    """Every key of ``channels`` summed over the ranks, around one common centre: the weighted mean of all rows.

    The centre is the mean over every rank's rows (an all-reduce of the plain
    sums and weights), so the summed shifted sums are those of the data's own
    mean, as well conditioned as any single rank's; each rank moves its sums
    there exactly (in float64) before they are added.
    """
    keys = sorted(channels)
    firsts = _sum_packed(active, [(k, torch.cat([local[k].sum, torch.tensor([float(local[k].weight)],
                                                                            dtype=torch.float64)])
                                   if k in local else None, (channels[k] + 1,)) for k in keys])
    centres = {}
    for k in keys:
        total, weight = firsts[k][:-1], float(firsts[k][-1])
        centres[k] = total / weight if weight > 0 else torch.zeros(channels[k], dtype=torch.float64)
    items = []
    for k in keys:
        moved = _recentred(local.get(k), channels[k], centres[k])
        counts = torch.tensor([float(moved.weight), float(moved.rows), float(moved.samples)], dtype=torch.float64)
        items.append((k, torch.cat([moved.shifted_outer.reshape(-1), moved.shifted_sum, counts]),
                      (channels[k] * channels[k] + channels[k] + 3,)))
    summed = _sum_packed(active, items)
    result = {}
    for k in keys:
        c = channels[k]
        flat = summed[k]
        weight, rows, samples = flat[-3:].tolist()
        result[k] = SiteStatistics(flat[: c * c].reshape(c, c).clone(), flat[c * c: c * c + c].clone(),
                                   round(rows), round(samples), float(weight), centres[k])
    return result


def _union(gathered: list[dict[str, Any]], key: str) -> dict[str, int]:
    """Every rank's ``{statistics key: channels}`` under ``key``, merged (a rank that never saw one adds zeros)."""
    merged: dict[str, int] = {}
    for theirs in gathered:
        merged.update({k: v for k, v in theirs[key].items() if k not in merged})
    return merged


def all_reduce_activation_statistics(collected: ActivationStatistics) -> ActivationStatistics:
    """``collected`` summed over the ranks of the running reduction (:func:`reducing`), around common centres;
    ``collected`` itself outside one. What sequential mode reduces for each block (``fxdeco.sequential``)."""
    active = current()
    if active is None:
        return collected
    shapes = active.gather({"outputs": {k: s.shifted_sum.shape[0] for k, s in collected.outputs.items()},
                            "inputs": {k: s.shifted_sum.shape[0] for k, s in collected.inputs.items()}})
    outputs, inputs = _union(shapes, "outputs"), _union(shapes, "inputs")
    return ActivationStatistics(_sum_statistics(active, collected.outputs, outputs),
                                _sum_statistics(active, collected.inputs, inputs))


def all_reduce_statistics(prepared: PreparedModel, group: Any = None) -> PreparedModel:
    """A copy of ``prepared`` whose statistics are the sums over every rank of ``group``.

    Every rank calls this with its own calibrated :class:`fxdeco.PreparedModel`
    (the same model, its own shard of the data). Summed in float64: the
    activation statistics of every layer output and shared input (ranks agree
    on the union of keys first; a rank that never saw one adds empty
    statistics), re-expressed around one common centre (the mean of all rows);
    the output-gradient moments and their sample count; the number of batches.
    Each rank keeps its own kept batches for measurements (as many as the rank
    with the fewest kept, so every rank measures alike; the measured sums are
    reduced later); the MACs per sample are rank 0's (they come from one batch's
    shapes, and a one-process run on the union would count rank 0's first batch).

    ``prepared`` itself is not changed (it keeps this rank's own sums and can go
    on calibrating), so converting twice never sums twice; a copy that was already
    reduced is returned as it is. ``group``: a ``ProcessGroup``, None for the
    default group, or a :class:`Collective`. :func:`fxdeco.convert` calls this
    for you; call it yourself to look at the summed statistics.

    Example (each of two ranks, after ``torch.distributed.init_process_group``):
        >>> summed = all_reduce_statistics(prepared)            # doctest: +SKIP
        >>> summed.batches == sum_of_all_ranks_batches            # doctest: +SKIP
        True
    """
    active = group if isinstance(group, Collective) else collective(True if group is None else group)
    if getattr(prepared, "distributed_world", 1) > 1 or active is None:
        return prepared
    summaries = active.gather(_local_summary(prepared))
    _check_same_model(summaries)
    outputs, inputs = _union(summaries, "outputs"), _union(summaries, "inputs")
    collected = ActivationStatistics(_sum_statistics(active, prepared.collected.outputs, outputs),
                                     _sum_statistics(active, prepared.collected.inputs, inputs))
    moments = None
    if prepared.sensitivity_moments is not None:
        shapes: dict[str, tuple[int, ...]] = {}
        for theirs in summaries:
            shapes.update({k: tuple(v) for k, v in theirs["moments"].items() if k not in shapes})
        local = prepared.sensitivity_moments
        moments = _sum_packed(active, [(k, local.get(k), shapes[k]) for k in sorted(shapes)])
    kept = min(s["kept"] for s in summaries)
    kept_raw = min(s["kept_raw"] for s in summaries)
    macs = next((s["macs"] for s in summaries if s["macs"] is not None), None)
    other_macs = next((s["other_macs"] for s in summaries if s.get("other_macs") is not None), None)

    reduced = copy.copy(prepared)  # shares the graph and the sites; its own statistics below
    reduced.collected = collected
    reduced.sensitivity_moments = moments
    reduced.sensitivity_samples = sum(s["sensitivity_samples"] for s in summaries)
    reduced.batches = sum(s["batches"] for s in summaries)
    reduced.kept_inputs = list(prepared.kept_inputs[:kept])
    reduced.kept_raw = list(prepared.kept_raw[:kept_raw])
    reduced.macs_per_sample = macs
    reduced._per_site = None
    reduced.distributed_world = active.world
    from fxdeco.metadata import original_totals

    if macs is not None and macs != prepared.macs_per_sample:
        original_totals(prepared.gm).macs = macs  # budgets in MACs are fractions of this: rank 0's on every rank
    if other_macs is not None:  # and the MACs beside the layers', added to the layers' on the summed rows
        original_totals(prepared.gm).other_macs = other_macs
    log.info("statistics of %d batches summed over %d ranks (%d layer outputs, %d shared inputs; %d metric batches "
             "kept per rank)", reduced.batches, active.world, len(outputs), len(inputs), kept)
    return reduced


# ----------------------------------------------------------------------------- plans


def plan_digest(decisions: Iterable[LayerDecision]) -> list[tuple[str, int | None]]:
    """``[(layer, rank or None for dense)]``: what must be equal on every rank."""
    return [(d.target, d.rank) for d in decisions]


def check_same_plan(decisions: Sequence[LayerDecision]) -> None:
    """Gather every rank's plan digest and raise :class:`DistributedError` (on every rank) if they differ.

    The statistics and measurements were reduced, so the ranks should agree;
    if they do not (another model or option on one rank, a method that decided
    from something it did not reduce, different hardware rounding an
    eigen-solve differently at a threshold), no rank returns a model.
    Nothing happens outside a reducing convert.
    """
    active = current()
    if active is None:
        return
    digests = active.gather(plan_digest(decisions))
    for r, theirs in enumerate(digests[1:], start=1):
        if theirs == digests[0]:
            continue
        mine, other = dict(digests[0]), dict(theirs)
        differing = [t for t in dict.fromkeys([*mine, *other]) if mine.get(t, "absent") != other.get(t, "absent")]

        def shown(value: Any) -> str:
            return "dense" if value is None else str(value)

        examples = "; ".join(f"{t!r}: {shown(mine.get(t, 'absent'))} on rank 0, {shown(other.get(t, 'absent'))} "
                             f"on rank {r}" for t in differing[:3])
        raise DistributedError(
            f"the ranks made different plans ({len(differing)} layer(s) differ; {examples}), although their "
            "statistics were all-reduced: every rank must run the same model, method and options (and a method "
            "must reduce what it measures). No model is returned, so that no rank saves a different one")


# ----------------------------------------------------------------------------- data


def shard(batches: Iterable[T], rank: int | None = None, world: int | None = None) -> list[T] | Iterator[T]:
    """This rank's share of ``batches``: batch ``i`` goes to rank ``i % world``.

    ``rank``/``world`` default to the default group's. A list (or tuple) gives a
    list; any other iterable is sliced lazily (every rank reads the whole
    iterable and keeps its share). Use a ``DistributedSampler`` for a DataLoader.

    Example:
        >>> shard(["a", "b", "c", "d", "e"], rank=0, world=2)
        ['a', 'c', 'e']
        >>> list(shard(iter(range(5)), rank=1, world=2))
        [1, 3]
    """
    if rank is None or world is None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise DistributedError("shard() without rank= and world= needs an initialised torch.distributed")
        rank = dist.get_rank() if rank is None else rank
        world = dist.get_world_size() if world is None else world
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world) and world >= 1, got rank={rank}, world={world}")
    if isinstance(batches, (list, tuple)):
        return list(batches[rank::world])
    return itertools.islice(batches, rank, None, world)
