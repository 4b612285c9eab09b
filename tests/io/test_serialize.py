"""fxdeco.io.serialize: save a decomposed model as plan.json + weights, re-apply it to a fresh model."""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdeco
import fxdeco.io.serialize as serialize
from fxdeco import lockd
from fxdeco.io.serialize import PlanFormatError, PlanMismatchError, PlanNotFoundError, load, save

pytestmark = pytest.mark.usefixtures("one_thread")


class ConvNet(nn.Module):
    """3x3 conv, BatchNorm, 1x1 conv without bias, a Linear called twice, a head."""

    def __init__(self, width: int = 16, padding: int = 1, with_fc: bool = True) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, padding=padding)
        self.bn = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, 32, 1, bias=False)
        self.fc = nn.Linear(32, 32) if with_fc else nn.Identity()
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c2(F.relu(self.bn(self.c1(x))))).mean((2, 3))
        return self.head(self.fc(F.relu(self.fc(x))))


class Block(nn.Module):
    """A transformer-ish block: attention with a fused qkv projection, then an MLP."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Mixed(nn.Module):
    """One layer that decomposes, one kept dense (full-rank data), a Conv1d and a head skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.low = nn.Linear(24, 24)
        self.conv1d = nn.Conv1d(1, 1, 3, padding=1)
        self.dense = nn.Linear(24, 24)
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.low(x[:, :24])
        noise = self.conv1d(x[:, None, 24:]).squeeze(1)
        return self.head(low + self.dense(noise))


def built(cls: type[nn.Module], seed: int, **kwargs) -> nn.Module:
    """A freshly built model; different seeds give different initial weights."""
    torch.manual_seed(seed)
    return cls(**kwargs).eval()


def images(n: int = 3) -> list[torch.Tensor]:
    return [torch.randn(8, 3, 8, 8) for _ in range(n)]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def cnn_saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.fx.GraphModule, pathlib.Path]:
    torch.manual_seed(0)
    # a loose threshold: every conv and Linear decomposes even on random images
    small = fxdeco.transform(built(ConvNet, 0), images(), capture="symbolic", nsr_threshold=0.3)
    small.eval()
    return small, save(small, tmp_path_factory.mktemp("cnn") / "saved")


def test_symbolic_round_trip_is_bit_exact_and_leaves_the_model_alone(cnn_saved, tmp_path: pathlib.Path) -> None:
    small, folder = cnn_saved
    assert small.meta["fxdeco"].capture == "symbolic"
    assert {d.target for d in small.meta["fxdeco"].decisions if d.decomposed} >= {"c1", "c2", "fc"}
    fresh = built(ConvNet, 123)  # other initial weights: everything must come from the weights file
    before = state(fresh)
    names_before = [n for n, _ in fresh.named_modules()]

    again = load(folder, fresh)

    x = torch.randn(5, 3, 8, 8)
    assert torch.equal(again(x), small(x))
    assert again.state_dict().keys() == small.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in small.state_dict().items())
    assert str(fxdeco.report(again)) == str(fxdeco.report(small))
    assert [n.meta.get("factored") for n in again.graph.nodes if "factored" in n.meta] == \
        [n.meta["factored"] for n in small.graph.nodes if "factored" in n.meta]
    after = fresh.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert [n for n, _ in fresh.named_modules()] == names_before
    # a loaded model saves to the same plan
    assert (save(again, tmp_path) / "plan.json").read_text() == (folder / "plan.json").read_text()


@pytest.mark.parametrize("cls, batch, other", [
    (Block, lambda: torch.randn(4, 6, 8) @ torch.randn(8, 32), torch.randn(2, 9, 32)),
    (ConvNet, lambda: torch.randn(8, 3, 8, 8), torch.randn(5, 3, 8, 8)),
], ids=["block", "cnn"])
def test_export_capture_round_trip_is_bit_exact(cls, batch, other, cnn_saved, tmp_path: pathlib.Path) -> None:
    small = fxdeco.transform(built(cls, 0), [batch() for _ in range(3)], capture="export", nsr_threshold=0.3).eval()
    assert small.meta["fxdeco"].capture == "export"
    assert sum(d.decomposed for d in small.meta["fxdeco"].decisions) >= 3
    folder = save(small, tmp_path / "saved")
    fresh = built(cls, 7)
    before = state(fresh)

    with pytest.raises(serialize.PlanError, match="example_inputs"):
        load(folder, fresh)
    again = load(folder, fresh, example_inputs=batch()[:3])

    assert torch.equal(again(other), small(other))
    assert again.meta["fxdeco"].capture == "export"
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    if cls is ConvNet:  # an aten graph records the conv geometry in its own way; the plan must not show it
        plan = json.loads((folder / "plan.json").read_text())
        assert plan["conv_geometry"] == json.loads((cnn_saved[1] / "plan.json").read_text())["conv_geometry"]


