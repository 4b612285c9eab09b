"""passes.blocks: cutting a graph into blocks of sites, and running it one block at a time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from passes.blocks import BlockRun, block_scope, find_blocks, unmatched_scopes
from passes.sites import find_sites
from passes.stats import StatsInterpreter, ActivationStatistics


class Layer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Stack(nn.Module):
    """A transformer-shaped stack: numbered layers in a ModuleList, a head outside them."""

    def __init__(self, depth: int = 3, width: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _graph(model: nn.Module) -> tuple[torch.fx.GraphModule, list]:
    gm = torch.fx.symbolic_trace(model)
    return gm, find_sites(gm)[0]


def test_transformer_layers_are_blocks_and_segments_tile_the_graph() -> None:
    gm, sites = _graph(Stack().eval())
    blocks = find_blocks(gm, sites)
    assert [b.name for b in blocks] == ["layers.0", "layers.1", "layers.2", "head"]
    assert blocks[0].sites == ("layers.0.up", "layers.0.down")
    assert blocks[0].start == 0 and blocks[-1].end == len(gm.graph.nodes) - 1
    assert all(a.end + 1 == b.start for a, b in zip(blocks, blocks[1:]))
    nodes = list(gm.graph.nodes)
    # a layer's segment ends with its residual add, not at its last Linear
    assert nodes[blocks[0].end].op == "call_function" and "add" in nodes[blocks[0].end].name


def test_resnet_blocks() -> None:
    torchvision = pytest.importorskip("torchvision")
    gm, sites = _graph(torchvision.models.resnet18().eval())
    names = [b.name for b in find_blocks(gm, sites)]
    assert names == ["conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0",
                     "layer4.1", "fc"]


def test_given_scopes_override_and_unlisted_layers_are_blocks_of_their_own() -> None:
    gm, sites = _graph(Stack().eval())
    blocks = find_blocks(gm, sites, scopes=["layers"])
    assert [b.name for b in blocks] == ["layers", "head"]
    assert block_scope("head", ["layers"]) == "head"


def test_a_scope_that_holds_no_layer_is_refused_naming_the_closest() -> None:
    """A misspelt scope beside a good one was silently no block, its layers blocks of their own."""
    gm, sites = _graph(Stack().eval())
    with pytest.raises(ValueError) as error:
        find_blocks(gm, sites, scopes=["layers.0", "layer.1", "norm_f"])
    message = str(error.value)
    assert "no layer is inside 'layer.1' (closest: 'layers.1'" in message
    assert "no layer is inside 'norm_f'" in message and "inside 'layers.0'" not in message
    with pytest.raises(ValueError, match="no block scope was given"):
        find_blocks(gm, sites, scopes=[])
    assert unmatched_scopes(sites, ["layers", "layers.0.up", "head"]) == {}  # a layer is a scope of itself


def test_a_layer_called_from_two_blocks_merges_them() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
            self.tied = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.tied(self.blocks[0](x))
            x = self.blocks[1](x)
            return self.tied(self.blocks[2](x))

    gm, sites = _graph(Shared().eval())
    blocks = find_blocks(gm, sites)
    assert [(b.name, b.sites) for b in blocks] == [("blocks.0", ("blocks.0",)),
                                                   ("tied", ("tied", "blocks.1", "blocks.2"))]


def test_block_walk_equals_the_forward_pass_and_leaves_boundaries_unchanged() -> None:
    class InPlace(nn.Module):
        """An in-place op on a value the next block also reads (a boundary value)."""

        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.layers[0](x)
            y = self.layers[1](h)
            return y + h.relu_()

    for model in (Stack().eval(), InPlace().eval()):
        gm, sites = _graph(model)
        run = BlockRun(gm, find_blocks(gm, sites))
        x = torch.randn(5, 4 if isinstance(model, InPlace) else 8)
        env = run.start([x])
        for index in range(len(run.blocks)):
            before = {n: v.clone() for n, v in env.items()}
            after = run.run_block(index, env)
            assert all(torch.equal(env[n], v) for n, v in before.items())  # the walk never changes its input
            again = run.run_block(index, env)
            for n in after:
                assert torch.equal(after[n], again[n])
            env = after
        torch.testing.assert_close(run.graph_output(env), model(x))


def test_boundary_holds_only_what_later_blocks_read() -> None:
    gm, sites = _graph(Stack().eval())
    run = BlockRun(gm, find_blocks(gm, sites))
    env = run.run_block(0, run.start([torch.randn(2, 8)]))
    assert [n.name for n in env] == ["add"]  # the residual stream after layer 0


def test_overrides_and_observers() -> None:
    gm, sites = _graph(Stack().eval())
    run = BlockRun(gm, find_blocks(gm, sites))
    x = torch.randn(6, 8)
    stats = StatsInterpreter(gm, [s for s in sites if s.target.startswith("layers.0.")], ActivationStatistics(),
                             defer_commit=True)

    def observe(node, value, env):
        stats.env = env
        stats.observe(node, value)

    stats.start_batch()
    zeroed = run.run_block(0, run.start([x]), overrides={"layers_0_down": torch.zeros_like}, observe=observe)
    stats.commit()
    reference = StatsInterpreter(gm, [s for s in sites if s.target.startswith("layers.0.")])
    reference.run(x)
    for target, s in reference.statistics.items():
        torch.testing.assert_close(stats.statistics[target].sum_outer, s.sum_outer)
    torch.testing.assert_close(next(iter(zeroed.values())), x)  # x + 0
