"""fxdeco.apply: a decomposed graph's factors put back into a copy of the caller's own model class."""

from __future__ import annotations

import copy
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdeco
from fxdeco import lockd
from fxdeco.io.apply import ApplyError, FactoredConv2d, FactoredLinear
from fxdeco.metadata import factored_layers

pytestmark = pytest.mark.usefixtures("one_thread")


class CnnMlp(nn.Module):
    """A 3x3 conv with BatchNorm, a strided 3x3 conv without bias, a 1x1 conv, an MLP with a residual, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.c3 = nn.Conv2d(32, 32, 1)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.c1(x)))
        x = F.relu(self.c3(F.relu(self.c2(x)))).mean((2, 3))
        x = F.relu(self.fc1(x))
        return self.head(F.relu(self.fc2(x)) + x)


def cnn_mlp() -> CnnMlp:
    torch.manual_seed(0)
    model = CnnMlp()
    with torch.no_grad():  # trained-looking BatchNorm statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def images(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    """Smooth images (4x4 noise upsampled): their patches, hence every layer's outputs, are close to low rank."""
    g = torch.Generator().manual_seed(seed)
    return [F.interpolate(torch.randn(16, 3, 4, 4, generator=g), size=(16, 16), mode="bilinear") for _ in range(n)]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def decomposed_targets(gm: torch.fx.GraphModule) -> set[str]:
    return {info.target for _, info in factored_layers(gm)}


def assert_layout(model: nn.Module, small: torch.fx.GraphModule, mine: nn.Module) -> None:
    """The result's state_dict: the original keys of the layers kept dense, plus the graph's factor keys."""
    targets = decomposed_targets(small)
    kept = {k for k in model.state_dict() if k.rpartition(".")[0] not in targets}
    factors = {k for k in small.state_dict() if k.rpartition(".")[0].rpartition(".")[0] in targets}
    assert factors and set(mine.state_dict()) == kept | factors
    for target in targets:
        assert isinstance(mine.get_submodule(target), (FactoredLinear, FactoredConv2d))


@pytest.mark.parametrize("capture, mode", [("symbolic", {"nsr_threshold": 0.02}), ("symbolic", {"keep_params": 0.5}),
                                           ("export", {"nsr_threshold": 0.02})],
                         ids=["local", "budget", "local-export"])
def test_the_result_is_the_models_class_and_computes_what_the_graph_does(capture: str, mode: dict) -> None:
    model = cnn_mlp()
    before = snapshot(model)
    small = fxdeco.transform(model, images(), capture=capture, show_progress=False, **mode)
    mine = fxdeco.apply(model, small)
    assert type(mine) is CnnMlp and mine is not model and not mine.training
    kinds = {type(mine.get_submodule(t)) for t in decomposed_targets(small)}
    assert kinds == {FactoredLinear, FactoredConv2d}, "both kinds are decomposed"
    x = images(1, seed=5)[0]
    with torch.no_grad():
        assert torch.allclose(mine(x), small(x), rtol=1e-5, atol=1e-6)
    assert_layout(model, small, mine)
    assert_unchanged(model, before)
    assert all(isinstance(m, (nn.Conv2d, nn.Linear)) for m in (model.c1, model.c2, model.c3, model.fc1, model.fc2))