def test_tied_weights_round_trip(tmp_path: pathlib.Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.b(torch.relu(self.a(x))))

    with pytest.warns(UserWarning, match="tied"):
        small = fxdeco.transform(built(Tied, 0), [torch.randn(32, 2) @ torch.randn(2, 16)], nsr_threshold=0.05)
    assert [d.target for d in small.meta["fxdeco"].decisions if d.decomposed] == ["c"]
    again = load(save(small, tmp_path), built(Tied, 1))
    x = torch.randn(4, 16)
    assert torch.equal(again(x), small(x))
    assert again.a.weight is again.b.weight  # still one tensor after loading


def test_dense_and_skipped_layers_survive(tmp_path: pathlib.Path) -> None:
    mix = torch.randn(4, 24)
    data = [torch.cat([torch.randn(32, 4) @ mix, torch.randn(32, 24)], 1) for _ in range(3)]
    small = fxdeco.transform(built(Mixed, 0), data, skip=["head"], nsr_threshold=0.001).eval()
    folder = save(small, tmp_path)
    plan = json.loads((folder / "plan.json").read_text())

    ranks = {d["target"]: d["rank"] for d in plan["decisions"]}
    assert ranks["low"] is not None and ranks["dense"] is None
    assert [s["target"] for s in plan["sites"]] == ["low"]
    reasons = {k["target"]: k["reason"] for k in plan["skipped"]}
    assert reasons["head"] == "skipped by pattern" and "Conv1d" in reasons["conv1d"]

    again = load(folder, built(Mixed, 5))
    x = torch.randn(6, 48)
    assert torch.equal(again(x), small(x))
    assert fxdeco.report(again).rows == fxdeco.report(small).rows


def test_plan_json_matches_the_report_and_the_weights(cnn_saved) -> None:
    small, folder = cnn_saved
    plan = json.loads((folder / "plan.json").read_text())
    assert (plan["schema"], plan["version"]) == (serialize.SCHEMA, serialize.SCHEMA_VERSION)
    assert plan["capture"] == "symbolic" and plan["method"] == "falor"
    assert plan["options"] == {"nsr_threshold": 0.3}
    report = fxdeco.report(small)
    assert {s["target"]: s["rank"] for s in plan["sites"]} == {r["name"]: r["rank"] for r in report.rows if r["rank"]}
    assert {k: plan["totals"][k] for k in ("params_before", "params_after", "macs_before", "macs_after")} == \
        {k: report.totals[k] for k in ("params_before", "params_after", "macs_before", "macs_after")}

    import safetensors.torch
    assert plan["weights"] == {"file": "weights.safetensors", "format": "safetensors"}
    tensors = safetensors.torch.load_file(folder / "weights.safetensors")
    for s in plan["sites"]:
        rank, shape = s["rank"], s["weight_shape"]
        assert s["first_shape"] == [rank, *shape[1:]]
        assert s["second_shape"][:2] == [shape[0], rank]
        assert list(tensors[f"{s['module']}.0.weight"].shape) == s["first_shape"]
        assert list(tensors[f"{s['module']}.1.weight"].shape) == s["second_shape"]
        assert (f"{s['module']}.1.bias" in tensors) == s["second_bias"]
        assert s["metadata"]["nsr"] == next(r["nsr"] for r in report.rows if r["name"] == s["target"])
    assert plan["conv_geometry"] == {"c1": {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1]},
                                     "c2": {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1]}}
    c1 = next(s for s in plan["sites"] if s["target"] == "c1")
    assert c1["layer_bias"] and not next(s for s in plan["sites"] if s["target"] == "c2")["layer_bias"]


