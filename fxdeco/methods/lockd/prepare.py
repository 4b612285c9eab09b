"""``lockd.prepare``: add a trainable gated factored branch beside every Linear/Conv2d of the graph.

The rewrite works on a copy of the captured graph (the caller's model is never
touched) and is all-or-nothing: if anything fails, nothing is returned. The
result's outputs are bit-identical to the original's; only branch weights and
gate logits require gradients.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
import torch.fx
from torch import nn

from fxdeco.capture import trace
from fxdeco.errors import NoSitesError
from fxdeco.metadata import capture_record
from fxdeco.methods.lockd.config import Lockd
from fxdeco.methods.lockd.branch import GumbelGate, LockdBranch, full_rank, svd_factors
from fxdeco.plan import matches_any, warn_unmatched_patterns
from passes import Site, SkippedSite, find_sites, remove_dead_sites
from passes.capture import copy_graph
from passes.chains import insert_parallel_chain
from passes.rewrite import factor_layers
from passes.sites import fetch_attr

log = logging.getLogger(__name__)

# Gate logits start at 3, as in ptdeco: a Gumbel-sigmoid gate at temperature 0.5
# is then closed in only 5% of samples, so an SVD-initialised branch starts
# close to exact. What ptdeco lacks is a learning rate for the logits of their
# own (``lockd.train``'s ``logit_lr``); with the weights' 1e-3 they never reach 0
# in a short run.
ROLE = "lockd"


@dataclasses.dataclass
class LockdState:
    """What ``prepare`` records in ``gm.meta["lockd"]`` for the losses, ``train`` and ``finalize``."""

    nsr_threshold: float
    init: str
    conv_order: str
    sites: list[Site]
    skipped: list[SkippedSite]
    removed: list[str]
    params_original: int
    capture: str
    branch_paths: dict[str, str]  # layer target -> qualified name of its LockdBranch
    macs_per_sample: float | None = None  # of the original model, filled by ``train``'s first batch
    steps_trained: int = 0


def _layer_weight(gm: torch.fx.GraphModule, site: Site) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = fetch_attr(gm, site.weight).detach()
    if site.weight_transposed:  # addmm keeps the matrix as (in, out)
        weight = weight.t()
    bias = fetch_attr(gm, site.bias).detach() if site.bias else None
    return weight, bias


def build_branch(gm: torch.fx.GraphModule, site: Site, calls: int, *, init: str, conv_order: str,
                 init_logit: float, temperature: float) -> LockdBranch:
    """The branch of one layer, on its weight's device and dtype, at full rank."""
    weight, bias = _layer_weight(gm, site)
    rank = full_rank(site.weight_shape, site.kind, conv_order)
    # built in the default dtype, then moved: the random initialisation does not depend on the layer's dtype
    first, second = factor_layers(site, rank, order=conv_order, bias=bias is not None).to(weight.device, weight.dtype)
    if init == "svd":
        a, b = svd_factors(weight.reshape(site.weight_shape), site.kind, conv_order)
        with torch.no_grad():
            first.weight.copy_(a.reshape(first.weight.shape))
            second.weight.copy_(b.reshape(second.weight.shape))
            if bias is not None:
                second.bias.copy_(bias)
    # a Conv2d's channels are dim -3: of (N, C, H, W) and of an unbatched (C, H, W), whose dim 1 is the height
    gate = GumbelGate(rank, -1 if site.kind == "linear" else -3, init_logit, temperature).to(weight.device)
    return LockdBranch(site.target, site.kind, conv_order, first, second, gate, calls)


def _branch_path(gm: torch.fx.GraphModule, target: str) -> str:
    path = f"{target}_lockd"
    while True:  # a model may already own an attribute of that name
        prefix, _, name = path.rpartition(".")
        try:
            owner = gm.get_submodule(prefix) if prefix else gm
        except AttributeError:
            return path
        if not hasattr(owner, name):
            return path
        path += "_"


