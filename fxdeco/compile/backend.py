"""A ``torch.compile`` backend that decomposes every graph Dynamo captures.

    >>> import torch
    >>> from fxdeco.compile.backend import backend
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    >>> deco = backend(inner="eager", calib_steps=4, nsr_threshold=0.05)
    >>> compiled = torch.compile(model, backend=deco)
    >>> for _ in range(5):            # 4 exact calibration calls, then the decomposed graph
    ...     out = compiled(torch.randn(16, 4) @ torch.randn(4, 32))
    >>> deco.graphs[0].status, deco.graphs[0].calls
    ('decomposed', 5)

How a graph gets decomposed
---------------------------
Dynamo calls the backend once per captured graph with ``(gm, example_inputs)``.
In torch 2.x the module's parameters arrive as graph *inputs* (placeholders
such as ``L_self_modules_fc_parameters_weight_``, the ``Parameter`` objects
among the example inputs) and Linear/Conv2d as ``call_function``
(``torch._C._nn.linear``, ``torch.conv2d``). fxdeco's passes decompose a layer
only when its weight is a constant, so :func:`passes.lift.lift_parameters`
first binds every ``nn.Parameter`` input to an attribute of a new GraphModule
(``fc.weight``: layer names match those of :func:`fxdeco.transform`); the
weights are frozen from then on (an inference backend). Graphs whose weights
are already ``get_attr`` constants, or ``call_module`` layers, go through the
same path unchanged. The lifted graph is then handled by the ordinary pipeline:
:func:`fxdeco.prepare` -> statistics -> :func:`fxdeco.convert` -> the inner
backend. The function handed back to Dynamo takes Dynamo's full argument list
and drops the lifted parameter arguments; it refuses to run if one of those
parameters was replaced or modified in place after compilation (the factors
would be stale: call ``torch._dynamo.reset()`` and compile again).

Where the statistics come from
------------------------------
The statistics of a graph's layers must be measured on *that graph's* inputs,
and after a graph break those are intermediate activations that no
model-level batch maps onto directly. Both modes therefore measure them where
they occur, inside the compiled model, while every graph still computes its
original, exact outputs (so a later graph is calibrated on the activations the
original model produces, exactly as :func:`fxdeco.transform` sees them):

* **online** (no ``calib_loader``): each graph calibrates on its own first
  ``calib_steps`` real calls, returning the exact original outputs, then
  converts itself, compiles the decomposed graph with the inner backend and
  uses it from the next call on.
* **calibration loader**: :meth:`DecompositionBackend.calibrate` runs every
  batch of ``calib_loader`` (after ``input_fn``) through the compiled model
  once, without gradients. The first batch makes Dynamo capture the graphs; each
  graph records statistics on every batch that reaches it; after the last batch
  every graph converts itself and compiles. A compiled model that is called
  before ``calibrate`` raises an error saying so. A graph that none of the
  batches reached (another branch) falls back to online calibration, with a
  warning.

Dynamo compiles a graph again when the input shapes change (the last, smaller
batch of a loader; a new batch size after calibration). Recompilations of one
graph (same layers, same weight storage) form a *family* that shares one
decomposition: the member that saw the most calibration batches is converted
and the others adopt its factors (status ``"adopted"``), at once when the
decomposition already exists, so a new batch size costs no recalibration and
never decomposes a layer differently.

A graph with no decomposable layer is passed through unchanged (compiled by
the inner backend), with a log line. With ``keep_params``/``keep_macs``
(falor's budget mode) the budget applies to each graph on its own.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch
import torch._dynamo
import torch.fx

from fxdeco.api import RUNNERS, convert, prepare
from fxdeco.methods import MethodConfig, method_config
from fxdeco.batches import check_loader, model_inputs, no_batches
from fxdeco.errors import CalibrationError, CaptureError, NoSitesError
from fxdeco.metadata import factored_layers, model_record
from fxdeco.outputs import default_logits
from fxdeco.prepared import PreparedModel
from passes import Factorization, factorize_sites, find_sites
from passes.lift import lift_parameters
from passes.sites import fetch_attr

log = logging.getLogger(__name__)

CompiledFn = Callable[..., Any]
InnerBackend = Callable[[torch.fx.GraphModule, list], CompiledFn]


def _inner_backend(inner: str | InnerBackend) -> InnerBackend:
    """Resolve ``inner`` to a backend callable; ``"eager"`` runs the GraphModule itself."""
    if inner == "eager":
        return lambda gm, example_inputs: gm
    if isinstance(inner, str):
        try:
            return torch._dynamo.lookup_backend(inner)
        except Exception as exc:  # Dynamo raises its own InvalidBackend
            raise ValueError(f"unknown inner backend {inner!r}: {exc}. Use 'eager', 'inductor', another name "
                             "from torch._dynamo.list_backends(), or a backend callable") from exc
    if callable(inner):
        return inner
    raise TypeError("inner must be a backend name or a callable (gm, example_inputs) -> fn, "
                    f"got {type(inner).__name__}")


def _is_dynamic(example_inputs: Sequence[Any]) -> bool:
    """Dynamo passes sizes of dynamic dimensions as ``SymInt``/int inputs."""
    return any(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in example_inputs)


def _prepare(lifted: torch.fx.GraphModule, sensitivity: bool) -> PreparedModel:
    # A Dynamo graph returns a tuple; its first float tensor is the model's output when the model returns one.
    return prepare(lifted, sensitivity=sensitivity, output_fn=default_logits)


def _family_key(gm: torch.fx.GraphModule, lifted: torch.fx.GraphModule) -> tuple:
    """What recompilations of one graph share: the same layers with the same weight storage, the same values of
    every weight the graph holds, and the same code (:func:`_code_signature`). Two pieces of a graph-broken forward
    that call one layer on different inputs are two families: each layer's factors must fit the inputs of the code
    that calls it. A parameter's version counter (shared with the model's) tells new values in the same storage
    apart (``load_state_dict``, an optimizer step, then ``torch._dynamo.reset()`` and compiling again with this
    backend): the factors of the old values, or of the statistics that upstream weights produced, no longer fit,
    so such a graph calibrates again."""
    sites, _ = find_sites(lifted)
    layers = tuple((s.target, s.kind, s.weight_shape, fetch_attr(lifted, s.weight).data_ptr()) for s in sites)
    values = tuple((name, p.data_ptr(), p._version) for name, p in lifted.named_parameters(remove_duplicate=False))
    return layers, values, _code_signature(gm)


def _code_signature(gm: torch.fx.GraphModule) -> tuple:
    """Dynamo's graph as code: its tensor inputs (named after their source, ``L_x_``) and tensor computations, in
    order. What only the input shapes change is left out (symbolic sizes and the integer arithmetic on them), so a
    recompilation for another batch size, static or dynamic, has the signature of the first graph."""
    def tensor(node: torch.fx.Node) -> bool:
        return isinstance(node.meta.get("example_value"), torch.Tensor)

    return tuple((n.op, n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target)))
                 for n in gm.graph.nodes if n.op not in ("get_attr", "output") and tensor(n))


def _plan_of(decomposed: torch.fx.GraphModule) -> dict[str, Factorization]:
    """Read the factors back out of a decomposed graph, to apply them to a sibling graph."""
    plan: dict[str, Factorization] = {}
    for node, info in factored_layers(decomposed):
        if info.target in plan:
            continue
        pair = decomposed.get_submodule(node.target.rpartition(".")[0])
        bias = pair[1].bias
        plan[info.target] = Factorization(pair[0].weight.detach(), pair[1].weight.detach(), dict(info.method_meta),
                                          None if bias is None else bias.detach())
    return plan


class _Family:
    """Graphs Dynamo compiled from the same code and weights (recompilations for new input shapes).

    They share one decomposition: the first to be converted defines it, the others adopt its factors, so
    a new batch size after calibration neither recalibrates nor decomposes the layers differently.
    """

    def __init__(self) -> None:
        self.plan: dict[str, Factorization] | None = None
        self.meta: dict[str, Any] = {}
        self.leader: int | None = None


class GraphDecomposer:
    """What the backend hands Dynamo for one captured graph: calibrates, then runs the decomposed graph.

    Attributes:
        index: position among the graphs this backend compiled.
        status: ``"calibrating"``, ``"decomposed"`` (from its own statistics), ``"adopted"`` (the
            decomposition of an earlier compilation of the same graph) or, for :class:`PassThrough`,
            ``"passthrough"``.
        calls: real calls so far (all of them, calibration included).
        calibration_calls: calls whose statistics were recorded.
        prepared: the :class:`fxdeco.PreparedModel` collecting statistics (None once converted).
        decomposed: the decomposed GraphModule (inspect it with :func:`fxdeco.report`).
    """

    def __init__(self, owner: DecompositionBackend, index: int, lifted: torch.fx.GraphModule, kept: list[int],
                 example_inputs: Sequence[Any], family: _Family) -> None:
        self.owner = owner
        self.index = index
        self.kept = kept
        self.family = family
        self.status = "calibrating"
        self.calls = 0
        self.calibration_calls = 0
        self.decomposed: torch.fx.GraphModule | None = None
        self.dynamic = _is_dynamic(example_inputs)
        kept_set = set(kept)
        # (position, parameter, version): the lifted weights, to detect later changes
        self._weights = [(i, v, v._version) for i, v in enumerate(example_inputs) if i not in kept_set]
        self._compiled: CompiledFn | None = None
        self._last_inputs: list[Any] = []
        self._warned_online = False
        self.prepared: PreparedModel | None = _prepare(lifted, owner.sensitivity)
        if family.plan is not None:
            self.adopt([example_inputs[i] for i in kept])

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        self._check_weights(args)
        inputs = [args[i] for i in self.kept]
        if self._compiled is None and self.family.plan is not None:
            self.adopt(inputs)
        if self._compiled is not None:
            return self._compiled(*inputs)
        if not self.owner.calib_loader_given or self.owner.recording:
            return self._calibrate(inputs, switch=not self.owner.recording)
        if not self.owner.calibrated:
            raise CalibrationError(
                "this fxdeco backend was given a calib_loader, so the compiled model must be calibrated before "
                "use: call backend.calibrate(compiled_model) once (or build the backend without calib_loader to "
                "calibrate online on the first calib_steps calls)")
        if not self._warned_online:
            self._warned_online = True
            warnings.warn(f"fxdeco backend: graph {self.index} was not reached by the calibration loader (another "
                          f"branch); it calibrates online on its first {self.owner.calib_steps} calls instead",
                          UserWarning, stacklevel=2)
        return self._calibrate(inputs, switch=True)

    def _check_weights(self, args: Sequence[Any]) -> None:
        for position, weight, version in self._weights:
            if args[position] is not weight or weight._version != version:
                raise RuntimeError(
                    f"fxdeco backend: a parameter of graph {self.index} was replaced or modified after compilation, "
                    "so its decomposition is stale; call torch._dynamo.reset() and compile the model again (another "
                    "instance of the same model class compiled with this backend reuses this graph too: give each "
                    "model its own fxdeco.backend(...))")

    def _calibrate(self, inputs: list[Any], switch: bool) -> Any:
        """Record statistics on ``inputs`` and return the original graph's exact outputs."""
        assert self.prepared is not None
        out = self.prepared(*inputs)
        self.calibration_calls += 1
        self._last_inputs = inputs
        if switch and self.calibration_calls >= self.owner.calib_steps:
            self.finish()
        return out

    def finish(self) -> None:
        """Convert the collected statistics (or adopt the family's decomposition), compile, and switch over."""
        if self._compiled is not None or self.prepared is None:
            return
        if self.family.plan is not None:
            self.adopt(self._last_inputs)
            return
        if self.prepared.batches == 0:
            return
        decomposed = convert(self.prepared, self.owner.config)
        self.family.plan, self.family.meta, self.family.leader = _plan_of(decomposed), decomposed.meta, self.index
        self._switch(decomposed, self._last_inputs, "decomposed")
        record = model_record(decomposed)
        log.info("graph %d decomposed after %d calibration calls: %d -> %d parameters", self.index,
                 self.calibration_calls, record.params_before, record.params_after)

    def adopt(self, example_inputs: list[Any]) -> None:
        """Apply the factors an earlier compilation of this graph chose."""
        assert self.prepared is not None and self.family.plan is not None
        decomposed = factorize_sites(self.prepared.gm, self.prepared.sites, self.family.plan)
        decomposed.delete_all_unused_submodules()
        decomposed.meta.update(self.family.meta)
        self._switch(decomposed, example_inputs, "adopted")
        log.info("graph %d adopts the decomposition of graph %d (same layers, new input shapes)", self.index,
                 self.family.leader)

    def _switch(self, decomposed: torch.fx.GraphModule, example_inputs: list[Any], status: str) -> None:
        for p in decomposed.parameters():  # an inference graph: the inner compiler needs no gradients
            p.requires_grad_(False)
        if self.dynamic and self.owner.inner != "eager":
            # Sizes vary between calls: let Dynamo guard the inner compilation rather than fix it
            # to the shapes of one example.
            self._compiled = torch.compile(decomposed, backend=self.owner.inner_fn, dynamic=True)
        else:
            self._compiled = self.owner.inner_fn(decomposed, list(example_inputs))
        self.decomposed, self.status = decomposed, status
        self.prepared, self._last_inputs = None, []


