"""passes.capture: symbolic tracing with leaf modules and constant inputs, torch.export with dynamic
dimensions, input checks placed in the graph, and the calls captured with training behaviour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from passes import GraphTracer, export_capture, symbolic_capture, training_mode_nodes
from passes.capture import optional_tensor_inputs, require_inputs, reword_constant_checks


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def test_leaf_modules_are_called_not_traced_into() -> None:
    model = nn.Sequential(Block(), nn.Linear(4, 2))
    traced = symbolic_capture(model)
    leaf = symbolic_capture(model, leaf_modules=(Block,))
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["0.fc", "1"]
    assert [n.target for n in leaf.graph.nodes if n.op == "call_module"] == ["0", "1"]
    assert GraphTracer(leaf_modules=(Block,)).is_leaf_module(model[0], "0")
    x = torch.randn(3, 4)
    torch.testing.assert_close(leaf(x), model(x))
    assert leaf.get_submodule("0.fc") is model[0].fc, "the graph shares the model's parameters"


class Masked(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x if mask is None else x * mask


def test_an_input_fixed_by_concrete_args_keeps_its_keyword_and_its_check() -> None:
    gm = symbolic_capture(Masked(), concrete_args={"mask": None})
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "mask"]
    x = torch.randn(2, 3)
    torch.testing.assert_close(gm(x, mask=None), x)
    with pytest.raises(AssertionError, match="specialized"):
        gm(x, mask=torch.ones(2, 3))
    reword_constant_checks(gm, lambda name, value: f"{name} was traced as {value}; trace it as a tensor")
    with pytest.raises(AssertionError, match="^mask was traced as None; trace it as a tensor$"):
        gm(x, mask=torch.ones(2, 3))


def test_an_optional_input_traced_as_a_value_can_be_required() -> None:
    gm = torch.fx.symbolic_trace(Masked())
    assert optional_tensor_inputs(gm) == ["mask"]
    x = torch.randn(2, 3)
    torch.testing.assert_close(gm(x, torch.full((2, 3), 2.0)), 2 * x)
    require_inputs(gm, {"mask": "pass a mask"})
    with pytest.raises(AssertionError, match="pass a mask"):
        gm(x)
    torch.testing.assert_close(gm(x, torch.full((2, 3), 2.0)), 2 * x)
    assert optional_tensor_inputs(symbolic_capture(Masked(), concrete_args={"mask": None})) == []


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + shift


def test_export_keeps_batch_and_sequence_dynamic() -> None:
    model = Tokens()
    gm = export_capture(model, (torch.randn(2, 5, 4),), {"shift": torch.randn(2, 5, 3)})
    assert any(n.op == "get_attr" for n in gm.graph.nodes), "export graphs read weights with get_attr"
    x, shift = torch.randn(3, 7, 4), torch.randn(3, 7, 3)  # another batch size and length than the example's
    torch.testing.assert_close(gm(x, shift=shift), model(x, shift))


class Trainable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, 0.1, self.training)
        x = F.dropout(x, 0.0, self.training)  # p=0 drops nothing
        x = F.batch_norm(x, self.mean, self.var, training=self.training)
        return self.drop(x)  # a leaf module: follows the module's mode when the graph runs


def test_training_mode_nodes_lists_dropout_and_batch_norm_traced_in_train_mode() -> None:
    train = torch.fx.symbolic_trace(Trainable().train())
    assert [n.name for n in training_mode_nodes(train)] == ["dropout", "batch_norm"]
    assert training_mode_nodes(torch.fx.symbolic_trace(Trainable().eval())) == []


class GatheredBias(nn.Module):
    """``self.index.view(-1)`` on a buffer: torch.fx computes it while tracing and keeps it as a graph constant."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.table = nn.Parameter(torch.randn(5))
        self.register_buffer("index", torch.randint(0, 5, (2, 4)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.table[self.index.view(-1)]


def test_symbolic_capture_leaves_no_trace_constant_on_the_model() -> None:
    """torch.fx's tracer stores such constants on the traced module; the caller's model must not keep them, and
    every capture of it names its constants alike (apply and load compare graphs of the same model by name)."""
    model = GatheredBias()
    before = set(vars(model))
    first, second = symbolic_capture(model), symbolic_capture(model)
    assert set(vars(model)) == before
    assert [n for n, _ in first.named_buffers()] == [n for n, _ in second.named_buffers()]
    assert "_tensor_constant0" in dict(second.named_buffers())
    x = torch.randn(3, 8)
    assert torch.equal(second(x), model(x))
