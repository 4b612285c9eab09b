"""passes.replay: ``GraphWalk`` runs a graph forward node by node, holding what a forward pass holds, and
replays only the rest of the graph with some node outputs replaced."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from passes import CostProp, GraphWalk, RecordedRun, flatten_inputs
from tests.models import Residual, residual_batches as _batches

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- moved from test_falor_final.py


def test_replay_equals_forward_with_the_node_changed() -> None:
    model = Residual().eval()
    gm = torch.fx.symbolic_trace(model)
    x, image = _batches(1)[0]
    walk = GraphWalk(gm, flatten_inputs(gm, (x, image), {}))
    walk.advance_to("inp")
    doubled = walk.replay({"inp": lambda y: 2 * y})
    h = torch.relu(2 * model.inp(x))
    h = h + torch.tanh(model.mid(h))
    h = h + torch.tanh(model.mid(h))
    expected = model.out(torch.cat([h, model.conv(image).mean((2, 3))], dim=1))
    torch.testing.assert_close(doubled, expected)
    # the walk itself is unchanged: an empty replay gives the reference output
    torch.testing.assert_close(walk.replay({}), model(x, image))


# ----------------------------------------------------------------------------- moved from test_reliability.py


class InPlaceResidual(nn.Module):
    """``x0`` is changed in place after ``fc1`` reads it: a replay from ``fc1`` must not change the walk's copy."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place
        self.fc0, self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.fc0(x)
        h = self.fc1(x0)
        if self.in_place:
            x0.mul_(2)
        else:
            x0 = x0 * 2
        return self.fc2(h + x0)


def test_graph_walk_replays_are_repeatable_with_in_place_ops() -> None:
    torch.manual_seed(0)
    model = InPlaceResidual(True)
    x = torch.randn(4, 16)
    walk = GraphWalk(torch.fx.symbolic_trace(model), [x])
    walk.advance_to("fc1")
    with torch.no_grad():
        reference = model(x)
        replays = [walk.replay({"fc1": lambda v: v}) for _ in range(3)]
    for out in replays:  # each replay used to double x0 once more in the walk's own copy
        torch.testing.assert_close(out, reference)


# ----------------------------------------------------------------------------- new


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_the_walk_holds_only_values_still_needed() -> None:
    model = _mlp()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 4)
    walk = GraphWalk(gm, [x])
    hidden = walk.advance_to("_0")
    torch.testing.assert_close(hidden, model[0](x))
    assert [n.name for n in walk.env] == ["_0"], "the input was dropped after its last use"
    walk.advance_to("_1")
    assert [n.name for n in walk.env] == ["_1"]
    torch.testing.assert_close(walk.replay({}), model(x))


def test_overrides_of_later_nodes_apply_when_the_replay_reaches_them() -> None:
    model = _mlp()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 4)
    walk = GraphWalk(gm, [x])
    walk.advance_to("_0")
    negated = walk.replay({"_1": lambda h: -h})
    torch.testing.assert_close(negated, model[2](-torch.relu(model[0](x))))
    both = walk.replay({"_0": torch.zeros_like, "_2": lambda y: y + 1})
    torch.testing.assert_close(both, model[2](torch.zeros(3, 8)) + 1)


def test_walks_only_go_forward_to_nodes_that_exist() -> None:
    walk = GraphWalk(torch.fx.symbolic_trace(_mlp()), [torch.randn(2, 4)])
    walk.advance_to("_1")
    with pytest.raises(ValueError, match="already past node '_0'"):
        walk.advance_to("_0")
    with pytest.raises(KeyError, match="no node named 'fc'"):
        walk.advance_to("fc")


def test_replays_count_the_macs_of_the_nodes_they_run() -> None:
    gm = torch.fx.symbolic_trace(_mlp())
    x = torch.randn(3, 4)
    CostProp(gm).run(x)  # records node.meta["cost"]
    walk = GraphWalk(gm, flatten_inputs(gm, (x,), {}))
    walk.advance_to("_0")
    walk.replay({"_0": torch.zeros_like})
    assert walk.replayed_macs == 3 * 2 * 8  # the second Linear only: the first had already run
    walk.replay({})
    assert walk.replayed_macs == 2 * 3 * 2 * 8


# ----------------------------------------------------------------------------- RecordedRun (dwain's replays)


def test_a_recorded_run_replays_from_any_start_in_any_order() -> None:
    model = Residual().eval()
    gm = torch.fx.symbolic_trace(model)
    x, image = _batches(1)[0]
    starts = ["inp", "mid", "mid_1", "conv", "out"]
    run = RecordedRun(gm, flatten_inputs(gm, (x, image), {}), starts)
    with torch.no_grad():
        torch.testing.assert_close(run.result, model(x, image))
        for start in reversed(starts):  # last first, as dwain goes
            walk = GraphWalk(gm, flatten_inputs(gm, (x, image), {}))
            walk.advance_to(start)
            changed = {start: lambda y: 0.5 * y, "out": lambda y: y + 1}
            torch.testing.assert_close(run.replay_from(start, changed), walk.replay(changed))
    # it keeps what replays from the starts read, not every activation
    assert len(run.env) < len(list(gm.graph.nodes))
    with pytest.raises(ValueError, match="not among the starts"):
        run.replay_from("tanh", {})


def test_a_recorded_run_survives_in_place_ops() -> None:
    torch.manual_seed(0)
    model = InPlaceResidual(True)
    x = torch.randn(4, 16)
    with torch.no_grad():
        reference = model(x)
        run = RecordedRun(torch.fx.symbolic_trace(model), [x], ["fc0", "fc1"])
        for _ in range(3):  # x0 doubled in place must double a copy, every time
            torch.testing.assert_close(run.replay_from("fc1", {"fc1": lambda v: v}), reference)
            torch.testing.assert_close(run.replay_from("fc0", {}), reference)


def test_a_replacement_computes_a_node_from_its_input_instead_of_running_it() -> None:
    model = _mlp()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 4)
    run = RecordedRun(gm, [x], ["_0", "_2"])
    half = model[0].weight.detach() * 0.5
    with torch.no_grad():
        # the first layer with half its weight, computed from the recorded input x (the start itself replaced)
        replaced = run.replay_from("_0", {}, {"_0": ("input_1", lambda v: v @ half.T + model[0].bias)})
        expected = model[2](torch.relu(x @ half.T + model[0].bias))
        torch.testing.assert_close(replaced, expected)
        # a replacement further down applies when the replay reaches it
        zeroed = run.replay_from("_0", {}, {"_2": ("_1", lambda v: torch.zeros(v.shape[0], 2))})
        assert torch.equal(zeroed, torch.zeros(3, 2))
