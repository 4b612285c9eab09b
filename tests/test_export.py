"""A decomposed GraphModule leaves for deployment: torch.export, and ONNX run by ONNX Runtime."""

from __future__ import annotations

import collections
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdeco

pytestmark = pytest.mark.usefixtures("one_thread")


class SmallCNN(nn.Module):
    """A 3x3 conv, a 1x1 conv and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3)))


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


# model -> (factory, calibration batch, input for export, input of another shape, dynamic dims,
#           matrix products in the model that are not layers)
CASES = {
    "cnn": (SmallCNN, lambda: torch.randn(8, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(5, 3, 8, 8),
            {0: "batch"}, 0),
    "block": (Block, lambda: torch.randn(4, 6, 8) @ torch.randn(8, 32), torch.randn(2, 6, 32),
              torch.randn(3, 9, 32), {0: "batch", 1: "seq"}, 2),
}
_decomposed: dict[tuple[str, str], torch.fx.GraphModule] = {}


@pytest.fixture(params=[(m, c) for m in CASES for c in ("symbolic", "export")], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    name, capture = request.param
    factory, batch, example, other, dims, matmuls = CASES[name]
    if (name, capture) not in _decomposed:
        torch.manual_seed(0)
        # a loose threshold, so that every layer (3x3 conv, 1x1 conv, Linear) is decomposed
        _decomposed[name, capture] = fxdeco.transform(factory().eval(), [batch() for _ in range(3)],
                                                      capture=capture, nsr_threshold=0.3).eval()
    small = _decomposed[name, capture]
    assert small.meta["fxdeco"].capture == capture
    assert all(d.decomposed for d in small.meta["fxdeco"].decisions)
    dynamic = ({i: torch.export.Dim(n) for i, n in dims.items()},)
    return small, example, other, dynamic, matmuls


def expected_layers(small: torch.fx.GraphModule, kind: str) -> int:
    """Layer calls after decomposition: two per decomposed layer, one per dense one."""
    return sum(2 if d.decomposed else 1 for d in small.meta["fxdeco"].decisions if d.kind == kind)


def test_torch_export(case) -> None:
    small, example, other, dynamic, _ = case
    program = torch.export.export(small, (example,), dynamic_shapes=dynamic)

    calls = collections.Counter(n.target for n in program.graph.nodes if n.op == "call_function")
    assert calls[torch.ops.aten.linear.default] == expected_layers(small, "linear")
    assert calls[torch.ops.aten.conv2d.default] == expected_layers(small, "conv2d")
    exported = program.module()
    for x in (example, other):  # the traced shape and another batch size / sequence length
        torch.testing.assert_close(exported(x), small(x), rtol=1e-6, atol=1e-6)


def test_onnx_runtime_matches_pytorch(case, tmp_path: pathlib.Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    small, example, other, dynamic, matmuls = case
    file = tmp_path / "small.onnx"
    torch.onnx.export(small, (example,), str(file), dynamo=True, dynamic_shapes=dynamic, verbose=False)

    model = onnx.load(str(file))
    onnx.checker.check_model(model)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["Conv"] == expected_layers(small, "conv2d")
    assert ops["Gemm"] + ops["MatMul"] == expected_layers(small, "linear") + matmuls
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    for x in (example, other):
        (got,) = session.run(None, {name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), small(x).detach(), rtol=1e-4, atol=1e-5)


def test_an_encoder_decoder_whose_decoder_holds_its_own_config_is_captured_without_its_cache() -> None:
    """T5's decoder stack keeps a copy of the config (use_cache=True): capture turns every copy's cache off, and
    restores them all."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                                   num_heads=2, decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    assert model.decoder.config is not model.config and model.decoder.config.use_cache
    calib = [{"input_ids": torch.randint(1, 64, (4, 10)), "decoder_input_ids": torch.randint(1, 64, (4, 6))}
             for _ in range(2)]
    small = fxdeco.transform(model, calib, nsr_threshold=1e-9, show_progress=False)
    assert model.config.use_cache and model.decoder.config.use_cache  # the caller's configs as they were
    batch = {"input_ids": torch.randint(1, 64, (3, 7)), "decoder_input_ids": torch.randint(1, 64, (3, 5))}
    with torch.no_grad():
        assert torch.allclose(small(**batch).logits, model(**batch).logits, atol=1e-4)


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        y = self.fc(x)
        y = y * scale if scale is not None else y
        return y + shift if shift is not None else y


def test_an_exported_result_called_with_other_inputs_than_its_batches_names_them_and_the_remedy(tmp_path) -> None:
    torch.manual_seed(0)
    batches = [{"x": torch.randn(256, 64) @ torch.randn(64, 64).tril(-50), "scale": torch.ones(64)}
               for _ in range(2)]
    small = fxdeco.transform(_Scaled(), batches, nsr_threshold=0.01, capture="export", show_progress=False)
    assert small.meta["fxdeco"].decisions[0].decomposed
    x = batches[0]["x"]
    assert torch.equal(small(x, torch.ones(64)), small(x=x, scale=torch.ones(64)))  # the inputs it was made for
    fxdeco.save(small, tmp_path / "m")
    loaded = fxdeco.load(tmp_path / "m", _Scaled(), example_inputs=batches[0])
    for model in (small, loaded):
        with pytest.raises(TypeError, match=r"captured by torch.export from calls with the inputs \(x, scale\).*"
                                            r"passed 'shift' \(not among them\).*Calibrate with batches that pass"):
            model(x=x, scale=torch.ones(64), shift=torch.zeros(64))
        with pytest.raises(TypeError, match="left out 'scale'"):
            model(x)