def test_weights_fall_back_to_torch_save(cnn_saved, tmp_path: pathlib.Path, monkeypatch) -> None:
    small, _ = cnn_saved
    save(small, tmp_path)
    assert (tmp_path / "weights.safetensors").is_file()
    monkeypatch.setattr(serialize, "_safetensors", lambda: None)
    save(small, tmp_path)  # same directory: the safetensors file of the first save must go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "weights.pt"]
    assert json.loads((tmp_path / "plan.json").read_text())["weights"]["format"] == "torch"
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(load(tmp_path, built(ConvNet, 1))(x), small(x))


@pytest.mark.parametrize("model, first", [
    (lambda: ConvNet(width=24), "layer 'c1': the plan has a conv2d weight of shape (16, 3, 3, 3), the model's is "
                                "(24, 3, 3, 3)"),
    (lambda: ConvNet(with_fc=False), "layer 'fc': the model has no such Linear/Conv2d layer"),
    (lambda: ConvNet(padding=0), "layer 'c1': the plan's convolution has"),
], ids=["wider", "missing-layer", "other-padding"])
def test_a_plan_that_does_not_fit_is_refused_at_the_first_mismatch(cnn_saved, model, first) -> None:
    _, folder = cnn_saved
    fresh = model()
    before = state(fresh)
    with pytest.raises(PlanMismatchError) as caught:
        load(folder, fresh)
    assert str(caught.value).startswith(first)
    assert "'c2'" not in str(caught.value)  # c2 differs too in the wider model, but comes later
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


def test_a_layer_the_plan_does_not_know_is_refused(cnn_saved) -> None:
    _, folder = cnn_saved

    class Longer(ConvNet):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(10, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.extra(super().forward(x))

    with pytest.raises(PlanMismatchError, match="layer 'extra': the model has this layer, the plan does not"):
        load(folder, Longer())


def edited_copy(folder: pathlib.Path, tmp_path: pathlib.Path, edit) -> pathlib.Path:
    """A copy of a saved directory whose plan.json went through ``edit(text) -> text``."""
    copy = tmp_path / "edited"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "plan.json").write_text(edit((folder / "plan.json").read_text()))
    return copy


def test_wrong_kind_is_refused(cnn_saved, tmp_path: pathlib.Path) -> None:
    def conv_as_linear(text: str) -> str:
        plan = json.loads(text)
        plan["decisions"][1]["kind"] = "linear"
        return json.dumps(plan)

    with pytest.raises(PlanMismatchError, match="layer 'c2': the plan has a linear layer, the model a conv2d"):
        load(edited_copy(cnn_saved[1], tmp_path, conv_as_linear), ConvNet())


def test_conv_order_is_recorded_and_older_plans_without_it_still_load(cnn_saved, tmp_path: pathlib.Path) -> None:
    small, folder = cnn_saved
    plan = json.loads((folder / "plan.json").read_text())
    convs = [r for r in plan["sites"] if r["kind"] == "conv2d"]
    assert convs and all(r["conv_order"] == "kxk-first" for r in convs)
    assert all("conv_order" not in r for r in plan["sites"] if r["kind"] == "linear")

    def without_order(text: str) -> str:
        old = json.loads(text)
        for record in old["sites"]:
            record.pop("conv_order", None)
        return json.dumps(old)

    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(load(edited_copy(folder, tmp_path, without_order), built(ConvNet, 5))(x), small(x))
    (tmp_path / "bad").mkdir()
    with pytest.raises(PlanFormatError, match="layer 'c1' has conv_order 'sideways'"):
        load(edited_copy(folder, tmp_path / "bad", lambda t: t.replace('"kxk-first"', '"sideways"', 1)), ConvNet())


@pytest.mark.parametrize("edit, message", [
    (lambda text: text[: len(text) // 2], "is not valid JSON"),
    (lambda text: '{"model": "resnet18", "layers": []}', "is not an fxdeco plan"),
    (lambda text: "[1, 2, 3]", "is not an fxdeco plan"),
    (lambda text: text.replace('"version": 1', '"version": 2'), "schema version 2; this fxdeco reads version 1"),
    (lambda text: text.replace('"sites"', '"places"'), "lacks a valid 'sites' section"),
], ids=["truncated", "foreign", "not-an-object", "version", "missing-section"])
def test_a_damaged_or_foreign_plan_is_refused(cnn_saved, tmp_path: pathlib.Path, edit, message) -> None:
    with pytest.raises(PlanFormatError, match=message):
        load(edited_copy(cnn_saved[1], tmp_path, edit), ConvNet())


def test_missing_or_damaged_weights(cnn_saved, tmp_path: pathlib.Path) -> None:
    folder = edited_copy(cnn_saved[1], tmp_path, lambda text: text)
    weights = folder / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PlanFormatError, match="could not read the weights"):
        load(folder, ConvNet())
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="weights.safetensors.* is missing"):
        load(folder, ConvNet())
    with pytest.raises(PlanNotFoundError, match="directory does not exist"):
        load(tmp_path / "nowhere", ConvNet())


