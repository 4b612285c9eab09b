"""Block-sequential calibration: statistics of one block at a time, on the outputs of the blocks already decomposed.

One-shot calibration (:class:`fxdeco.PreparedModel`) holds the statistics of
every layer at once: on a 7B LLaMA that is ~17 GB of float64 sums. Here the
graph is cut into blocks (``passes.blocks``: transformer layers, ResNet
blocks), the calibration batches' values at the boundary before the current
block are cached (host memory, or spilled to a directory), and for each block

1. its layers' statistics are collected on that boundary (so they see the
   *decomposed* upstream blocks: error compensation, as in GPTQ and SVD-LLM);
2. a method decides the block's ranks from them (``decide``);
3. the block runs again with its decomposed layers' outputs substituted, giving
   the next boundary; its statistics are dropped.

Peak memory: the model, one block's statistics and one boundary per batch.

Example:
    >>> import torch, fxdeco
    >>> from fxdeco.sequential import BlockCalibration
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> prepared = fxdeco.prepare(model)
    >>> calib = BlockCalibration(prepared, [torch.randn(16, 8) for _ in range(2)])
    >>> [b.name for b in calib.blocks], calib.batches
    (['0', '2'], 2)
    >>> stats = calib.statistics(0)
    >>> stats["0"].rows
    32
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx

from fxdeco import distributed
from fxdeco.batches import adapt_batch, as_call, check_not_empty, leading_dim, misfit_hint, no_batches
from fxdeco.errors import CalibrationError
from fxdeco.io.apply import swap_module
from fxdeco.modes import eval_mode
from fxdeco.progress import progress
from passes import Site, SiteStatistics, StatsInterpreter, flatten_inputs, fresh_inputs
from passes.blocks import Block, BlockRun, find_blocks, values_in
from passes.replay import Override
from passes.stats import ActivationStatistics, NonFiniteActivationError

log = logging.getLogger(__name__)

Boundary = dict[torch.fx.Node, Any]


class _Boundaries:
    """The calibration batches' boundary values: in memory, or one file per batch in ``spill_dir``.

    Spilled boundaries are written with ``torch.save`` keyed by node name and
    read back one batch at a time, so host memory holds one batch's values.
    """

    def __init__(self, nodes: Mapping[str, torch.fx.Node], spill_dir: str | os.PathLike | None) -> None:
        self.nodes = nodes
        self.in_memory: list[Boundary] = []
        self.directory = None if spill_dir is None else pathlib.Path(
            tempfile.mkdtemp(prefix="fxdeco-boundaries-", dir=spill_dir))
        self.count = 0
        self.largest_bytes = 0  # the largest boundary of one batch seen (bytes)

    def append(self, boundary: Boundary) -> None:
        self.set(self.count, boundary)
        self.count += 1

    def set(self, index: int, boundary: Boundary) -> None:
        self.largest_bytes = max(self.largest_bytes, values_in(boundary))
        if self.directory is None:
            if index == len(self.in_memory):
                self.in_memory.append(boundary)
            else:
                self.in_memory[index] = boundary
            return
        torch.save({n.name: v for n, v in boundary.items()}, self.directory / f"batch{index}.pt")

    def get(self, index: int) -> Boundary:
        if self.directory is None:
            return self.in_memory[index]
        saved = torch.load(self.directory / f"batch{index}.pt", weights_only=False)
        return {self.nodes[name]: v for name, v in saved.items()}

    def close(self) -> None:
        """Remove the spilled files and their directory (created here: nothing else is in it). Idempotent."""
        if self.directory is not None:
            directory, self.directory = self.directory, None
            shutil.rmtree(directory)


@dataclasses.dataclass
class BlockStatistics:
    """One block's statistics and what collecting them held."""

    per_site: dict[str, SiteStatistics]
    nbytes: int  # of the float64 sums


