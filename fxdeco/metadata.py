"""The records fxdeco leaves on graphs, typed, each with one writer and one reader.

| record | where | written by | read by |
|---|---|---|---|
| :class:`FactorInfo` | ``node.meta[passes.rewrite.FACTORED]`` on a layer's last node | the rewrite pass (``passes.rewrite``, ``passes.chains``); :func:`mark_factored` for lockd's dense layers | :func:`factor_info`, :func:`factored_layers` |
| first-factor mark | ``node.meta[passes.rewrite.FACTOR_ROLE]`` | the rewrite pass | :func:`is_first_factor` |
| :class:`ModelRecord` | ``gm.meta["fxdeco"]`` of a decomposed model | :func:`set_model_record` (convert, lockd, load, the compile backend) | :func:`model_record`, :func:`find_model_record` |
| :class:`CaptureRecord` | ``gm.meta["fxdeco_capture"]`` of a captured graph | :func:`set_capture_record` (``fxdeco.trace``) | :func:`capture_record` |
| :class:`OriginalTotals` | ``gm.meta["fxdeco_totals"]`` of a prepared graph | :func:`set_original_totals` (``fxdeco.prepare``) | :func:`original_totals` |

``passes/`` writes the per-layer record under its own neutral key and type
(:class:`passes.rewrite.FactoredLayer`, here :class:`FactorInfo`): it knows no
method. lockd's state between ``prepare`` and ``finalize`` is
:class:`fxdeco.methods.lockd.prepare.LockdState` (``lockd_state``).

Example:
    >>> import torch, fxdeco
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> small = fxdeco.transform(model, [torch.randn(64, 4) @ torch.randn(4, 32) for _ in range(3)],
    ...                          nsr_threshold=0.01)
    >>> [(info.target, info.rank < 32) for _, info in factored_layers(small)]
    [('0', True)]
    >>> model_record(small).method, capture_record(small).kind
    ('falor', 'symbolic')
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch.fx

from fxdeco.plan import LayerDecision
from passes import SkippedSite
from passes.rewrite import FACTOR_ROLE, FACTORED, FactoredLayer

FactorInfo = FactoredLayer  # the name fxdeco's readers use for the rewrite's per-layer record

MODEL_KEY, CAPTURE_KEY, TOTALS_KEY = "fxdeco", "fxdeco_capture", "fxdeco_totals"


# ---- per layer -----------------------------------------------------------------------------------------------

def factor_info(node: torch.fx.Node) -> FactorInfo | None:
    """The record of the layer whose last node is ``node`` (decomposed, or for lockd kept dense), or None."""
    return node.meta.get(FACTORED)


def factored_layers(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, FactorInfo]]:
    """``(last node, record)`` of every factored layer call, in graph order (a layer called twice appears twice)."""
    return [(n, info) for n in gm.graph.nodes if (info := factor_info(n)) is not None and info.decomposed]


def mark_factored(node: torch.fx.Node, info: FactorInfo) -> None:
    """Record a layer on its last node (lockd notes the layers it keeps dense, with ``rank`` None)."""
    node.meta[FACTORED] = info


def is_first_factor(node: torch.fx.Node) -> bool:
    """Whether ``node`` runs the first factor of a factored layer."""
    return node.meta.get(FACTOR_ROLE) == "first"


# ---- per decomposed model ------------------------------------------------------------------------------------

@dataclasses.dataclass
class ModelRecord:
    """What a method decided for a whole model; ``fxdeco.report`` and ``fxdeco.save`` read it.

    ``summary`` holds what one method adds (falor's refinement rounds and
    probes, lockd's training steps); plan.json saves it with the totals.
    """

    method: str | None
    options: dict[str, Any]
    capture: str  # "symbolic", "export", or "graph" (handed a GraphModule)
    decisions: list[LayerDecision]
    skipped: list[SkippedSite]
    removed: list[str]
    params_before: int
    params_after: int
    macs_before: float | None
    macs_after: float | None
    constant_inputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    calibration_batches: int | None = None
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)

    # the fields plan.json keeps under "totals", beside ``summary``
    TOTALS: ClassVar[tuple[str, ...]] = ("params_before", "params_after", "macs_before", "macs_after", "calibration_batches")

    def totals(self) -> dict[str, Any]:
        """The model's counts and the method's summary, as plan.json's ``totals`` holds them."""
        counts = {k: getattr(self, k) for k in self.TOTALS}
        if counts["calibration_batches"] is None:
            del counts["calibration_batches"]
        return {**counts, **self.summary}

    @classmethod
    def split_totals(cls, totals: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """plan.json's ``totals`` as (the counts, keyword arguments of this class; the method's summary)."""
        return ({k: v for k, v in totals.items() if k in cls.TOTALS},
                {k: v for k, v in totals.items() if k not in cls.TOTALS})


# where a model of the caller's own class decomposed in place (fxdeco.decompose_) keeps its record
MODULE_ATTRIBUTE = "_fxdeco_record"


def set_model_record(gm: torch.nn.Module, record: ModelRecord) -> None:
    """Attach ``record`` to a decomposed model: in a GraphModule's ``meta``, else as an attribute of the module."""
    if isinstance(gm, torch.fx.GraphModule):
        gm.meta[MODEL_KEY] = record
    else:
        object.__setattr__(gm, MODULE_ATTRIBUTE, record)


def find_model_record(gm: Any) -> ModelRecord | None:
    """The :class:`ModelRecord` of a model fxdeco decomposed, or None for any other model."""
    if isinstance(gm, torch.fx.GraphModule):
        record = gm.meta.get(MODEL_KEY)
    else:
        record = getattr(gm, "__dict__", {}).get(MODULE_ATTRIBUTE)
    return record if isinstance(record, ModelRecord) else None


def model_record(gm: Any, *, purpose: str = "this call") -> ModelRecord:
    """The :class:`ModelRecord` of a model fxdeco decomposed; a clear error naming ``purpose`` for anything else."""
    record = find_model_record(gm)
    if record is None:
        raise ValueError(f"{purpose}: this {type(gm).__name__} was not produced by fxdeco (transform, convert, load "
                         "or lockd.finalize); only a decomposed model carries the record it needs")
    return record


# ---- per captured graph --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CaptureRecord:
    """How ``fxdeco.trace`` captured a model: ``kind`` "symbolic" or "export" ("graph": handed a GraphModule),
    and the optional inputs traced as constants (``load`` must trace the same case)."""

    kind: str = "graph"
    constant_inputs: dict[str, Any] = dataclasses.field(default_factory=dict)


def set_capture_record(gm: torch.fx.GraphModule, record: CaptureRecord) -> None:
    gm.meta[CAPTURE_KEY] = record


def capture_record(gm: torch.fx.GraphModule) -> CaptureRecord:
    """How ``gm`` was captured; ``CaptureRecord()`` ("graph") for a GraphModule fxdeco did not capture."""
    record = gm.meta.get(CAPTURE_KEY)
    return record if isinstance(record, CaptureRecord) else CaptureRecord()


# ---- the original model's totals, for budgets ----------------------------------------------------------------

@dataclasses.dataclass
class OriginalTotals:
    """The original model's parameters and MACs per sample (None until a batch was costed); budgets are
    fractions of these."""

    params: int
    macs: float | None = None
    # MACs per sample of everything but the decomposable layers, on the first batch's shapes: the model's MACs are
    # these plus the layers' dense MACs on the rows per sample of all calibration batches (see
    # fxdeco.prepared.model_macs), so that both are counted on the same rows when sequence lengths vary
    other_macs: float | None = None


def set_original_totals(gm: torch.fx.GraphModule, totals: OriginalTotals) -> None:
    gm.meta[TOTALS_KEY] = totals


def original_totals(gm: torch.fx.GraphModule) -> OriginalTotals:
    """The totals ``fxdeco.prepare`` recorded, or those of ``gm`` itself (params only) when it recorded none."""
    totals = gm.meta.get(TOTALS_KEY)
    return totals if isinstance(totals, OriginalTotals) else OriginalTotals(sum(p.numel() for p in gm.parameters()))
