"""``fxdeco.Dwain``: every option of dwain, its default, its range and its meaning, in one place."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from fxdeco.checks import check_count, check_damping, check_flag, check_number, check_patterns, check_walk_options
from fxdeco.methods.base import MethodConfig

if TYPE_CHECKING:
    import torch
    import torch.fx

    from passes import Site

# loss_fn(output, batch) -> scalar tensor: ``output`` is the model's output as it returns it, ``batch`` the
# loader's batch before input_fn (so a next-token loss can read its targets from it)
LossFn = Callable[[Any, Any], "torch.Tensor"]
# finetune_fn(graph, decomposed_names) -> graph or None: called after each accepted layer
FinetuneFn = Callable[["torch.fx.GraphModule", list[str]], "torch.fx.GraphModule | None"]


@dataclasses.dataclass(frozen=True)
class Dwain(MethodConfig):
    """dwain (Decomposing Weights Algorithm, an Iterative techNique): loss-aware ranks, layer by layer, last first.

    Each layer, from the last to the first, is tried at ranks ``full *
    reduction_factor^i`` down to ``min_rank`` against the *current* model (the
    layers after it already decomposed). On the metric batches, a rank is
    accepted when the relative perplexity increase ``ppl_diff = (exp(loss') −
    exp(loss)) / exp(loss)`` is below ``trade_off_factor × (parameters it
    removes / the model's parameters)`` and below ``max_accepted_ppl_diff``,
    and the final-output NSR is below ``nsr_final_threshold``; the smallest
    accepted rank wins. That NSR is ptdeco's dwain's: every dimension of the
    output but the last is a sample and the last holds the channels (a
    ``(batch, tokens, vocab)`` output's tokens are samples; an NCHW output's
    columns are its channels), not falor's final-output NSR, which takes each
    element of a sample as a channel: the two differ on outputs of more than
    two dimensions. ptdeco's method and meaning; here every probe replays
    only the graph after the layer, ranks predicted to fail (from the
    loss's own gradient moments) are not measured, and a rank whose first
    metric batch is already twice over its threshold is not measured further.

    Example:
        >>> import torch, fxdeco
        >>> def loss_fn(output, batch):
        ...     return torch.nn.functional.cross_entropy(output, batch[1])
        >>> config = fxdeco.Dwain(loss_fn, trade_off_factor=1.0, min_rank=4)
        >>> config.name, config.needs_sensitivity
        ('dwain', False)
        >>> fxdeco.Dwain(loss_fn, reduction_factor=1.5)
        Traceback (most recent call last):
        ...
        ValueError: reduction_factor must be a number in (0.0, 1.0), got 1.5
    """

    name: ClassVar[str] = "dwain"

    # the loss whose perplexity exp(loss) is compared: loss_fn(output, batch) -> scalar tensor (see LossFn)
    loss_fn: LossFn | None = None
    # a rank is accepted while ppl_diff < trade_off_factor * (parameters removed / model parameters) ...
    trade_off_factor: float = 0.5
    # ... and ppl_diff < max_accepted_ppl_diff, and the final-output NSR (against the current model, every output
    # dimension but the last as samples: ptdeco's dwain, not falor's per-element channels) is below this
    max_accepted_ppl_diff: float = 0.1
    nsr_final_threshold: float = math.inf
    # candidate ranks: full_rank * reduction_factor**i, i = 1, 2, ..., down to min_rank
    reduction_factor: float = 0.5
    min_rank: int = 32
    # calibration batches the perplexity and NSR are measured on (the first ones of the calibration loader)
    num_metric_batches: int = 2
    # measure only ranks whose predicted ppl_diff (from the loss gradient's moments) can pass, and stop measuring
    # one whose first metric batch alone is twice over its threshold; False measures every rank on every batch up
    # to the first that passes (ptdeco's decisions exactly)
    predict: bool = True
    # called after each accepted layer with the current graph and the names decomposed so far (ptdeco's
    # finetune_fn, e.g. a few LoRA steps); it may train the graph in place or return a new one
    finetune_fn: FinetuneFn | None = None
    # eigenvalue damping (a fraction of the mean eigenvalue; ptdeco: 1%), and centring of the output covariance
    # (falor's addition: the mean of the discarded directions folded into the bias; False is ptdeco's projection)
    damping: float = 0.01
    center: bool = True
    # glob patterns of layer names kept dense (ptdeco's blacklist, typically ["lm_head"])
    skip: tuple[str, ...] = ()
    # one block at a time (transformer layers, ResNet blocks), first to last, each calibrated on the outputs of the
    # blocks already decomposed (fxdeco.methods.dwain.sequential): the memory of one block's statistics; within a
    # block the layers go last first, and every probe runs the rest of the model from the block's cached inputs.
    # Every candidate rank is measured (the loss-gradient screen needs a backward pass through the whole model);
    # runs in fxdeco.transform / fxdeco.decompose_ (they walk the loader's batches themselves)
    sequential: bool = False
    # sequential mode: the blocks, as qualified module names (None: each layer's name cut after its first numeric
    # component), and a writable directory for the batches' cached block inputs (None: host memory)
    blocks: tuple[str, ...] | None = None
    spill_dir: str | None = None
    # a progress bar (None: on a terminal; elsewhere periodic lines)
    show_progress: bool | None = None

    def __post_init__(self) -> None:
        if self.loss_fn is None:
            raise TypeError("dwain needs loss_fn(output, batch) -> scalar loss: fxdeco.Dwain(loss_fn=...), e.g. "
                            "next-token cross-entropy for a language model")
        if not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be a function (output, batch) -> scalar, got {type(self.loss_fn).__name__}")
        if self.finetune_fn is not None and not callable(self.finetune_fn):
            raise TypeError(f"finetune_fn must be a function (graph, decomposed_names), got "
                            f"{type(self.finetune_fn).__name__}")
        check_number("trade_off_factor", self.trade_off_factor, high=math.inf)
        check_number("max_accepted_ppl_diff", self.max_accepted_ppl_diff, high=math.inf)
        check_number("nsr_final_threshold", self.nsr_final_threshold, high=math.inf)
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, (int, float)) \
                or not 0 < self.reduction_factor < 1:
            raise ValueError(f"reduction_factor must be a number in (0.0, 1.0), got {self.reduction_factor!r}")
        object.__setattr__(self, "min_rank", check_count("min_rank", self.min_rank))
        object.__setattr__(self, "num_metric_batches", check_count("num_metric_batches", self.num_metric_batches))
        if not isinstance(self.predict, bool):
            raise TypeError(f"predict must be True or False, got {self.predict!r}")
        object.__setattr__(self, "damping", check_damping(self.damping))
        object.__setattr__(self, "skip", check_patterns("skip", self.skip))
        check_flag("center", self.center)
        check_flag("predict", self.predict)
        check_flag("show_progress", self.show_progress, optional=True)
        check_flag("sequential", self.sequential)
        blocks, spill_dir = check_walk_options(self.sequential, self.blocks, self.spill_dir)
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "spill_dir", spill_dir)
        if self.sequential and self.finetune_fn is not None:
            raise ValueError("dwain's finetune_fn trains the whole graph after each layer, which a block walk (its "
                             "later blocks' inputs cached from the model before) cannot follow: drop finetune_fn or "
                             "sequential=True")

    @property
    def kept_batches(self) -> int:
        """The metric batches are the first calibration batches, kept (with the loader's batch for loss_fn)."""
        return self.num_metric_batches

    @property
    def needs_raw_batches(self) -> bool:
        """loss_fn reads the loader's batch as it was yielded (before input_fn): prepare keeps those too."""
        return True

    def candidate_ranks(self, site: Site) -> list[int]:
        """The ranks dwain tries on ``site``, largest first: ``full * reduction_factor^i`` (i >= 1) while at least
        ``min_rank``, then ``min_rank`` itself, each one saving parameters. With ``center`` a bias-free layer's
        factored form carries a bias (the mean of the discarded directions), which counts against the saving.

        Example:
            >>> from passes import Site
            >>> site = Site("fc", "linear", "fc", "fc.weight", None, (512, 256))
            >>> Dwain(lambda o, b: o.sum()).candidate_ranks(site)
            [128, 64, 32]
            >>> Dwain(lambda o, b: o.sum(), min_rank=48).candidate_ranks(site)
            [128, 64, 48]
            >>> bias_free = Site("fc", "linear", "fc", "fc.weight", None, (100, 10))  # 10 -> 100, no bias
            >>> Dwain(lambda o, b: o.sum(), min_rank=8, reduction_factor=0.9).candidate_ranks(bias_free)
            [8]
        """
        from fxdeco.plan import rank_refusal  # the plan module needs torch; the CLI reads this module without
        ranks: list[int] = []
        rank = site.full_rank
        while rank > self.min_rank:
            rank = max(int(rank * self.reduction_factor), self.min_rank)
            ranks.append(rank)
        # the centring bias a bias-free layer gains counts too: rank 9 of a bias-free Linear(10, 100) holds 990
        # weights and 100 bias entries, more than the dense 1000
        return [k for k in ranks if rank_refusal(site, k, 1.0, adds_bias=self.center) is None]