def test_a_path_that_is_a_file_is_refused(cnn_saved, tmp_path: pathlib.Path) -> None:
    small, folder = cnn_saved
    file = tmp_path / "model.bin"
    file.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        save(small, file)
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        load(file, ConvNet())
    assert file.read_text() == "not a directory"


def test_other_dtype_is_named(cnn_saved) -> None:
    with pytest.raises(PlanMismatchError, match="torch.float32 in the weights file, torch.float64 in the model"):
        load(cnn_saved[1], ConvNet().double())


def test_only_decomposed_graphs_can_be_saved(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="not produced by fxdeco"):
        save(torch.fx.symbolic_trace(ConvNet()), tmp_path)
    with pytest.raises(TypeError, match="GraphModule"):
        save(ConvNet(), tmp_path)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ a plan that does not match its weights


class Mlp(nn.Module):
    """Two Linears with biases; ``fc1`` sees rank-4 inputs and decomposes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def one_by_one_first_convs() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2, padding=1)).eval()


@pytest.fixture(scope="module")
def mlp_saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.fx.GraphModule, pathlib.Path]:
    torch.manual_seed(0)
    data = [torch.randn(64, 4) @ torch.randn(4, 64) for _ in range(2)]
    small = fxdeco.transform(built(Mlp, 0), data, capture="symbolic", nsr_threshold=0.01).eval()
    return small, save(small, tmp_path_factory.mktemp("mlp") / "saved")


@pytest.fixture(scope="module")
def lockd_saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.fx.GraphModule, pathlib.Path]:
    """Two 3x3 convs factored 1x1-first (lockd's default order), a quarter of their channels kept."""
    torch.manual_seed(0)
    gm = lockd.prepare(one_by_one_first_convs(), conv_order="1x1-first")
    with torch.no_grad():
        for branch in lockd.branches(gm).values():
            branch.gate.logits[max(1, branch.rank // 4):] = -1.0
    small = lockd.finalize(gm)
    return small, save(small, tmp_path_factory.mktemp("lockd") / "saved")


def site(folder: pathlib.Path, target: str) -> dict[str, Any]:
    """The 'sites' entry of layer ``target`` in the plan saved in ``folder``."""
    return next(s for s in json.loads((folder / "plan.json").read_text())["sites"] if s["target"] == target)


def setting(target: str, sections: tuple[str, ...] = ("sites", "decisions"), **facts: Any) -> Callable[[str], str]:
    """An ``edited_copy`` edit giving layer ``target`` new ``facts`` under the plan's ``sections``."""
    def edit(text: str) -> str:
        plan = json.loads(text)
        for section in sections:
            entry = next(e for e in plan[section] if e["target"] == target)
            entry.update(facts)
        return json.dumps(plan)
    return edit


def with_weights(folder: pathlib.Path, tmp_path: pathlib.Path, edit: Callable[[dict], None]) -> pathlib.Path:
    """A copy of a saved directory whose weights went through ``edit(tensors)`` (in place)."""
    import safetensors.torch

    copy = edited_copy(folder, tmp_path, lambda text: text)
    tensors = safetensors.torch.load_file(copy / "weights.safetensors")
    edit(tensors)
    safetensors.torch.save_file(tensors, copy / "weights.safetensors")
    return copy


def refused(folder: pathlib.Path, model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> str:
    """The message of load()'s PlanMismatchError, which must come before the model is captured and leave it alone."""
    monkeypatch.setattr(serialize, "_capture", lambda *args, **kwargs: pytest.fail(
        "load() captured the model before checking the plan against its weights"))
    model.train()  # a load that switched modes, or touched a tensor, would show
    before = state(model)
    with pytest.raises(PlanMismatchError) as caught:
        load(folder, model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(m.training for m in model.modules())
    return str(caught.value)


NOT_TOGETHER = "the plan and the weights do not belong together"


@pytest.mark.parametrize("delta, sections", [
    (+4, ("sites", "decisions")), (-1, ("sites", "decisions")), (+1, ("decisions",)), (-2, ("sites",)),
], ids=["up", "down", "up-where-the-report-reads-it", "down-in-sites-only"])
def test_a_linear_rank_edited_in_plan_json_is_refused(mlp_saved, tmp_path: pathlib.Path, monkeypatch,
                                                      delta, sections) -> None:
    small, folder = mlp_saved
    rank = site(folder, "fc1")["rank"]
    assert rank >= 3 and fxdeco.report(load(folder, Mlp())).rows[0]["rank"] == rank
    edited = edited_copy(folder, tmp_path, setting("fc1", sections, rank=rank + delta))

    message = refused(edited, Mlp(), monkeypatch)

    assert message.startswith(f"layer 'fc1': plan.json says rank {rank + delta} but its factors in "
                              f"weights.safetensors have rank {rank} (first factor {rank}x64); {NOT_TOGETHER}")


def test_a_rank_edited_with_its_factor_shapes_is_still_refused(mlp_saved, tmp_path: pathlib.Path,
                                                               monkeypatch) -> None:
    _, folder = mlp_saved
    rank = site(folder, "fc1")["rank"]
    edit = setting("fc1", rank=rank + 2)
    edited = edited_copy(folder, tmp_path, lambda text: setting("fc1", ("sites",), first_shape=[rank + 2, 64],
                                                                second_shape=[32, rank + 2])(edit(text)))
    assert refused(edited, Mlp(), monkeypatch).startswith(f"layer 'fc1': plan.json says rank {rank + 2} but its "
                                                          f"factors in weights.safetensors have rank {rank}")


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_a_rank_that_is_not_a_positive_integer_is_refused(mlp_saved, tmp_path: pathlib.Path, monkeypatch,
                                                          rank) -> None:
    _, folder = mlp_saved
    saved = site(folder, "fc1")["rank"]
    message = refused(edited_copy(folder, tmp_path, setting("fc1", rank=rank)), Mlp(), monkeypatch)
    assert message.startswith(f"layer 'fc1': plan.json says rank {rank!r}, not a positive integer, but its factors "
                              f"in weights.safetensors have rank {saved}")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("fc1.0.weight"), "plan.json needs the factor tensor 'fc1.0.weight', which weights.safetensors "
                                      "does not hold"),
    (lambda t: t.pop("fc1.1.weight"), "plan.json needs the factor tensor 'fc1.1.weight'"),
    (lambda t: t.pop("fc1.1.bias"), "plan.json needs the factor tensor 'fc1.1.bias'"),
    (lambda t: t.update({"fc1.0.bias": torch.zeros(len(t["fc1.0.weight"]))}),
     "weights.safetensors holds 'fc1.0.bias' among the layer's factors, which plan.json does not expect (it expects "
     "fc1.0.weight, fc1.1.weight, fc1.1.bias)"),
    (lambda t: t.update({"fc1.2.weight": torch.zeros(8, 32)}), "weights.safetensors holds 'fc1.2.weight'"),
], ids=["first-factor-removed", "second-factor-removed", "bias-removed", "extra-bias", "third-factor"])
def test_missing_or_extra_factor_tensors_are_refused(mlp_saved, tmp_path: pathlib.Path, monkeypatch,
                                                     edit, message) -> None:
    message_found = refused(with_weights(mlp_saved[1], tmp_path, edit), Mlp(), monkeypatch)
    assert message_found.startswith(f"layer 'fc1': {message}") and NOT_TOGETHER in message_found


def test_a_layer_the_plan_keeps_dense_but_whose_factors_it_lists_is_refused(mlp_saved, tmp_path: pathlib.Path,
                                                                           monkeypatch) -> None:
    edited = edited_copy(mlp_saved[1], tmp_path, setting("fc1", ("decisions",), rank=None))
    assert refused(edited, Mlp(), monkeypatch).startswith(
        "layer 'fc1': plan.json keeps it dense (no rank under 'decisions') but lists its factors under 'sites'")


@pytest.mark.parametrize("facts, sections, message", [
    (lambda r: {"rank": r + 1}, ("sites", "decisions"),
     lambda r: f"plan.json says rank {r + 1} but its factors in weights.safetensors have rank {r} (first factor "
               f"{r}x3x3x3)"),
    (lambda r: {"conv_order": "1x1-first"}, ("sites",),
     lambda r: f"plan.json says a conv2d layer of weight 16x3x3x3 factored 1x1-first, whose rank-{r} factors are "
               f"{r}x3x1x1 and 16x{r}x3x3, but its factors in weights.safetensors are {r}x3x3x3 and 16x{r}x1x1"),
    (lambda r: {"weight_shape": [16, 3, 5, 5]}, ("sites", "decisions"),
     lambda r: f"plan.json says a conv2d layer of weight 16x3x5x5 factored kxk-first, whose rank-{r} factors are "
               f"{r}x3x5x5 and 16x{r}x1x1, but its factors in weights.safetensors are {r}x3x3x3 and 16x{r}x1x1"),
    (lambda r: {"weight_shape": [24, 3, 3, 3]}, ("sites",),
     lambda r: f"plan.json says a conv2d layer of weight 24x3x3x3 factored kxk-first, whose rank-{r} factors are "
               f"{r}x3x3x3 and 24x{r}x1x1, but"),
    (lambda r: {"full_rank": 12}, ("decisions",),
     lambda r: "plan.json says full rank 12 but its factors in weights.safetensors are those of a conv2d layer of "
               "weight 16x3x3x3 factored kxk-first, of full rank 16"),
    (lambda r: {"first_shape": [r, 3, 3, 1]}, ("sites",),
     lambda r: f"plan.json says first_shape {r}x3x3x1 but that factor in weights.safetensors is {r}x3x3x3"),
], ids=["rank", "conv-order", "kernel", "out-channels", "full-rank", "first-shape"])
def test_an_edited_conv_fact_is_refused(cnn_saved, tmp_path: pathlib.Path, monkeypatch,
                                        facts, sections, message) -> None:
    _, folder = cnn_saved
    rank = site(folder, "c1")["rank"]
    edited = edited_copy(folder, tmp_path, setting("c1", sections, **facts(rank)))
    assert refused(edited, ConvNet(), monkeypatch).startswith(f"layer 'c1': {message(rank)}")


def test_one_by_one_first_convs_are_checked_in_their_own_order(lockd_saved, tmp_path: pathlib.Path,
                                                               monkeypatch) -> None:
    small, folder = lockd_saved
    record = site(folder, "2")
    rank = record["rank"]
    assert record["conv_order"] == "1x1-first" and record["first_shape"] == [rank, 16, 1, 1]
    assert record["full_rank"] == 16  # the 1x1-first order's full rank, above min(out, in * kh * kw) = 8
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(load(folder, one_by_one_first_convs())(x), small(x))

    swapped = edited_copy(folder, tmp_path, setting("2", ("sites",), conv_order="kxk-first"))
    assert refused(swapped, one_by_one_first_convs(), monkeypatch).startswith(
        f"layer '2': plan.json says a conv2d layer of weight 8x16x3x3 factored kxk-first, whose rank-{rank} factors "
        f"are {rank}x16x3x3 and 8x{rank}x1x1, but its factors in weights.safetensors are {rank}x16x1x1 and "
        f"8x{rank}x3x3")
    (tmp_path / "rank").mkdir()
    fewer = edited_copy(folder, tmp_path / "rank", setting("2", rank=rank - 1))
    assert refused(fewer, one_by_one_first_convs(), monkeypatch).startswith(
        f"layer '2': plan.json says rank {rank - 1} but its factors in weights.safetensors have rank {rank} "
        f"(first factor {rank}x16x1x1)")


def test_a_failed_load_after_the_capture_leaves_the_model_alone(cnn_saved, tmp_path: pathlib.Path) -> None:
    _, folder = cnn_saved
    fresh = ConvNet(padding=0).train()  # the plan fits its weights, not this model's padding
    before = state(fresh)
    with pytest.raises(PlanMismatchError, match="layer 'c1': the plan's convolution has"):
        load(folder, fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    assert all(m.training for m in fresh.modules())
    assert type(fresh.c1) is nn.Conv2d and type(fresh.fc) is nn.Linear


# ------------------------------------------------------------------ permissions


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o007, 0o660)], ids=["umask-022", "umask-007"])
def test_saved_files_get_ordinary_permissions(cnn_saved, tmp_path: pathlib.Path, monkeypatch,
                                              fmt, umask, mode) -> None:
    small, _ = cnn_saved
    if fmt == "torch":
        monkeypatch.setattr(serialize, "_safetensors", lambda: None)
    previous = os.umask(umask)
    try:
        folder = save(small, tmp_path / "saved")
        first = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
        save(small, folder)  # replacing the files of an earlier save
        second = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    finally:
        os.umask(previous)
    assert first == second == {"plan.json": mode, serialize.WEIGHT_FILES[fmt]: mode}


