"""``fxdeco.Falor``: every option of falor, its default, its range and its meaning, in one place."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from fxdeco.checks import check_count, check_damping, check_flag, check_number, check_patterns, check_walk_options
from fxdeco.methods.base import MethodConfig

if TYPE_CHECKING:
    from passes import Site

# Options only one of falor's modes reads. Set beside another mode's options they would be silently ignored.
MODE_OPTIONS = {
    "local": ("nsr_threshold",),
    "budget": ("keep_params", "keep_macs", "keep_latency", "budget_criterion", "budget_rounds", "latency_rounds",
               "loss_fn"),
    "final-output": ("nsr_final_threshold", "kl_final_threshold", "num_metric_batches", "max_probes", "rank_tolerance"),
}




@dataclasses.dataclass(frozen=True)
class Falor(MethodConfig):
    """falor (Features Are LOw Rank): ranks from each layer's output covariance, in one of three modes.

    * local (default): each layer gets the smallest rank whose layer-output NSR
      is at most ``nsr_threshold``, in closed form;
    * budget (``keep_params``, ``keep_macs`` or ``keep_latency``): ranks allocated
      across all layers so the model keeps that fraction of its parameters, MACs
      per sample, or measured latency, minimising the predicted final-output error;
    * final-output (``nsr_final_threshold`` and/or ``kl_final_threshold``): each
      layer's rank is measured at the model's output (ptdeco's criterion).

    Options that only another mode reads are refused (``nsr_threshold`` beside
    ``keep_params``). Validated at construction.

    Example:
        >>> import torch, fxdeco
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
        >>> small = fxdeco.transform(model, [torch.randn(64, 32) for _ in range(4)], fxdeco.Falor(keep_params=0.5))
        >>> fxdeco.Falor(keep_params=0.5).mode, fxdeco.Falor().needs_sensitivity
        ('budget', False)
        >>> fxdeco.Falor(nsr_threshold=-1)
        Traceback (most recent call last):
        ...
        ValueError: nsr_threshold must be a number in (0.0, inf], got -1
    """

    name: ClassVar[str] = "falor"

    # local mode: the largest layer-output NSR (ptdeco's per-channel noise-to-signal ratio) a layer may have
    nsr_threshold: float = 0.02
    # budget mode: the fraction of the original parameters (or MACs per sample) to keep
    keep_params: float | None = None
    keep_macs: float | None = None
    # budget mode: the fraction of the original's latency to keep, measured here (this device, dtype, thread count,
    # the calibration batch's shapes): each layer timed dense and factored (fxdeco.latency), the decomposed model
    # timed end to end and, while that lands outside 8% under to 2% over keep_latency, allocated again (at most
    # ``latency_rounds`` times, aiming by the misses so far); with latency_rounds >= 1 a plan allocated by MACs
    # is timed beside them, and the most accurate plan within the budget is kept
    keep_latency: float | None = None
    latency_rounds: int = 2
    # budget mode: allocate by predicted final-output error ("output", needs gradient moments), summed layer
    # NSR ("nsr"), or "auto" (output when the moments were collected)
    budget_criterion: str = "auto"
    # budget mode: rounds that measure each allocated layer at the output and re-allocate (0: prediction only)
    budget_rounds: int = 1
    # budget mode: a loss, loss_fn(output, batch) -> scalar (batch as the loader yields it). Layers are then weighed
    # by how much they raise it (its gradient's moments, and the loss measured in the rounds) instead of by the
    # error of the output (random projections, and the final NSR)
    loss_fn: Callable[[Any, Any], Any] | None = None
    # final-output mode: thresholds on the model's output with only the layer decomposed (NSR, symmetric KL)
    nsr_final_threshold: float | None = None
    kl_final_threshold: float | None = None
    # final-output mode: calibration batches the errors are measured on, probes per layer, and the relative
    # slack below the threshold at which a rank is accepted without searching further
    num_metric_batches: int = 2
    max_probes: int = 8
    rank_tolerance: float = 0.02
    # all modes: ranks rounded up to a multiple ("auto": 8 on layers at least 128 wide, else exact)
    rank_multiple: int | str = "auto"
    # all modes: the smallest rank, the largest rank/full-rank fraction worth factorizing, eigenvalue damping
    # (a fraction of the mean eigenvalue), glob patterns of layer names kept dense, and covariance centring
    # (the mean of the discarded directions folded into the bias)
    min_rank: int = 1
    proportion_threshold: float = 1.0
    damping: float = 0.0
    skip: tuple[str, ...] = ()
    center: bool = True
    # all modes: which layers may be factorized: "params" (at any rank that saves parameters), "faster" (only
    # where the factored layer is measured faster than the dense one, its rank snapped up to a faster width
    # nearby), "auto" ("faster" with keep_latency, else "params": timing costs seconds and varies between runs)
    acceptance: str = "auto"
    # latency measurement: "eager" or "inductor" (each layer torch.compile'd), and the table of timings
    # (True: $FXDECO_CACHE_DIR or ~/.cache/fxdeco/latency.json; a file path; False: not kept)
    latency_backend: str = "eager"
    latency_cache: bool | str = True
    # latency measurement: samples per call to time with, the first of the first kept calibration batch (None:
    # the whole batch). Time with the batch you serve: 1 for an online service, where the second factor's extra
    # kernel eats much of what a factored layer saves (statistics still come from every calibration sample)
    latency_batch: int | None = None
    # local and budget mode: calibrate and decompose one block at a time (transformer layers, ResNet blocks), each
    # on the outputs of the blocks already decomposed: the memory of one block's statistics, not the model's, and
    # errors compensated downstream. Budgets hold for the whole model (fxdeco.methods.falor.sequential); runs in
    # fxdeco.transform (it walks the loader's batches itself)
    sequential: bool = False
    # sequential mode: the blocks, as qualified module names ("model.layers.0", ...); None: each layer's name cut
    # after its first numeric component (model.layers.3.mlp.up_proj -> model.layers.3)
    blocks: tuple[str, ...] | None = None
    # sequential mode: a directory where the batches' cached block inputs are kept (None: host memory); it must
    # exist and be writable (checked here)
    spill_dir: str | None = None
    # a progress bar (None: on a terminal; elsewhere periodic lines)
    show_progress: bool | None = None

    def __post_init__(self) -> None:
        check_number("nsr_threshold", self.nsr_threshold, high=math.inf)
        check_number("proportion_threshold", self.proportion_threshold)
        budgets = [n for n in ("keep_params", "keep_macs", "keep_latency") if getattr(self, n) is not None]
        if len(budgets) > 1:
            raise ValueError(f"give one budget (keep_params, keep_macs or keep_latency), not {' and '.join(budgets)}")
        for name in ("keep_params", "keep_macs", "keep_latency"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name))
        for name in ("nsr_final_threshold", "kl_final_threshold"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), high=math.inf)
        if (self.nsr_final_threshold is not None or self.kl_final_threshold is not None) and budgets:
            raise ValueError("give final-output thresholds (nsr_final_threshold / kl_final_threshold) or a budget "
                             f"({budgets[0]}), not both")
        object.__setattr__(self, "latency_rounds", check_count("latency_rounds", self.latency_rounds, minimum=0))
        if self.latency_batch is not None:
            object.__setattr__(self, "latency_batch", check_count("latency_batch", self.latency_batch, minimum=1))
        if self.acceptance not in ("auto", "params", "faster"):
            raise ValueError(f"acceptance must be 'auto', 'params' or 'faster', got {self.acceptance!r}")
        if self.latency_backend not in ("eager", "inductor"):
            raise ValueError(f"latency_backend must be 'eager' or 'inductor', got {self.latency_backend!r}")
        if not isinstance(self.latency_cache, (bool, str)) and not hasattr(self.latency_cache, "__fspath__"):
            raise TypeError(f"latency_cache must be True, False or a file path, got {self.latency_cache!r}")
        object.__setattr__(self, "num_metric_batches", check_count("num_metric_batches", self.num_metric_batches))
        object.__setattr__(self, "max_probes", check_count("max_probes", self.max_probes))
        check_number("rank_tolerance", self.rank_tolerance, high=1.0, low_open=False)
        object.__setattr__(self, "damping", check_damping(self.damping))
        object.__setattr__(self, "min_rank", check_count("min_rank", self.min_rank))
        if self.rank_multiple != "auto":
            object.__setattr__(self, "rank_multiple", check_count("rank_multiple", self.rank_multiple))
        object.__setattr__(self, "budget_rounds", check_count("budget_rounds", self.budget_rounds, minimum=0))
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be a function (output, batch) -> scalar, got {type(self.loss_fn).__name__}")
        if self.loss_fn is not None and self.budget_criterion == "nsr":
            raise ValueError("loss_fn weighs layers by the loss's gradient; budget_criterion='nsr' ignores it: drop "
                             "one of them")
        if self.budget_criterion not in ("auto", "nsr", "output"):
            raise ValueError(f"budget_criterion must be 'auto', 'nsr' or 'output', got {self.budget_criterion!r}")
        object.__setattr__(self, "skip", check_patterns("skip", self.skip))
        check_flag("center", self.center)
        check_flag("sequential", self.sequential)
        check_flag("show_progress", self.show_progress, optional=True)
        self._refuse_other_modes()
        self._refuse_unused_latency_options()
        self._check_sequential()

    def _refuse_unused_latency_options(self) -> None:
        """The timing options without timing (no ``keep_latency``, no ``acceptance='faster'``) would be ignored."""
        if isinstance(self.latency_cache, str) and not self.latency_cache.strip():
            raise ValueError("latency_cache must be True, False or a file path, got an empty string")
        given = set(self.options())
        if "latency_rounds" in given and self.keep_latency is None:
            raise ValueError("latency_rounds is an option of a latency budget (keep_latency=...), which this config "
                             "does not set: drop it")
        unused = next((n for n in ("latency_backend", "latency_cache", "latency_batch") if n in given), None)
        if unused is not None and not self.measures_latency:
            raise ValueError(f"{unused} applies only when falor times the layers (keep_latency=... or "
                             "acceptance='faster'), which this config does not: drop it or add one of those")

    def _check_sequential(self) -> None:
        """Refuse what a block walk cannot honour, and its options without it (the message names the option)."""
        blocks, spill_dir = check_walk_options(self.sequential, self.blocks, self.spill_dir)
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "spill_dir", spill_dir)
        if not self.sequential:
            return
        if self.mode == "final-output":
            raise ValueError("sequential=True decomposes block by block; final-output thresholds (nsr_final_threshold"
                             " / kl_final_threshold) measure each layer at the whole model's output: use "
                             "nsr_threshold or keep_params / keep_macs with sequential=True")
        if self.keep_latency is not None or self.acceptance == "faster":
            raise ValueError("sequential=True does not time layers: keep_latency and acceptance='faster' need "
                             "sequential=False")
        if self.loss_fn is not None or self.budget_criterion == "output":
            raise ValueError("sequential=True allocates a budget by layer NSR (a loss or output gradient needs a "
                             "backward pass through the whole model): drop loss_fn / budget_criterion='output', or "
                             "use sequential=False")

    @property
    def mode(self) -> str:
        """``"local"``, ``"budget"`` or ``"final-output"``: final-output thresholds, else a budget, else local."""
        if self.nsr_final_threshold is not None or self.kl_final_threshold is not None:
            return "final-output"
        return "budget" if self.budget is not None else "local"

    @property
    def budget(self) -> tuple[str, float] | None:
        """Budget mode's ``("params", keep_params)``, ``("macs", keep_macs)`` or ``("latency", keep_latency)``;
        None in the other modes."""
        for measure in ("params", "macs", "latency"):
            keep = getattr(self, f"keep_{measure}")
            if keep is not None:
                return measure, keep
        return None

    @property
    def accepts_by_speed(self) -> bool:
        """Whether a layer is factorized only where that is measured faster (``acceptance``)."""
        return self.acceptance == "faster" or (self.acceptance == "auto" and self.keep_latency is not None)

    @property
    def measures_latency(self) -> bool:
        """Whether falor times the layers (a latency budget or acceptance by speed): one example batch kept."""
        return self.accepts_by_speed or self.keep_latency is not None

    @property
    def needs_sensitivity(self) -> bool:
        """Budget mode weighs each layer by how much it moves the final output: one backward pass per batch."""
        return self.mode == "budget" and self.budget_criterion != "nsr" and not self.sequential

    @property
    def kept_batches(self) -> int:
        """Final-output mode measures on its metric batches; budget mode's measured round on the first one."""
        return 0 if self.sequential else self.num_metric_batches

    # ---- the rank rules of every mode, read off the options above ----

    def candidate_ranks(self, site: Site) -> list[int]:
        """The ranks falor may give ``site``, ascending: from ``min_rank``, rounded to ``rank_multiple``, each
        saving parameters and at most ``proportion_threshold`` of the full rank. With ``center`` a bias-free
        layer gets a bias (the mean of the discarded directions), which counts against the saving."""
        from fxdeco.plan import candidate_ranks  # the plan module needs torch; the CLI reads this module without
        return candidate_ranks(site, self.min_rank, self.rank_multiple, self.proportion_threshold, self.center)

    def rank_refusal(self, site: Site, rank: int) -> str | None:
        """Why ``site`` may not be factorized at ``rank`` (see ``fxdeco.plan.rank_refusal``), or None."""
        from fxdeco.plan import rank_refusal
        return rank_refusal(site, rank, self.proportion_threshold, self.center)

    def _refuse_other_modes(self) -> None:
        given = set(self.options())
        selector = next((n for n in MODE_OPTIONS[self.mode] if n in given), None)
        for other, names in MODE_OPTIONS.items():
            ignored = next((n for n in names if n in given), None)
            if other != self.mode and ignored is not None:
                chooser = f"{selector} selects falor's {self.mode} mode" if selector is not None else \
                    "falor runs in its local mode (no keep_params/keep_macs nor final-output threshold was given)"
                raise ValueError(f"{chooser}, which ignores {ignored} (an option of its {other} mode); drop one of "
                                 "them")