class PassThrough:
    """The record of a graph without decomposable layers: compiled by the inner backend unchanged."""

    def __init__(self, index: int, reason: str) -> None:
        self.index = index
        self.reason = reason
        self.status = "passthrough"
        self.decomposed = None


class DecompositionBackend:
    """A ``torch.compile`` backend that decomposes each captured graph (build it with :func:`backend`).

    ``graphs`` lists, in compile order, one :class:`GraphDecomposer` (or
    :class:`PassThrough`) per graph Dynamo handed over.
    """

    def __init__(self, method: str | MethodConfig, calib_loader: Iterable[Any] | None, inner: str | InnerBackend,
                 calib_steps: int, input_fn: Callable[[Any], Any] | None, options: dict[str, Any]) -> None:
        self.config = method_config(method, **options)  # checked now: a typo fails before compiling
        if self.config.name not in RUNNERS:
            raise ValueError(f"{type(self.config).__name__} does not decompose from calibration statistics, so it "
                             "cannot run as a torch.compile backend; use fxdeco.transform(model, loader, "
                             f"fxdeco.{type(self.config).__name__}(...))")
        if getattr(self.config, "sequential", False):
            raise ValueError("sequential=True calibrates while it decomposes, block by block, which a torch.compile "
                             "backend cannot: drop sequential=True, or use fxdeco.transform(model, loader, "
                             "fxdeco.Falor(..., sequential=True))")
        if getattr(self.config, "loss_fn", None) is not None:
            raise ValueError(f"{type(self.config).__name__}'s loss_fn reads the loader's batches, which a torch.compile "
                             "backend never sees (it gets the graph's inputs): use fxdeco.transform(model, loader, "
                             f"fxdeco.{type(self.config).__name__}(...))")
        if isinstance(calib_steps, bool) or not isinstance(calib_steps, int) or calib_steps < 1:
            raise ValueError(f"calib_steps must be a positive integer, got {calib_steps!r}")
        if input_fn is not None and not callable(input_fn):
            raise TypeError(f"input_fn must be a function of a batch, got {type(input_fn).__name__}")
        if input_fn is not None and calib_loader is None:
            # online calibration sees each graph's own inputs, never a loader's batches: input_fn would go unused
            raise ValueError("input_fn adapts calib_loader's batches, but this backend has no calib_loader: it "
                             f"calibrates online on each graph's first {calib_steps} calls, which get the model's "
                             "inputs as they are; pass calib_loader=..., or drop input_fn")
        if calib_loader is not None and not isinstance(calib_loader, Iterable):
            raise TypeError(f"calib_loader must be an iterable of batches, got {type(calib_loader).__name__}")
        if calib_loader is not None:
            check_loader(calib_loader)  # a tensor would be read row by row; an endless cycle never ends
        self.inner = inner
        self.inner_fn = _inner_backend(inner)
        self.calib_loader = calib_loader
        self.calib_loader_given = calib_loader is not None
        self.calib_steps = calib_steps
        self.input_fn = input_fn
        self.sensitivity = self.config.needs_sensitivity  # as fxdeco.transform asks the config
        self.graphs: list[GraphDecomposer | PassThrough] = []
        self._families: dict[tuple, _Family] = {}
        self.recording = False
        self.calibrated = False

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> CompiledFn:
        """Dynamo's entry point: return the function that runs ``gm``."""
        index = len(self.graphs)
        lifted, kept = lift_parameters(gm, list(example_inputs))
        family = self._families.setdefault(_family_key(gm, lifted), _Family())
        try:
            graph = GraphDecomposer(self, index, lifted, kept, example_inputs, family)
        except CaptureError as exc:  # e.g. a graph Dynamo captured from a model in train mode
            log.warning("graph %d passes through unchanged: %s", index, exc)
            self.graphs.append(PassThrough(index, str(exc)))
            return self.inner_fn(gm, list(example_inputs))
        except NoSitesError as exc:
            log.info("graph %d passes through unchanged: %s", index, exc)
            self.graphs.append(PassThrough(index, str(exc)))
            return self.inner_fn(gm, list(example_inputs))
        self.graphs.append(graph)
        if graph.status == "calibrating":
            assert graph.prepared is not None
            log.info("graph %d: %d layers to decompose, %s", index, len({s.target for s in graph.prepared.sites}),
                     "statistics from the calibration loader" if self.calib_loader_given
                     else f"calibrating online on the first {self.calib_steps} calls")
        return graph

    def calibrate(self, compiled_model: Callable[..., Any]) -> Callable[..., Any]:
        """Run every ``calib_loader`` batch through ``compiled_model``, then decompose every graph; return it.

        ``compiled_model`` is ``torch.compile(model, backend=this_backend)``.
        Recompilations of one graph during calibration (a last batch of another
        size) share one decomposition: the one that saw the most batches.

        Example:
            >>> import torch
            >>> from fxdeco.compile.backend import backend
            >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
            >>> deco = backend(calib_loader=[torch.randn(8, 16) for _ in range(3)], inner="eager")
            >>> compiled = deco.calibrate(torch.compile(model, backend=deco))
            >>> deco.graphs[0].calibration_calls, deco.graphs[0].status
            (3, 'decomposed')
        """
        if self.calib_loader is None:
            raise CalibrationError("this backend has no calib_loader; it calibrates online on the first "
                                   f"{self.calib_steps} calls, so there is nothing to run")
        seen = 0
        self.recording = True
        try:
            with torch.no_grad():
                for batch in self.calib_loader:
                    args, kwargs = model_inputs(batch, self.input_fn, seen, "calibration batch")
                    compiled_model(*args, **kwargs)
                    seen += 1
        finally:
            self.recording = False
        if seen == 0:
            raise no_batches(self.calib_loader)
        self.calibrated = True
        waiting = [g for g in self.graphs if isinstance(g, GraphDecomposer) and g.status == "calibrating"]
        # The member of each family that saw the most batches decides; its siblings adopt that decision.
        for graph in sorted(waiting, key=lambda g: -g.calibration_calls):
            if graph.family.plan is None and graph.calibration_calls < seen:
                log.warning("graph %d is decomposed from %d of the %d calibration batches (the others reached a "
                            "recompiled copy of it, or another branch)", graph.index, graph.calibration_calls, seen)
            if graph.calibration_calls:  # a graph no batch reached adopts or calibrates on its next call
                graph.finish()
        log.info("calibrated %d graphs on %d batches", len(self.graphs), seen)
        return compiled_model