def test_one_by_one_first_convs_and_layers_lockd_kept_dense() -> None:
    model = cnn_mlp()
    gm = lockd.prepare(model, conv_order="1x1-first")
    with torch.no_grad():
        for name, branch in lockd.branches(gm).items():
            if name != "head":  # head keeps every channel open: lockd keeps it dense
                branch.gate.logits[max(1, branch.rank // 4):] = -1.0
    small = lockd.finalize(gm)
    mine = fxdeco.apply(model, small)
    assert isinstance(mine.head, nn.Linear) and "head" not in decomposed_targets(small)
    assert isinstance(mine.c2, FactoredConv2d)
    assert (mine.c2.first.kernel_size, mine.c2.second.kernel_size, mine.c2.second.stride) == ((1, 1), (3, 3), (2, 2))
    x = images(1, seed=5)[0]
    with torch.no_grad():
        assert torch.allclose(mine(x), small(x), rtol=1e-5, atol=1e-6)
    assert_layout(model, small, mine)


def test_weights_the_graph_changed_outside_the_factors_are_copied_in() -> None:
    """As dwain's finetune_fn or fxdeco.finetune leave them: a bias and BatchNorm statistics trained in the graph."""
    model = cnn_mlp()
    before = snapshot(model)
    small = fxdeco.transform(model, images(), keep_params=0.5, skip=["head"], show_progress=False)
    with torch.no_grad():
        small.get_parameter("head.bias").add_(0.25)
        small.get_buffer("bn.running_mean").mul_(2.0)
    mine = fxdeco.apply(model, small)
    assert torch.equal(mine.head.bias, small.get_parameter("head.bias"))
    assert torch.equal(mine.bn.running_mean, small.get_buffer("bn.running_mean"))
    x = images(1, seed=5)[0]
    with torch.no_grad():
        assert torch.allclose(mine(x), small(x), rtol=1e-5, atol=1e-6)
    assert_unchanged(model, before)


def test_a_changed_graph_tensor_the_model_has_no_place_for_is_refused() -> None:
    model = cnn_mlp()
    before = snapshot(model)
    small = fxdeco.transform(model, images(), keep_params=0.5, show_progress=False)
    small.register_parameter("extra", nn.Parameter(torch.randn(7)))
    with pytest.raises(ApplyError, match="graph tensor 'extra' differs from the model's and has no counterpart"):
        fxdeco.apply(model, small)
    assert_unchanged(model, before)


class Functional(nn.Module):
    """``fc`` is called as a module, twice; ``out``'s weight only reaches ``F.linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.relu(self.fc(x)))
        return F.linear(h, self.out.weight, self.out.bias)


def low_rank_rows(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(64, 4, generator=g) @ torch.randn(4, 32, generator=g) for _ in range(n)]


def test_a_functional_site_is_refused_by_name_before_anything_is_built() -> None:
    torch.manual_seed(0)
    model = Functional().eval()
    before = snapshot(model)
    small = fxdeco.transform(model, low_rank_rows(), nsr_threshold=0.01, show_progress=False)
    assert decomposed_targets(small) >= {"fc", "out"}
    with pytest.raises(ApplyError, match=r"decomposed layer 'out' \(graph node .*\): it is not a call of a module "
                                         r"of Functional but a functional call"):
        fxdeco.apply(model, small)
    assert_unchanged(model, before)


def test_a_module_called_twice_shares_its_factors() -> None:
    torch.manual_seed(0)
    model = Functional().eval()
    small = fxdeco.transform(model, low_rank_rows(), nsr_threshold=0.01, skip=["out"], show_progress=False)
    mine = fxdeco.apply(model, small)
    assert isinstance(mine.fc, FactoredLinear) and isinstance(mine.out, nn.Linear)
    x = low_rank_rows(1)[0]
    with torch.no_grad():
        assert torch.allclose(mine(x), small(x), rtol=1e-5, atol=1e-6)


def test_bad_arguments_get_clear_errors() -> None:
    model = cnn_mlp()
    with pytest.raises(TypeError, match="GraphModule fxdeco returned"):
        fxdeco.apply(model, model)
    with pytest.raises(ApplyError, match="not decomposed by fxdeco"):
        fxdeco.apply(model, torch.fx.symbolic_trace(model))
    small = fxdeco.transform(model, images(), keep_params=0.5, show_progress=False)
    other = CnnMlp()
    other.fc1 = nn.Linear(32, 48)
    other.fc2 = nn.Linear(48, 64)
    with pytest.raises(ApplyError, match="'fc1'.*give apply\\(\\) the model the graph was made from"):
        fxdeco.apply(other, small)


# ------------------------------------------------------------------ Hugging Face causal LMs

VOCAB = 128


def hf_causal_lm(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":  # transformers' Conv1D layers, lm_head tied to the embedding
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4)
    return transformers.LlamaForCausalLM(config).eval()


def token_batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, VOCAB, (4, 16), generator=g)} for _ in range(n)]


_DECOMPOSED: dict[str, tuple[nn.Module, torch.fx.GraphModule]] = {}


def hf_decomposed(kind: str) -> tuple[nn.Module, torch.fx.GraphModule]:
    """(the model, its decomposed graph), built once per kind (the graph is shared: tests must not change it)."""
    if kind not in _DECOMPOSED:
        model = hf_causal_lm(kind)
        small = fxdeco.transform(model, token_batches(), nsr_threshold=0.05, output_fn=lambda out: out.logits,
                                 show_progress=False)
        assert small.meta["fxdeco"].capture == "export"
        _DECOMPOSED[kind] = model, small
    return _DECOMPOSED[kind]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hugging_face_causal_lms_come_back_with_generate(kind: str) -> None:
    model, small = hf_decomposed(kind)
    before = snapshot(model)
    mine = fxdeco.apply(model, small)
    assert type(mine) is type(model) and mine.config is not model.config
    assert decomposed_targets(small) and all(isinstance(mine.get_submodule(t), FactoredLinear)
                                             for t in decomposed_targets(small))
    assert_layout(model, small, mine)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert relative_error(mine(input_ids=ids).logits, small(input_ids=ids).logits) <= 1e-5
        prompt = ids[:, :8]
        generated = mine.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
        greedy = prompt
        for _ in range(5):  # the graph has no key/value cache: the whole sequence each step
            greedy = torch.cat([greedy, small(input_ids=greedy).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert generated.shape == (2, 13)
    assert torch.equal(generated, greedy)
    assert_unchanged(model, before)


def test_a_norm_weight_changed_in_an_exported_graph_is_copied_by_its_name() -> None:
    model, small = hf_decomposed("llama")
    changed = fxdeco.apply(model, small)  # a copy of the shared graph's weights, changed below, not the graph
    tuned = copy.deepcopy(small)
    with torch.no_grad():
        tuned.get_parameter("model.norm.weight").mul_(1.5)
    mine = fxdeco.apply(model, tuned)
    assert torch.equal(mine.model.norm.weight, tuned.get_parameter("model.norm.weight"))
    assert not torch.equal(mine.model.norm.weight, changed.model.norm.weight)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert relative_error(mine(input_ids=ids).logits, tuned(input_ids=ids).logits) <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_saved_directory_applies_with_the_same_logits(kind: str, tmp_path: pathlib.Path) -> None:
    _, small = hf_decomposed(kind)
    folder = fxdeco.save(small, tmp_path / "saved")
    mine = fxdeco.apply(hf_causal_lm(kind), folder, example_inputs=token_batches(1)[0])
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert relative_error(mine(input_ids=ids).logits, small(input_ids=ids).logits) <= 1e-5


def test_peft_lora_wraps_the_factor_layers_of_an_applied_llama() -> None:
    """LoRA goes on the factor Linears (``down_proj.0`` / ``down_proj.1``): a fresh adapter (B = 0) changes nothing, and a
    training step moves only the adapter's weights."""
    peft = pytest.importorskip("peft")
    model, small = hf_decomposed("llama")
    mine = fxdeco.apply(model, small)
    factored = sorted(decomposed_targets(small))
    assert factored
    wrapped = peft.get_peft_model(mine, peft.LoraConfig(r=4, target_modules=[f"{t}.1" for t in factored]))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert relative_error(wrapped(input_ids=ids).logits, small(input_ids=ids).logits) <= 1e-5
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in wrapped.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
    wrapped(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in wrapped.named_parameters() if n in frozen)
    with torch.no_grad():
        assert relative_error(wrapped(input_ids=ids).logits, small(input_ids=ids).logits) > 1e-6  # it trained


def test_a_model_with_layers_the_graph_lacks_is_warned_about() -> None:
    import warnings

    transformers = pytest.importorskip("transformers")
    model, small = hf_decomposed("llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxdeco.apply(model, small)
    assert not [w for w in caught if "apply():" in str(w.message)]
    deeper = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**model.config.to_dict(),
                                                                      "num_hidden_layers": 3})).eval()
    with pytest.warns(UserWarning, match=r"apply\(\): \d+ parameter\(s\) of LlamaForCausalLM are not in the "
                                         r"decomposed graph \(first: 'model.layers.2"):
        fxdeco.apply(deeper, small)