def prepare(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    skip: Iterable[str] = Lockd.skip,
    init: str = Lockd.init,
    nsr_threshold: float = Lockd.nsr_threshold,
    conv_order: str = Lockd.conv_order,
    init_logit: float = Lockd.init_logit,
    temperature: float = Lockd.temperature,
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
    capture: str = "auto",
) -> torch.fx.GraphModule:
    """Capture ``model`` and add a gated factored branch beside each Linear/Conv2d layer.

    Each layer ``y = W x + b`` gets ``first`` (in -> r), a gate per intermediate
    channel and ``second`` (r -> out, with the bias) at full rank ``r``; convs
    use a 1x1 conv then the layer's kxk geometry (``conv_order="1x1-first"``, as
    ptdeco) or the kxk conv then a 1x1 (``"kxk-first"``, as falor). ``init="svd"``
    starts every branch as an exact factorization of ``W``; ``"random"`` uses
    PyTorch's default initialisation, as ptdeco. The returned graph passes the
    ORIGINAL outputs on, so it computes what the model computed; each branch
    records its per-channel NSR against its layer's output. ``nsr_threshold``
    (tau) is the NSR each branch may reach before :func:`fxdeco.methods.lockd.nsr_loss`
    pushes back. Original parameters are frozen (``requires_grad=False``);
    ``skip`` holds glob patterns of layers to leave alone. The graph is
    returned in eval mode; :func:`fxdeco.methods.lockd.train` switches the branches to
    training mode itself (for your own loop, see :func:`fxdeco.methods.lockd.train_mode`).

    Example:
        >>> import torch
        >>> from fxdeco import lockd
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> gm = lockd.prepare(model, nsr_threshold=0.05)
        >>> x = torch.randn(5, 8)
        >>> torch.equal(gm(x), model(x))
        True
        >>> sorted(lockd.branches(gm))
        ['0', '2']
    """
    Lockd(init=init, conv_order=conv_order, nsr_threshold=nsr_threshold, init_logit=init_logit,
          temperature=temperature, skip=skip)  # the options' one check (fxdeco.Lockd)
    if isinstance(model, torch.fx.GraphModule) and "lockd" in model.meta:
        raise ValueError("this GraphModule is already prepared for lockd; train it, then call lockd.finalize(gm)")
    params_original = sum(p.numel() for p in model.parameters())
    gm = copy_graph(trace(model, example_inputs, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                          capture=capture))
    removed = remove_dead_sites(gm)
    sites, skipped = find_sites(gm)
    warn_unmatched_patterns("skip", skip, [*(s.target for s in sites), *(k.target for k in skipped), *removed])
    skipped += [SkippedSite(s.node, s.target, "skipped by pattern") for s in sites if matches_any(s.target, skip)]
    sites = [s for s in sites if not matches_any(s.target, skip)]
    if not sites:
        reasons = "; ".join(f"{k.target}: {k.reason}" for k in skipped[:5]) or "no Linear or Conv2d layer found"
        raise NoSitesError(f"{type(model).__name__} has no Linear/Conv2d layer lockd can train a branch for "
                           f"({reasons})")
    for p in gm.parameters():
        p.requires_grad_(False)

    by_target: dict[str, list[Site]] = defaultdict(list)
    for s in sites:
        by_target[s.target].append(s)
    nodes = {n.name: n for n in gm.graph.nodes}
    paths: dict[str, str] = {}
    for target, group in by_target.items():
        branch = build_branch(gm, group[0], len(group), init=init, conv_order=conv_order, init_logit=init_logit,
                              temperature=temperature)
        paths[target] = _branch_path(gm, target)
        gm.add_submodule(paths[target], branch)
        for i, s in enumerate(group):
            chain = [f"{paths[target]}.{part}" for part in ("first", "gate", "second")]
            insert_parallel_chain(gm, nodes[s.node], chain, f"{paths[target]}.taps.{i}", role=ROLE)
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    gm.meta["lockd"] = LockdState(float(nsr_threshold), init, conv_order, sites, skipped, removed, params_original,
                                  capture_record(gm).kind, paths)
    log.info("lockd: %d branches (%s init, %s convs), %d layers skipped, %d dead", len(paths), init, conv_order,
             len(skipped), len(removed))
    return gm


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel/DataParallel wrapper (or ``model`` itself)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def lockd_state(model: nn.Module) -> LockdState:
    """``gm.meta["lockd"]``, or a clear error when ``model`` was not prepared by :func:`prepare`."""
    gm = unwrap(model)
    state = getattr(gm, "meta", {}).get("lockd") if isinstance(gm, torch.fx.GraphModule) else None
    if state is None:
        raise ValueError(f"{type(gm).__name__} was not prepared for lockd; call gm = fxdeco.lockd.prepare(model) "
                         "first (and lockd.finalize on the trained result)")
    return state


def branches(model: nn.Module) -> dict[str, LockdBranch]:
    """Layer name -> its :class:`LockdBranch`, in graph order, of a prepared graph (or DDP around one).

    Example:
        >>> import torch
        >>> from fxdeco import lockd
        >>> gm = lockd.prepare(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)))
        >>> lockd.branches(gm)["0"].rank
        3
    """
    state = lockd_state(model)
    gm = unwrap(model)
    return {target: gm.get_submodule(path) for target, path in state.branch_paths.items()}


def train_mode(model: nn.Module, mode: bool = True) -> nn.Module:
    """Branches in training mode (Gumbel gates), the original layers in eval mode; returns ``model``.

    The original layers are frozen: BatchNorm must keep its running statistics
    and dropout must stay off, or the targets the branches learn would drift.
    ``mode=False`` puts everything in eval mode (hard gates).

    Example:
        >>> import torch
        >>> from fxdeco import lockd
        >>> gm = lockd.train_mode(lockd.prepare(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout())))
        >>> gm.training, gm.get_submodule("1").training, lockd.branches(gm)["0"].gate.training
        (False, False, True)
    """
    unwrap(model).eval()
    for branch in branches(model).values():
        branch.train(mode)
    return model
