"""How much each site's output matters downstream: output-gradient second moments.

For a random projection ``s = Σ u ⊙ f(x)`` of the model's final output ``f``
(``u`` standard normal), the gradient ``g = ∂s/∂y`` at a site's output ``y``
satisfies ``E_u[g gᵀ] = J Jᵀ`` (``J`` the Jacobian of the final output with
respect to ``y``). Accumulating ``G = Σ g gᵀ`` over rows and batches therefore
gives, for any small change ``δ`` of that site's output with covariance ``Σ_δ``,
the predicted increase of the final output's squared error ``tr(G Σ_δ)`` —
for every site at once, from one backward pass per batch.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.fx
import torch.utils._pytree as pytree

from passes.sites import Site
from passes.sites import has_side_effects
from passes.stats import output_rows


def first_tensor(output: Any) -> torch.Tensor:
    """The first tensor in a (possibly nested) model output."""
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise TypeError(f"the model output ({type(output).__name__}) holds no floating-point tensor; pass output_fn=...")


def _autograd_usable(value: Any) -> Any:
    """A copy of an inference-mode tensor (autograd refuses those), anything else as is."""
    if isinstance(value, torch.Tensor) and value.is_inference():
        return value.clone()
    return value


class SensitivityInterpreter(torch.fx.Interpreter):
    """Run the graph with autograd and accumulate ``Σ g gᵀ`` at every site's output.

    Example:
        >>> from passes.sites import find_sites
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)))
        >>> sites, _ = find_sites(gm)
        >>> interp = SensitivityInterpreter(gm, sites, generator=torch.Generator().manual_seed(0))
        >>> _ = interp.run(torch.randn(5, 4))
        >>> interp.moments["0"].shape, interp.samples
        (torch.Size([3, 3]), 5)
    """

    def __init__(self, gm: torch.fx.GraphModule, sites: Iterable[Site],
                 output_fn: Callable[[Any], torch.Tensor] = first_tensor,
                 generator: torch.Generator | None = None, moments: dict[str, torch.Tensor] | None = None,
                 output_scale: torch.Tensor | None = None, defer_commit: bool = False,
                 random_projection: bool = True) -> None:
        super().__init__(gm)
        # False: differentiate the sum of output_fn's value itself (a scalar loss: the moments are then the
        # loss gradient's, an empirical Fisher at each site's output)
        self.random_projection = random_projection
        # like passes.stats.StatsInterpreter: a batch's moments are added once its backward pass has finished
        # (by commit(), called at the end of run() unless defer_commit)
        self.defer_commit = defer_commit
        self.pending: list[tuple[Site, torch.Tensor]] = []
        self.pending_samples = 0
        # Scales the projection per output element: E[(uᵀδ)²] = Σ scale² δ², so the moments predict a
        # weighted error (e.g. ptdeco's per-channel NSR, with scale² = 1 / (channels · (var_c + eps))).
        self.output_scale = output_scale
        self.sites = {s.node: s for s in sites}
        # site outputs that an in-place op later changes (ReLU(inplace=True) right after a Linear): the tensor
        # differentiated against must keep the site's value, so the graph goes on with a copy
        self.mutated = {n.name for n in gm.graph.nodes if n.name in self.sites
                        and any(has_side_effects(u) and u.args and u.args[0] is n for u in n.users)}
        self.output_fn = output_fn
        self.generator = generator
        self.moments = moments if moments is not None else {}
        self.samples = 0
        self._outputs: list[tuple[Site, torch.Tensor]] = []

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self._outputs = []
        self.pending, self.pending_samples = [], 0
        frozen = [p for p in self.module.parameters() if p.requires_grad]
        for p in frozen:  # gradients are wanted at site outputs only, not for the weights
            p.requires_grad_(False)
        try:
            # Gradients even when the caller runs under torch.inference_mode(); its inference tensors cannot take
            # part in autograd, so the inputs are copied out of it first.
            with torch.inference_mode(False), torch.enable_grad():
                args = tuple(_autograd_usable(a) for a in args)
                kwargs = {k: _autograd_usable(v) for k, v in kwargs.items()}
                out = super().run(*args, **kwargs)
                self._backward(out)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        if not self.defer_commit:
            self.commit()
        return out

    def commit(self) -> None:
        """Add the finished batch's gradient moments to ``moments``."""
        for site, product in self.pending:
            moment = self.moments.get(site.target)
            if moment is None:
                moment = self.moments[site.target] = torch.zeros(site.out_features, site.out_features,
                                                                 dtype=torch.float64)
            moment += product.to(device="cpu", dtype=torch.float64)
        self.samples += self.pending_samples
        self.pending, self.pending_samples = [], 0

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        site = self.sites.get(n.name)
        if site is not None and isinstance(out, torch.Tensor):
            if not out.requires_grad:
                out.requires_grad_()  # a leaf: nothing upstream needs gradients
            self._outputs.append((site, out))
            if n.name in self.mutated:
                out = out.clone()
        return out

    def _backward(self, out: Any) -> None:
        # ``out`` is already the model's output structure: Interpreter.run rebuilds it (process_outputs),
        # so rebuilding it again would nest a ModelOutput inside its own first field.
        final = self.output_fn(out)
        if not self._outputs or not final.requires_grad:
            return
        u = torch.randn(final.shape, generator=self.generator, dtype=final.dtype).to(final.device) \
            if self.random_projection else torch.ones_like(final)
        if self.output_scale is not None:
            u = u * self.output_scale.to(device=final.device, dtype=final.dtype)
        grads = torch.autograd.grad((final * u).sum(), [y for _, y in self._outputs], allow_unused=True)
        for (site, _), g in zip(self._outputs, grads):
            if g is None:
                continue
            # the product in the gradient's own precision (float32 at least) and on its device; the sum in float64
            rows = output_rows(site, g.detach())
            rows = rows.to(torch.float64 if rows.dtype == torch.float64 else torch.float32)
            self.pending.append((site, rows.T @ rows))
        self.pending_samples += final.shape[0] if final.dim() > 0 else 1
        self._outputs = []