class IndexedBias(nn.Module):
    """A relative-position-style bias gathered through ``self.index.view(-1)``, as timm's Swin and BEiT do: symbolic
    tracing computes the view on the real buffer and stores it as a graph constant no model name holds."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)
        self.table = nn.Parameter(torch.randn(15))
        self.register_buffer("index", torch.randint(0, 15, (4, 8)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.table[self.index.view(-1)]
        return self.fc2(torch.relu(self.fc1(x))) + bias


def test_a_trace_constant_computed_from_the_models_buffers_is_not_refused() -> None:
    torch.manual_seed(0)
    model = IndexedBias().eval()
    calib = low_rank_rows(2)
    small = fxdeco.transform(model, calib, nsr_threshold=0.01, show_progress=False)
    assert "_tensor_constant0" in dict(small.named_buffers())  # the case this test is about
    assert factored_layers(small)
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = small(x)
        assert torch.allclose(fxdeco.apply(copy.deepcopy(model), small)(x), expected, atol=1e-6)
        mine = copy.deepcopy(model)
        fxdeco.decompose_(mine, calib, nsr_threshold=0.01, show_progress=False)
        assert torch.allclose(mine(x), expected, atol=1e-6)


def test_a_trace_constant_that_differs_from_the_models_is_still_refused() -> None:
    torch.manual_seed(0)
    model = IndexedBias().eval()
    small = fxdeco.transform(model, low_rank_rows(2), nsr_threshold=0.01, show_progress=False)
    other = copy.deepcopy(model)
    other.index = (other.index + 1) % 15  # another model: its forward gathers other entries than the graph does
    with pytest.raises(ApplyError, match="graph tensor '_tensor_constant0' differs from the model's"):
        fxdeco.apply(other, small)
