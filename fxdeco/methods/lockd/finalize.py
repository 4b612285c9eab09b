"""``lockd.finalize``: turn a trained prepared graph into a decomposed model.

Per layer, the channels whose gate logit is positive are kept (at least the
strongest one). The layer is replaced by its pruned branch when the kept share
of channels is under ``proportion_threshold`` and the branch has fewer
parameters than the layer; otherwise the original layer stays. Either way the
branch disappears from the graph.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.fx
from torch import nn

from fxdeco.methods.lockd.branch import LockdBranch
from fxdeco.methods.lockd.prepare import ROLE, LockdState, branches, lockd_state, unwrap
from fxdeco.metadata import FactorInfo, ModelRecord, capture_record, mark_factored, set_model_record
from fxdeco.methods.lockd.config import Lockd
from fxdeco.plan import LayerDecision
from passes import Site
from passes.capture import copy_graph
from passes.chains import remove_parallel_chain, replace_sites_with_chains

log = logging.getLogger(__name__)


def _pruned(module: nn.Module, kept: torch.Tensor, dim: int) -> nn.Module:
    """A copy of a Linear/Conv2d keeping only channels ``kept`` of its output (dim 0) or input (dim 1)."""
    new = copy.deepcopy(module)
    weight = module.weight.detach().index_select(dim, kept.to(module.weight.device)).clone()
    new.weight = nn.Parameter(weight)
    attr = ("out_features" if dim == 0 else "in_features") if isinstance(module, nn.Linear) else \
        ("out_channels" if dim == 0 else "in_channels")
    setattr(new, attr, len(kept))
    return new


def pruned_chain(branch: LockdBranch) -> nn.Sequential:
    """``Sequential(first, second)`` of ``branch`` with the closed channels removed."""
    kept = branch.kept_channels()
    chain = nn.Sequential(_pruned(branch.first, kept, 0), _pruned(branch.second, kept, 1))
    for p in chain.parameters():
        p.requires_grad_(True)
    return chain


def _macs(branch: LockdBranch, site: Site, channels: int | None) -> float | None:
    """MACs per sample of the layer (``channels=None``) or of its branch with ``channels`` kept, over all calls."""
    out_positions = [tap.positions for tap in branch.taps]
    if not all(out_positions):
        return None  # never run: no shapes known
    if channels is None:
        return sum(p * site.in_features * site.out_features for p in out_positions)
    first = branch.gate.positions * channels * branch.first.weight[0].numel()
    return sum(first + p * channels * branch.second.weight[:, 0].numel() for p in out_positions)


def _decide(branch: LockdBranch, site: Site, threshold: float) -> tuple[LayerDecision, FactorInfo]:
    kept = len(branch.kept_channels())
    proportion = kept / branch.rank
    before, after = site.dense_params, branch.factored_params(kept)
    nsrs = [tap.nsr_eval_mean for tap in branch.taps]
    nsr = sum(nsrs) / len(nsrs) if all(v is not None for v in nsrs) else None
    if proportion >= threshold:
        reason = f"kept proportion {proportion:.3f} >= proportion_threshold {threshold:g}"
    elif after >= before:
        reason = f"{kept} of {branch.rank} channels would need {after} params, not fewer than the layer's {before}"
    else:
        reason = "decomposed"
    decomposed = reason == "decomposed"
    dense_macs, branch_macs = _macs(branch, site, None), _macs(branch, site, kept)
    decision = LayerDecision(
        site.target, site.kind, site.weight_shape, branch.rank, kept if decomposed else None,
        nsr if decomposed else None, before, after if decomposed else before,
        dense_macs, branch_macs if decomposed else dense_macs, reason)
    info = FactorInfo(site.target, site.kind, site.weight_shape, kept if decomposed else None, branch.rank, before,
                      decision.params_after,
                      {"method": "lockd", "kept_proportion": proportion, "nsr": nsr, "reason": reason,
                       "conv_order": branch.conv_order if site.kind == "conv2d" else None})
    return decision, info


def _strip(gm: torch.fx.GraphModule, state: LockdState) -> None:
    """Remove every branch node and module from ``gm`` (in place): back to the captured graph."""
    taps = {f"{path}.taps." for path in state.branch_paths.values()}
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.meta.get("chain_role") == ROLE and \
                any(node.target.startswith(t) for t in taps):
            remove_parallel_chain(gm, node)
    for path in state.branch_paths.values():
        prefix, _, name = path.rpartition(".")
        delattr(gm.get_submodule(prefix) if prefix else gm, name)
    gm.graph.lint()
    gm.recompile()


def finalize(model: nn.Module, proportion_threshold: float = Lockd.proportion_threshold) -> torch.fx.GraphModule:
    """Return the decomposed GraphModule of a trained prepared graph (which is left as it was).

    A layer becomes ``Sequential(first, second)`` with its closed channels
    removed when fewer than ``proportion_threshold`` of the channels stay open
    and that has fewer parameters than the layer; otherwise the original layer
    stays. The record of each layer's output node (``fxdeco.metadata.factor_info``) holds its kept
    proportion, NSR (eval-mode, hard gates, from the end of ``train``) and
    params; :func:`fxdeco.report` summarises the model. All parameters of the
    result require gradients again, ready for :func:`fxdeco.train.finetune.finetune`.

    Example:
        >>> import torch, fxdeco
        >>> from fxdeco import lockd
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> gm = lockd.prepare(model)
        >>> with torch.no_grad():
        ...     lockd.branches(gm)["0"].gate.logits[4:] = -1.0   # as if training had closed 12 of 16 gates
        >>> small = lockd.finalize(gm, proportion_threshold=0.5)
        >>> [r["rank"] for r in fxdeco.report(small).rows]
        [4, None]
    """
    gm = unwrap(model)
    state = lockd_state(gm)
    threshold = Lockd(proportion_threshold=proportion_threshold).proportion_threshold
    found = branches(gm)
    decisions, chains, metas = [], {}, {}
    for site in _first_sites(state.sites):
        decision, meta = _decide(found[site.target], site, threshold)
        decisions.append(decision)
        metas[site.target] = meta
        if decision.decomposed:
            chains[site.target] = pruned_chain(found[site.target])
    work = copy_graph(gm)
    _strip(work, state)
    new = replace_sites_with_chains(work, state.sites, chains, metas)
    _kept_meta(new, state.sites, chains, metas)
    for p in new.parameters():
        p.requires_grad_(True)
    new.meta.pop("lockd", None)
    # the optional inputs traced as their defaults go with the plan: load() must trace the same case
    set_model_record(new, _model_record(new, state, decisions, threshold, capture_record(gm).constant_inputs))
    saved = sum(d.params_before - d.params_after for d in decisions)
    log.info("lockd decomposed %d of %d layers (%d parameters saved)", len(chains), len(decisions), saved)
    return new


def _first_sites(sites: list[Site]) -> list[Site]:
    seen: dict[str, Site] = {}
    for s in sites:
        seen.setdefault(s.target, s)
    return list(seen.values())


def _kept_meta(gm: torch.fx.GraphModule, sites: list[Site], chains: dict, metas: dict) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for s in sites:
        if s.target not in chains and s.node in nodes:
            mark_factored(nodes[s.node], metas[s.target])


def _model_record(gm: torch.fx.GraphModule, state: LockdState, decisions: list[LayerDecision],
                  threshold: float, constant_inputs: dict[str, object]) -> ModelRecord:
    macs_known = state.macs_per_sample is not None and all(d.macs_before is not None for d in decisions)
    saved_macs = sum(d.macs_before - d.macs_after for d in decisions) if macs_known else None
    return ModelRecord(
        method="lockd",
        options={"nsr_threshold": state.nsr_threshold, "proportion_threshold": threshold, "init": state.init,
                 "conv_order": state.conv_order},
        capture=state.capture, decisions=decisions, skipped=list(state.skipped), removed=list(state.removed),
        params_before=state.params_original, params_after=sum(p.numel() for p in gm.parameters()),
        macs_before=state.macs_per_sample if macs_known else None,
        macs_after=state.macs_per_sample - saved_macs if macs_known else None,
        constant_inputs=dict(constant_inputs), summary={"training_steps": state.steps_trained})