class BlockCalibration:
    """A prepared model's calibration batches, walked block by block (see the module docstring).

    ``batches`` are the loader's batches (adapted by ``input_fn``); they are
    turned into graph inputs at once (a batch that does not fit the model fails
    here, naming it) and the first one is run through the cost pass (the model's
    MACs, as ``fxdeco.prepare`` records them). ``scopes`` override the automatic
    blocks (``passes.blocks.find_blocks``; one that holds no layer is refused
    before any batch is read); ``spill_dir`` keeps boundaries on disk instead of
    in memory, in directories removed by :meth:`close`, or here if the
    constructor fails.
    """

    def __init__(self, prepared: Any, batches: Iterable[Any], *, input_fn: Callable[[Any], Any] | None = None,
                 scopes: Sequence[str] | None = None, spill_dir: str | os.PathLike | None = None,
                 show_progress: bool | None = None, total: int | None = None) -> None:
        self.prepared = prepared
        self.gm: torch.fx.GraphModule = prepared.gm
        self.sites: list[Site] = list(prepared.sites)
        self.blocks: list[Block] = find_blocks(self.gm, self.sites, scopes)  # a scope holding no layer fails here
        self.run = BlockRun(self.gm, self.blocks)
        self.show_progress = show_progress
        self.samples: list[int] = []  # per batch: its samples (the inputs' leading dimension), the MACs' basis
        self.row_weights: list[Any] = []  # per batch: the statistics' row weights (a stat_mask_fn's mask)
        self.masks: list[Any] = []  # per batch: the stat_mask_fn's mask weights (None without one), to warn when
        # none fitted any layer once every block has read them
        self.peak_statistics_bytes = 0
        self.position = 0  # the next block to run
        nodes = {n.name: n for n in self.gm.graph.nodes}
        self.boundaries = self.starts = _Boundaries(nodes, None)  # nothing to remove until the spill dirs exist
        try:  # whatever fails from here (a batch, the loader, Ctrl-C), no spilled file is left behind
            self.boundaries = _Boundaries(nodes, spill_dir)
            self.starts = _Boundaries(nodes, spill_dir)  # the graph inputs of every batch, to walk again (restart)
            self._cache(batches, input_fn, total)
        except BaseException:
            self._close_quietly()
            raise
        log.info("sequential calibration: %d blocks, %d batches", len(self.blocks), self.batches)

    def _cache(self, batches: Iterable[Any], input_fn: Callable[[Any], Any] | None, total: int | None) -> None:
        """Turn every batch into graph inputs and keep them as the first boundary."""
        with eval_mode(self.gm), torch.no_grad():
            for raw in progress(batches, desc="caching calibration inputs", total=total, enabled=self.show_progress):
                self._add(adapt_batch(raw, input_fn, self.batches))
        if self.batches == 0:
            raise no_batches(batches)

    def _close_quietly(self) -> None:
        """:meth:`close` on a failure path: a file that cannot be removed is logged, not raised over the failure."""
        try:
            self.close()
        except OSError as exc:
            log.warning("could not remove the spilled calibration inputs: %s", exc)

    @property
    def batches(self) -> int:
        return self.boundaries.count

    def _add(self, batch: Any) -> None:
        index = self.batches
        mask = None
        if self.prepared.stat_mask_fn is not None:
            try:
                mask = self.prepared.stat_mask_fn(batch)
            except Exception as exc:
                raise CalibrationError(f"stat_mask_fn failed on calibration batch {index}: "
                                       f"{type(exc).__name__}: {exc}") from exc
        args, kwargs = as_call(batch)
        check_not_empty(args, kwargs, index)
        try:
            flat = flatten_inputs(self.gm, args, kwargs)
        except TypeError as exc:
            raise CalibrationError(f"calibration batch {index} does not fit the model's inputs: {exc}"
                                   f"{misfit_hint(self.prepared.input_names, args, kwargs)}") from exc
        row_weights, by_mask = self.prepared._row_weights(mask, index)
        flat = fresh_inputs(flat)  # a loader may reuse its buffers, and a forward may change its inputs in place
        if self.prepared.macs_per_sample is None:  # the first batch: the model's MACs (and a whole forward pass)
            try:
                self.prepared._measure_cost(fresh_inputs(flat), leading_dim(args, kwargs))  # records the model's MACs
            except Exception as exc:
                raise CalibrationError(f"calibration batch {index} could not be run through the model: "
                                       f"{type(exc).__name__}: {exc}") from exc
        self.row_weights.append(row_weights)
        self.samples.append(leading_dim(args, kwargs))
        self.masks.append(by_mask)
        start = self.run.start(flat)
        self.starts.append(start)
        self.boundaries.append(start)
        self.prepared.batches += 1

    def block_sites(self, index: int) -> list[Site]:
        """The sites of block ``index`` (every call of each of its layers)."""
        targets = set(self.blocks[index].sites)
        return [s for s in self.sites if s.target in targets]

    def statistics(self, index: int, advance: bool = False) -> dict[str, SiteStatistics]:
        """Block ``index``'s per-layer statistics, on the current boundary (then call :meth:`advance`).

        ``advance=True`` also moves the boundaries past the block, as it ran (nothing decomposed): one pass
        instead of two.
        """
        self._check_position(index)
        sites = self.block_sites(index)
        interpreter = StatsInterpreter(self.gm, sites, ActivationStatistics(), product_dtype=self.prepared.stat_dtype,
                                       defer_commit=True)
        interpreter.extra_traceback = False

        def observe(node: torch.fx.Node, value: Any, env: Mapping[torch.fx.Node, Any]) -> None:
            interpreter.env = env  # type: ignore[assignment]  # where a shared input is read
            interpreter.current_node = node
            interpreter.observe(node, value)

        name = self.blocks[index].name
        # under torch.distributed, a rank that fails on a batch here tells the others before the all-reduce below
        with distributed.agreeing(f"calibrating block {name!r}"), eval_mode(self.gm), torch.no_grad():
            for b in progress(range(self.batches), desc=f"statistics of {name}", total=self.batches,
                              enabled=self.show_progress):
                interpreter.row_weights = self.row_weights[b]
                interpreter.samples = self.samples[b]
                interpreter.batch_index = b
                interpreter.start_batch()
                after = self._run_block(index, b, observe=observe)
                interpreter.commit()
                if advance:
                    self.boundaries.set(b, after)
        if advance:
            self.position = index + 1
        if index == len(self.blocks) - 1 and not any(m is not None and m.matched for m in self.masks):
            self.prepared._warn_unmatched(next((m for m in self.masks if m is not None), None))
        # every rank's sums for this block, under torch.distributed (one block at a time, like the statistics)
        collected = distributed.all_reduce_activation_statistics(interpreter.collected)
        nbytes = sum(s.shifted_outer.numel() * 8 for s in (*collected.outputs.values(), *collected.inputs.values()))
        self.peak_statistics_bytes = max(self.peak_statistics_bytes, nbytes)
        return collected.per_site(self.gm, sites)

    def advance(self, index: int, overrides: Mapping[str, Override] | None = None) -> None:
        """Move every batch's boundary past block ``index``, with ``overrides`` on node outputs (the block's
        decomposed layers)."""
        self._check_position(index)
        with distributed.agreeing(f"running block {self.blocks[index].name!r}"), eval_mode(self.gm), torch.no_grad():
            for b in range(self.batches):
                self.boundaries.set(b, self._run_block(index, b, overrides=overrides))
        self.position = index + 1

    def output(self, batch: int) -> Any:
        """The graph's output on ``batch`` once every block was advanced."""
        if self.position != len(self.blocks):
            raise RuntimeError(f"{len(self.blocks) - self.position} blocks have not run yet")
        return self.run.graph_output(self.boundaries.get(batch))

    def replace_module(self, target: str, module: torch.nn.Module) -> None:
        """Put ``module`` at ``target`` in the graph once the walk is past its block (``fxdeco.decompose_``: the dense
        layer's weights are then held by nothing here). A graph that reads weights with ``get_attr`` (exported) may
        not have the module: nothing to do then."""
        try:
            self.gm.get_submodule(target)
        except AttributeError:
            return
        swap_module(self.gm, target, module)
        self.run.submodules[target] = module  # the interpreter's own table of the graph's modules

    def restart(self) -> None:
        """Walk again from the first block, on the graph inputs."""
        for b in range(self.batches):
            self.boundaries.set(b, self.starts.get(b))
        self.position = 0

    def close(self) -> None:
        """Drop the cached boundaries (and their files)."""
        try:
            self.boundaries.close()
        finally:  # the inputs' files go even where the boundaries' could not
            self.starts.close()

    def _check_position(self, index: int) -> None:
        if index != self.position:
            raise RuntimeError(f"blocks run in order: block {self.position} is next, not {index}")

    def _run_block(self, index: int, batch: int, **options: Any) -> Boundary:
        try:
            return self.run.run_block(index, self.boundaries.get(batch), **options)
        except NonFiniteActivationError:
            raise
        except Exception as exc:
            raise CalibrationError(f"calibration batch {batch} could not be run through block "
                                   f"{self.blocks[index].name!r}: {type(exc).__name__}: {exc}") from exc
