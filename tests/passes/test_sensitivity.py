"""passes.sensitivity: ``SensitivityInterpreter`` accumulates ``Σ g gᵀ`` of the final output's random-projection
gradient at every site's output, from one backward pass per batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxdeco
from passes import SensitivityInterpreter, find_sites
from passes.sensitivity import first_tensor

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- moved from test_budget.py


def test_output_gradient_moment_is_the_jacobian_gram() -> None:
    """For f = W2 (W1 x), the gradient at W1's output is W2ᵀ u, so E[g gᵀ] = W2ᵀ W2 per row."""
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 3, bias=False)).double()
    gm = fxdeco.trace(model)
    sites, _ = find_sites(gm)
    interp = SensitivityInterpreter(gm, sites, generator=torch.Generator().manual_seed(0))
    for _ in range(20):
        interp.run(torch.randn(500, 6, dtype=torch.float64))
    w2 = model[1].weight.detach()
    torch.testing.assert_close(interp.moments["0"] / interp.samples, w2.T @ w2, rtol=0.05, atol=0.02)
    assert all(p.requires_grad for p in model.parameters())  # weights' flags restored


# ----------------------------------------------------------------------------- new


def _two_layers() -> tuple[torch.fx.GraphModule, list]:
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double())
    return gm, find_sites(gm)[0]


def test_the_output_scale_weights_the_projection() -> None:
    """``u`` scaled by ``s`` per output element: the same draws give moments scaled by ``s²``."""
    gm, sites = _two_layers()
    x = torch.randn(6, 4, dtype=torch.float64)
    plain = SensitivityInterpreter(gm, sites, generator=torch.Generator().manual_seed(1))
    scaled = SensitivityInterpreter(gm, sites, generator=torch.Generator().manual_seed(1),
                                    output_scale=torch.tensor([3.0, 3.0], dtype=torch.float64))
    plain.run(x)
    scaled.run(x)
    assert plain.moments.keys() == scaled.moments.keys() == {"0", "2"}
    assert plain.moments["2"].shape == (2, 2) and plain.samples == scaled.samples == 6
    for name in plain.moments:
        torch.testing.assert_close(scaled.moments[name], 9 * plain.moments[name], rtol=1e-12, atol=0)


def test_deferred_moments_are_added_by_commit_and_work_under_inference_mode() -> None:
    gm, sites = _two_layers()
    interp = SensitivityInterpreter(gm, sites, generator=torch.Generator().manual_seed(0), defer_commit=True)
    with torch.inference_mode():
        out = interp.run(torch.randn(5, 4, dtype=torch.float64))
    assert out.shape == (5, 2)
    assert interp.moments == {} and interp.samples == 0 and interp.pending
    interp.commit()
    assert interp.samples == 5 and not interp.pending
    for name, moment in interp.moments.items():
        assert moment.dtype == torch.float64
        torch.testing.assert_close(moment, moment.T)  # Σ g gᵀ is symmetric ...
        assert float(torch.linalg.eigvalsh(moment)[0]) > -1e-12  # ... and positive semi-definite
    assert all(p.requires_grad for p in gm.parameters())


def test_first_tensor_finds_the_first_floating_point_leaf() -> None:
    logits = torch.randn(2, 3)
    assert first_tensor({"ids": torch.tensor([1, 2]), "out": (logits, torch.randn(2))}) is logits
    with pytest.raises(TypeError, match="holds no floating-point tensor; pass output_fn"):
        first_tensor((torch.tensor([1, 2]), "text"))


def test_without_a_random_projection_the_moments_are_the_scalar_loss_gradients() -> None:
    from passes.sites import find_sites

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    gm = torch.fx.symbolic_trace(model)
    sites, _ = find_sites(gm)
    x = torch.randn(5, 4)
    interp = SensitivityInterpreter(gm, sites, output_fn=lambda out: out.square().mean(), random_projection=False)
    interp.run(x)
    hidden = model[0](x).detach().requires_grad_()
    (grad,) = torch.autograd.grad(model[2](torch.tanh(hidden)).square().mean(), hidden)
    torch.testing.assert_close(interp.moments["0"], (grad.T @ grad).double())
    assert interp.samples == 1  # a scalar: one sample per batch