def backend(
    method: str | MethodConfig = "falor",
    calib_loader: Iterable[Any] | None = None,
    inner: str | InnerBackend = "inductor",
    calib_steps: int = 8,
    input_fn: Callable[[Any], Any] | None = None,
    **options: Any,
) -> DecompositionBackend:
    """Build a ``torch.compile`` backend that low-rank decomposes the model, graph by graph.

    ``method`` is a method config (``fxdeco.Falor(keep_params=0.6)``) or a
    method's name with ``options`` as keywords, as :func:`fxdeco.convert` takes
    them; checked here so a typo fails at once. ``inner`` compiles each decomposed graph: ``"eager"``
    (run the GraphModule), ``"inductor"``, any name Dynamo knows, or a backend
    callable. Without ``calib_loader`` each graph calibrates on its first
    ``calib_steps`` calls (returning exact outputs meanwhile); with one, call
    :meth:`DecompositionBackend.calibrate` on the compiled model first
    (``input_fn`` adapts its batches, e.g. ``lambda b: b[0]``). The model should
    be in eval mode; its weights are frozen at compile time. See the module
    docstring for how statistics reach each graph.

    Example:
        >>> from fxdeco.compile.backend import backend
        >>> backend(nsr_treshold=0.1)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: unknown option 'nsr_treshold' for method 'falor' (did you mean 'nsr_threshold'?); valid options: ...
    """
    return DecompositionBackend(method, calib_loader, inner, calib_steps, input_fn, options)