class _Chain(nn.Module):
    def __init__(self, residual: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2, self.residual = nn.Linear(32, 32), nn.Linear(32, 32), residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h + x if self.residual else h)


def test_loading_into_a_model_of_other_code_around_the_same_layers_is_warned_about(tmp_path: pathlib.Path) -> None:
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(4, 32, generator=g)
    batches = [torch.randn(64, 4, generator=g) @ basis for _ in range(3)]
    torch.manual_seed(0)
    save(fxdeco.transform(_Chain(), batches, nsr_threshold=0.01, show_progress=False), tmp_path / "saved")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model it was saved from: no warning
        load(tmp_path / "saved", _Chain())
    with pytest.warns(UserWarning, match="not the graph that was saved"):
        load(tmp_path / "saved", _Chain(residual=True))  # same layers and shapes, other wiring


def test_keyword_inputs_in_another_order_load_without_a_code_warning(tmp_path) -> None:
    """An exported plan loaded with the same keyword inputs in another order is the same computation (torch.export
    orders the graph's inputs by the keywords given): no 'other code' warning, the same outputs."""
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 8)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)) * y)

    torch.manual_seed(0)
    basis = torch.randn(4, 32)
    calib = [{"x": torch.randn(16, 4) @ basis, "y": torch.rand(16, 64)} for _ in range(3)]
    small = fxdeco.transform(TwoInputs().eval(), calib, nsr_threshold=0.05, capture="export", show_progress=False)
    folder = fxdeco.save(small, tmp_path / "plan")
    batch = {"x": torch.randn(5, 4) @ basis, "y": torch.rand(5, 64)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the false warning would fail here
        loaded = fxdeco.load(folder, TwoInputs(), example_inputs={"y": calib[0]["y"], "x": calib[0]["x"]})
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch), small(**batch))


