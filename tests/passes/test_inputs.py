"""passes.inputs: a call's ``(args, kwargs)`` flattened to the placeholder values an Interpreter takes, for
symbolically traced graphs (bound to ``forward``'s signature) and exported ones (the pytree input spec)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from passes import export_capture, flatten_inputs


class _Affine(nn.Module):
    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
        return x * scale + shift


class _Many(nn.Module):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return xs[0] - xs[1]


def run_flat(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> torch.Tensor:
    return torch.fx.Interpreter(gm).run(*flatten_inputs(gm, args, kwargs))


@pytest.mark.parametrize("call, scale", [
    (lambda x, s: ((), {"x": x, "shift": s}), 2.0),
    (lambda x, s: ((x,), {"shift": s, "scale": 3.0}), 3.0),
    (lambda x, s: ((x, s, 0.5), {}), 0.5),
], ids=["keywords", "mixed", "positional"])
def test_symbolic_round_trip_equals_the_call(call, scale: float) -> None:
    gm = torch.fx.symbolic_trace(_Affine())
    x, s = torch.randn(2, 3), torch.randn(2, 3)
    args, kwargs = call(x, s)
    flat = flatten_inputs(gm, args, kwargs)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "shift", "scale"]
    assert len(flat) == 3 and flat[0] is x and flat[1] is s and flat[2] == scale  # placeholder order, defaults in
    torch.testing.assert_close(run_flat(gm, args, kwargs), x * scale + s)


def test_var_positional_inputs_are_spread() -> None:
    gm = torch.fx.symbolic_trace(_Many())
    a, b = torch.randn(3), torch.randn(3)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["*xs"]
    assert flatten_inputs(gm, (a, b), {}) == [a, b]
    torch.testing.assert_close(run_flat(gm, (a, b), {}), a - b)


def test_symbolic_inputs_that_do_not_bind_name_the_graph_inputs() -> None:
    gm = torch.fx.symbolic_trace(_Affine())
    with pytest.raises(TypeError, match=r"inputs do not match the graph's inputs \['x', 'shift', 'scale'\]"):
        flatten_inputs(gm, (torch.randn(1),), {"offset": torch.randn(1)})


def test_export_round_trip_and_a_call_of_another_structure() -> None:
    model = _Affine()
    gm = export_capture(model, (torch.randn(2, 3),), {"shift": torch.randn(2, 3)})
    x, s = torch.randn(4, 3), torch.randn(4, 3)
    flat = flatten_inputs(gm, (x,), {"shift": s})
    assert len(flat) == 2 and flat[0] is x and flat[1] is s
    torch.testing.assert_close(run_flat(gm, (x,), {"shift": s}), model(x, s))
    with pytest.raises(TypeError, match=r"expected 1 positional input\(s\) and keywords \['shift'\], "
                                        r"got 2 positional input\(s\) and keywords \[\]"):
        flatten_inputs(gm, (x, s), {})
