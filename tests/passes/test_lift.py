"""passes.lift: parameters a Dynamo graph receives as inputs become frozen ``get_attr`` constants named after
their place in the model; buffers, plain tensors and the real inputs stay inputs."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

from passes import find_sites, lift_parameters
from passes.lift import parameter_name
from tests.models import SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- moved from test_backend.py


@pytest.fixture
def _fresh_dynamo():
    """Compile from scratch: Dynamo caches compiled frames per code object."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8)


@pytest.mark.usefixtures("_fresh_dynamo")
def test_lift_names_parameters_after_the_model():
    seen = {}

    def spy(gm, example_inputs):
        seen["lifted"], seen["kept"] = lift_parameters(gm, example_inputs)
        seen["inputs"] = [example_inputs[i] for i in seen["kept"]]
        return gm.forward

    model = SmallCNN().eval()
    x = images(2)
    with torch.no_grad():
        torch.compile(model, backend=spy)(x)
    lifted = seen["lifted"]
    placeholders = [n.target for n in lifted.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(seen["kept"]) == 3  # x and the two BatchNorm running statistics
    assert sum("running" in p for p in placeholders) == 2
    assert {n for n, _ in lifted.named_parameters()} == {n for n, _ in model.named_parameters()}
    assert torch.equal(lifted(*seen["inputs"])[0], model(x))


# ----------------------------------------------------------------------------- new


def dynamo_like_graph() -> torch.fx.GraphModule:
    """A graph shaped like the one Dynamo hands a backend: parameters and a buffer as placeholders."""
    g = torch.fx.Graph()
    x = g.placeholder("L_x_")
    w = g.placeholder("L_self_modules_fc_parameters_weight_")
    b = g.placeholder("L_self_modules_fc_parameters_bias_")
    w2 = g.placeholder("L_self_modules_blocks_modules_0_modules_proj_parameters_weight_")
    scale = g.placeholder("L_self_buffers_scale_")
    h = g.call_function(F.linear, (g.call_function(F.linear, (x, w, b)), w2))
    g.output((g.call_function(torch.mul, (h, scale)),))
    return torch.fx.GraphModule(nn.Module(), g)


def test_parameter_names_are_read_from_dynamo_placeholder_names() -> None:
    gm = dynamo_like_graph()
    names = [parameter_name(n) for n in gm.graph.nodes if n.op == "placeholder"]
    assert names == [None, "fc.weight", "fc.bias", "blocks.0.proj.weight", "scale"]


def test_parameters_become_frozen_constants_and_the_rest_stay_inputs() -> None:
    gm = dynamo_like_graph()
    x, scale = torch.randn(4, 3), torch.randn(2)
    w, b, w2 = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(2, 5))
    lifted, kept = lift_parameters(gm, [x, w, b, w2, scale])
    assert kept == [0, 4]  # the input and the buffer (a plain tensor, not an nn.Parameter)
    assert [n.target for n in lifted.graph.nodes if n.op == "placeholder"] == ["L_x_", "L_self_buffers_scale_"]
    assert [n.target for n in lifted.graph.nodes if n.op == "get_attr"] == ["fc.weight", "fc.bias",
                                                                           "blocks.0.proj.weight"]
    params = dict(lifted.named_parameters())
    assert all(not p.requires_grad for p in params.values())
    assert params["fc.weight"].data_ptr() == w.data_ptr(), "the lifted constant shares the parameter's storage"
    torch.testing.assert_close(lifted(x, scale)[0], gm(x, w, b, w2, scale)[0])
    assert len([n for n in gm.graph.nodes if n.op == "placeholder"]) == 5, "the input graph is not modified"
    # ... and the lifted graph has sites that passes.sites can find, named after the model's layers
    assert [s.target for s in find_sites(lifted)[0]] == ["fc", "blocks.0.proj"]


def test_parameters_without_a_model_name_get_a_free_attribute_name() -> None:
    root = nn.Module()
    root.lifted_weight = nn.Parameter(torch.ones(4))  # the name the parameter would get is already used
    g = torch.fx.Graph()
    x, weight = g.placeholder("x"), g.placeholder("weight")
    g.output(g.call_function(torch.add, (g.call_function(F.linear, (x, weight)), g.get_attr("lifted_weight"))))
    gm = torch.fx.GraphModule(root, g)
    inputs = [torch.randn(2, 3), nn.Parameter(torch.randn(4, 3))]
    lifted, kept = lift_parameters(gm, inputs)
    assert kept == [0]
    assert [n.target for n in lifted.graph.nodes if n.op == "get_attr"] == ["lifted_weight_1", "lifted_weight"]
    torch.testing.assert_close(lifted(inputs[0]), gm(*inputs))


def test_example_inputs_must_match_the_placeholders() -> None:
    gm = dynamo_like_graph()
    with pytest.raises(ValueError, match="the graph has 5 inputs but 2 example inputs were given"):
        lift_parameters(gm, [torch.randn(4, 3), nn.Parameter(torch.randn(5, 3))])