class DataGate(nn.Module):
    """Control flow on the data: neither symbolic tracing nor torch.export can follow it, so the model is traced
    with ``leaf_modules=(DataGate,)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.mean() > 0 else -self.fc(x)


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 32)
        self.gate, self.head = DataGate(), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(self.b(torch.relu(self.a(x)))))


def test_a_model_traced_with_leaf_modules_loads_and_applies_with_them(tmp_path: pathlib.Path) -> None:
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(64, 4, generator=g) @ torch.randn(4, 32, generator=g) for _ in range(3)]
    torch.manual_seed(0)
    model = GatedNet().eval()
    small = fxdeco.transform(model, calib, nsr_threshold=0.01, leaf_modules=(DataGate,), show_progress=False)
    save(small, tmp_path)
    x = torch.randn(5, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same graph: no "the model's code differs" warning either
        loaded = load(tmp_path, GatedNet())  # traced without DataGate as a leaf, this failed
        applied = fxdeco.apply(model, tmp_path)
    assert json.loads((tmp_path / "plan.json").read_text())["leaf_modules"] == [
        f"{DataGate.__module__}.{DataGate.__qualname__}"]
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
        assert torch.allclose(applied(x), small(x), atol=1e-6)


def test_loading_into_a_decomposed_model_says_it_needs_the_original(tmp_path) -> None:
    """Passing the decomposed result (or another fxdeco result) to load() was refused as 'the model has no such
    Linear/Conv2d layer', which points at the wrong model class rather than at the decomposed one."""
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()

    g = torch.Generator().manual_seed(0)
    small = fxdeco.transform(build(), [torch.randn(64, 3, generator=g) @ torch.randn(3, 8, generator=g)],
                             nsr_threshold=0.05, show_progress=False)
    folder = fxdeco.save(small, tmp_path / "small")
    with pytest.raises(PlanMismatchError, match="is itself a model fxdeco decomposed.*freshly built original"):
        fxdeco.load(folder, small)
    x = torch.randn(3, 8)
    assert torch.equal(fxdeco.load(folder, build())(x), small(x))
