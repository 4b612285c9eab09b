"""Reliability: documented paths that must work, and models that must not silently compute something else.

Each test here failed on the code before the fix it guards (issue "Reliability: no silent wrong model").
"""

from __future__ import annotations

import itertools
import types
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdeco
from fxdeco import lockd
from fxdeco.methods.lockd.prepare import lockd_state

pytestmark = pytest.mark.usefixtures("one_thread")

FALOR_MODES = {
    "local": dict(nsr_threshold=0.05),
    "budget": dict(keep_params=0.6),
    "final": dict(kl_final_threshold=0.01),
}


# ----------------------------------------------------------------------------- Hugging Face task heads


def _tiny_hf(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    if kind == "causal-lm":
        config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=4)
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module", params=["causal-lm", "sequence-classification"])
def hf_task_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    model = _tiny_hf(request.param)
    calib = [{"input_ids": torch.randint(0, 100, (4, 16))} for _ in range(3)]
    return request.param, model, calib


@pytest.mark.parametrize("mode", list(FALOR_MODES))
def test_hf_model_output_with_output_fn_in_every_falor_mode(hf_task_model: Any, mode: str) -> None:
    """README's ``output_fn=lambda out: out.logits`` works on ModelOutput models in all three falor modes
    (budget and final-output mode used to rebuild the output twice and hand output_fn a nested ModelOutput)."""
    kind, model, calib = hf_task_model
    small = fxdeco.transform(model, calib, output_fn=lambda out: out.logits, **FALOR_MODES[mode])
    out = small(**calib[0])
    with torch.no_grad():
        reference = model(**calib[0]).logits
    assert out.logits.shape == reference.shape  # the model's own output type, logits as the original's
    assert fxdeco.report(small).totals["decomposed"] > 0, f"{kind} {mode}: no layer was decomposed"
    if mode == "final":  # every accepted rank was measured under the threshold on the model's logits
        measured = [d.kl_final for d in small.meta["fxdeco"].decisions if d.decomposed]
        assert measured and all(kl is not None and kl <= 0.01 for kl in measured), measured
    else:
        nsr = ((out.logits - reference).pow(2).mean() / reference.var()).item()
        assert nsr < 0.5, f"{kind} {mode}: the decomposed logits are far from the original's (NSR {nsr:.3g})"


def test_causal_lm_with_kv_cache_is_captured() -> None:
    """A causal LM built with its default ``use_cache=True`` returns a KV cache that torch.export cannot
    flatten; capture must still succeed (the graph computes the logits, without the cache)."""
    model = _tiny_hf("causal-lm")
    assert model.config.use_cache
    calib = [{"input_ids": torch.randint(0, 100, (2, 8))} for _ in range(2)]
    small = fxdeco.transform(model, calib, nsr_threshold=0.05)
    with torch.no_grad():
        reference = model(**calib[0]).logits
    assert small(**calib[0]).logits.shape == reference.shape
    assert model.config.use_cache, "the caller's model config was changed"


# ----------------------------------------------------------------------------- one-shot training loaders


def _lockd_graph() -> tuple[nn.Module, torch.fx.GraphModule]:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return model, lockd.prepare(model, nsr_threshold=0.1)


def test_lockd_train_reads_a_one_shot_loader_once() -> None:
    """``islice(generator, steps)`` holds exactly ``steps`` batches: training and its evaluation must fit in them
    (the evaluation used to read the exhausted iterator again and fail with 'yielded no batches')."""
    _, gm = _lockd_graph()
    batches = (torch.randn(8, 16) for _ in itertools.count())
    history = lockd.train(gm, itertools.islice(batches, 12), steps=12, eval_batches=3)
    assert len(history.loss) == 12
    nsr = [tap.nsr_eval_mean for branch in lockd.branches(gm).values() for tap in branch.taps]
    assert all(v is not None for v in nsr), "the branches were not measured after training"


def test_lockd_train_keeps_its_history_when_a_generator_runs_out() -> None:
    _, gm = _lockd_graph()
    with pytest.warns(UserWarning, match=r"ran out after 5 batches of the 20 steps.*steps <= 5"):
        history = lockd.train(gm, (torch.randn(8, 16) for _ in range(5)), steps=20)
    assert len(history.loss) == 5
    assert lockd_state(gm).steps_trained == 5


def test_lockd_train_reiterates_a_list() -> None:
    _, gm = _lockd_graph()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a re-iterable loader is read epoch after epoch, silently
        history = lockd.train(gm, [torch.randn(8, 16) for _ in range(3)], steps=7)
    assert len(history.loss) == 7


def test_finetune_one_shot_loaders() -> None:
    model, gm = _lockd_graph()
    small = lockd.finalize(gm)
    exact = fxdeco.finetune(small, model, itertools.islice((torch.randn(8, 16) for _ in range(99)), 6), steps=6)
    assert len(exact.loss) == 6
    with pytest.warns(UserWarning, match=r"fine-tuning loader \(a one-shot iterator\) ran out after 2 batches"):
        short = fxdeco.finetune(small, model, (torch.randn(8, 16) for _ in range(2)), steps=6)
    assert len(short.loss) == 2
    with pytest.raises(fxdeco.CalibrationError, match="yielded no batches"):
        fxdeco.finetune(small, model, iter([]), steps=6)


# ----------------------------------------------------------------------------- capture in train mode


class DropoutNet(nn.Module):
    """Functional dropout reads ``self.training``: tracing records its value as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(nn.functional.dropout(self.bn(self.a(x)), 0.5, self.training))


def _train_mode_models() -> dict[str, Any]:
    torchvision = pytest.importorskip("torchvision")
    return {
        "functional-dropout": (DropoutNet, (16,)),
        # torchvision's stochastic depth (a traced function with training=self.training) and nn.Dropout
        "efficientnet-stochastic-depth": (
            lambda: torchvision.models.efficientnet_b0(num_classes=10, stochastic_depth_prob=0.5), (3, 32, 32)),
    }


@pytest.mark.parametrize("name", ["functional-dropout", "efficientnet-stochastic-depth"])
def test_train_mode_model_is_decomposed_as_at_inference(name: str, tmp_path: Any) -> None:
    """Freshly built models are in train mode; the decomposed graph must compute the model's eval-mode function
    (deterministically), leave the caller's mode alone, and reload bit-exactly onto another train-mode copy."""
    build, shape = _train_mode_models()[name]
    torch.manual_seed(0)
    model = build()
    assert model.training
    calib = [torch.randn(8, *shape) for _ in range(4)]
    small = fxdeco.transform(model, calib, nsr_threshold=1e-6, rank_multiple=1)
    assert model.training and all(m.training for m in model.modules()), "the caller's train/eval mode changed"
    x = calib[0]
    with torch.no_grad():
        first, second = small(x), small(x)
        model.eval()
        reference = model(x)
        model.train()
    assert torch.equal(first, second), "the decomposed model is random: training behaviour was captured"
    assert torch.allclose(first, reference, atol=1e-3, rtol=1e-3), (first - reference).abs().max()
    fxdeco.save(small, tmp_path)
    torch.manual_seed(0)
    with torch.no_grad():
        loaded = fxdeco.load(tmp_path, build())(x)
    assert torch.equal(loaded, first), "save/load onto a train-mode model is not bit-exact"


def test_graph_traced_in_train_mode_is_refused_before_calibration() -> None:
    gm = torch.fx.symbolic_trace(DropoutNet().train())
    with pytest.raises(fxdeco.CaptureError, match=r"captured from a model in train mode.*model\.eval\(\)"):
        fxdeco.prepare(gm)


def test_always_on_dropout_is_warned_about() -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.dropout(self.fc(x), 0.1)  # training defaults to True: random even in eval mode

    with pytest.warns(UserWarning, match="computes as in training even in eval mode"):
        fxdeco.prepare(Noisy())


# ----------------------------------------------------------------------------- in-place ops without assignment


class InPlace(nn.Module):
    """In-place ops whose result is not assigned: they still change ``h`` for the layers after them."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.how == "clamp_":
            h.clamp_(min=0)
        elif self.how == "mul_":
            h.mul_(2)
        elif self.how == "relu-module":
            self.act(h)
        elif self.how == "relu_":
            torch.relu_(h)
        elif self.how == "functional-inplace":
            nn.functional.relu(h, inplace=True)
        return self.b(h)


@pytest.mark.parametrize("how", ["clamp_", "mul_", "relu-module", "relu_", "functional-inplace"])
def test_unassigned_in_place_ops_survive_dead_code_elimination(how: str) -> None:
    model = InPlace(how).eval()
    calib = [torch.randn(64, 16) for _ in range(3)]
    small = fxdeco.transform(model, calib, nsr_threshold=1e-8, rank_multiple=1, proportion_threshold=1.0)
    x = torch.randn(8, 16)
    with torch.no_grad():
        expected, got = model(x), small(x)
    assert torch.allclose(got, expected, atol=1e-4), f"{how}: the decomposed graph lost the in-place op"


# ----------------------------------------------------------------------------- optional None inputs


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc(x)
        if mask is not None:
            h = h * mask
        return h


def test_optional_input_left_out_is_traced_as_none() -> None:
    """Batches without ``mask`` used to be traced through the ``mask is not None`` branch and fail (x * None)."""
    model = Masked()
    small = fxdeco.transform(model, [torch.randn(16, 8) for _ in range(3)], nsr_threshold=1e-6, rank_multiple=1)
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-4)
        assert torch.allclose(small(x, mask=None), model(x), atol=1e-4)
    with pytest.raises(AssertionError, match="'mask' was not in the calibration batches.*calibrate with batches that"):
        small(x, torch.ones(4, 8))


def test_optional_input_given_is_required_with_the_remedy() -> None:
    model = Masked()
    calib = [{"x": torch.randn(16, 8), "mask": torch.ones(16, 8)} for _ in range(3)]
    small = fxdeco.transform(model, calib, nsr_threshold=1e-6, rank_multiple=1)
    x, mask = torch.randn(4, 8), torch.rand(4, 8)
    with torch.no_grad():
        assert torch.allclose(small(x, mask), model(x, mask), atol=1e-4)
    with pytest.raises(AssertionError, match="'mask' defaults to None but the calibration batches passed it.*leave it"):
        small(x)


def test_optional_input_without_example_names_the_remedy() -> None:
    prepared = fxdeco.prepare(Masked())
    with pytest.raises(fxdeco.CalibrationError, match=r"Input 'mask' is None in this batch.*Pass example_inputs="):
        prepared(torch.randn(4, 8))


# ----------------------------------------------------------------------------- too little calibration data


def test_too_little_calibration_data_is_warned_and_reported() -> None:
    """One sample gave rank-1 layers with a reported NSR of 0 (and 0.14 on fresh data), without a word."""
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    with pytest.warns(UserWarning, match=r"too little calibration data: 2 of 2 layers.*'0': 1 rows for full rank 32"
                                         r".*at least 32 samples") as caught:
        small = fxdeco.transform(model, [torch.randn(1, 32)], nsr_threshold=0.01, rank_multiple=1)
    assert caught[0].filename == __file__, "the warning should point at the caller's line"
    rows = {r["name"]: r for r in fxdeco.report(small).rows}
    assert rows["0"]["calib_rows"] == 1 and "TOO LITTLE DATA" in rows["0"]["note"]
    assert "TOO LITTLE DATA" in str(fxdeco.report(small))


def test_enough_calibration_data_is_not_warned_about() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = fxdeco.transform(model, [torch.randn(32, 32) for _ in range(2)], nsr_threshold=0.01)
    assert all("TOO LITTLE" not in r["note"] for r in fxdeco.report(small).rows)


# ----------------------------------------------------------------------------- Ctrl-C in the middle of a batch


class InterruptAt(nn.Module):
    """Identity that raises KeyboardInterrupt (as Ctrl-C does) on chosen calls."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            raise KeyboardInterrupt
        return x


class Interruptible(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.trap = InterruptAt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.trap(torch.relu(self.a(x))))


def _sums(prepared: Any) -> dict[str, tuple[int, torch.Tensor]]:
    return {name: (stats.rows, stats.sum_outer.clone()) for name, stats in prepared.statistics.items()}


@pytest.mark.parametrize("where", ["forward", "sensitivity"])
def test_ctrl_c_inside_a_batch_adds_nothing(where: str) -> None:
    """An interrupt after layer 'a' was counted used to leave 'a' with one more batch than 'b' and the count."""
    torch.manual_seed(0)
    model = Interruptible()
    batches = [torch.randn(32, 8) for _ in range(4)]
    state = {"armed": False}

    def output_fn(out: torch.Tensor) -> torch.Tensor:
        if state["armed"]:
            raise KeyboardInterrupt
        return out

    def prepare() -> Any:
        gm = fxdeco.trace(model, leaf_modules=(InterruptAt,))
        return fxdeco.prepare(gm, sensitivity=True, output_fn=output_fn)

    prepared = fxdeco.calibrate(prepare(), batches[:2])
    before = _sums(prepared)
    trap = prepared.gm.get_submodule("trap")
    trap.armed, state["armed"] = where == "forward", where == "sensitivity"
    with pytest.raises(KeyboardInterrupt):
        prepared(batches[2])
    trap.armed, state["armed"] = False, False
    assert prepared.batches == 2 and prepared.sensitivity_samples == 64
    after = _sums(prepared)
    for name, (rows, outer) in before.items():
        assert after[name][0] == rows, f"layer {name!r} counted the interrupted batch"
        assert torch.equal(after[name][1], outer)
    # calibrating on afterwards gives exactly the statistics of the batches that went through
    fxdeco.calibrate(prepared, batches[2:])
    reference = fxdeco.calibrate(prepare(), batches)
    for name, stats in reference.statistics.items():
        assert prepared.statistics[name].rows == stats.rows
        torch.testing.assert_close(prepared.statistics[name].sum_outer, stats.sum_outer)
        torch.testing.assert_close(prepared.statistics[name].sensitivity, stats.sensitivity)


def test_interrupts_deferred_finishes_the_block_then_raises() -> None:
    import os
    import signal

    from fxdeco.interrupts import interrupts_deferred

    # Python's own handler, whatever this process inherited: a job started in the background by a non-interactive
    # shell inherits SIGINT ignored, where Ctrl-C must stay ignored (checked below)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = []
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("rest of the block")
        assert done == ["rest of the block"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with interrupts_deferred():  # an ignored SIGINT stays ignored: nothing raised after the block
            os.kill(os.getpid(), signal.SIGINT)
            done.append("ignored")
        assert done[-1] == "ignored" and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_inputs_traced_as_their_default_survive_save_and_load(tmp_path: Any) -> None:
    model = Masked()
    small = fxdeco.transform(model, [torch.randn(16, 8) for _ in range(3)], nsr_threshold=1e-6, rank_multiple=1)
    fxdeco.save(small, tmp_path)
    loaded = fxdeco.load(tmp_path, model)
    x = torch.randn(4, 8)
    assert torch.equal(loaded(x), small(x))
    with pytest.raises(AssertionError, match="'mask' was not in the calibration batches"):
        loaded(x, torch.ones(4, 8))


# ----------------------------------------------------------------------------- errors before the work


class Counted:
    """A loader that counts the batches read from it."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches, self.read = batches, 0

    def __iter__(self) -> Any:
        for batch in self.batches:
            self.read += 1
            yield batch


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


@pytest.mark.parametrize("budget", [dict(keep_params=0.01), dict(keep_macs=0.01)])
def test_unreachable_budget_is_refused_after_the_first_batch(budget: dict[str, float]) -> None:
    loader = Counted([torch.randn(32, 16) for _ in range(6)])
    name = next(iter(budget))
    with pytest.raises(ValueError, match=rf"{name}=0.01 cannot be reached.*{name} >= 0\.\d+ is reachable"):
        fxdeco.transform(_mlp(), loader, **budget)
    assert loader.read == 1, f"{loader.read} batches (and their backward passes) ran before the refusal"


def test_reachable_budget_is_not_refused() -> None:
    small = fxdeco.transform(_mlp(), [torch.randn(32, 16) for _ in range(3)], keep_params=0.5)
    assert fxdeco.report(small).totals["params_after"] <= 0.5 * sum(p.numel() for p in _mlp().parameters())


def test_final_output_mode_needs_output_fn_on_the_first_batch() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.net(x)
            return y, y.softmax(-1)

    loader = Counted([torch.randn(32, 16) for _ in range(6)])
    with pytest.raises(TypeError, match=r"returns a tuple.*output_fn=lambda out: out\[0\]"):
        fxdeco.transform(Pair(), loader, nsr_final_threshold=0.01)
    assert loader.read == 1


def test_a_dict_output_is_named_a_dict_with_the_key_to_select() -> None:
    """A traced graph returns torch.fx's immutable_dict: the message names it as the dict the model returns."""
    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.net(x)}

    with pytest.raises(TypeError, match=r"returns a dict, not a tensor.*output_fn=lambda out: out\['logits'\]"):
        fxdeco.transform(Named(), [torch.randn(32, 16) for _ in range(3)], nsr_final_threshold=0.01)


@pytest.mark.parametrize("options, match", [
    (dict(nsr_threshold=0.05, keep_params=0.5), "keep_params selects falor's budget mode, which ignores nsr_threshold"),
    (dict(nsr_threshold=0.05, nsr_final_threshold=0.01),
     "nsr_final_threshold selects falor's final-output mode, which ignores nsr_threshold"),
    (dict(keep_macs=0.5, max_probes=3), "keep_macs selects falor's budget mode, which ignores max_probes"),
    (dict(budget_rounds=2), "local mode .* ignores budget_rounds"),
])
def test_options_of_two_modes_are_refused_before_calibration(options: dict[str, Any], match: str) -> None:
    loader = Counted([torch.randn(32, 16)])
    with pytest.raises(ValueError, match=match):
        fxdeco.transform(_mlp(), loader, **options)
    assert loader.read == 0


def test_float32_overflow_is_named_with_the_remedy() -> None:
    huge = [torch.randn(32, 16) * 1e30 for _ in range(2)]
    with pytest.raises(fxdeco.NonFiniteActivationError,
                       match=r"overflowed.*finite but reach.*stat_dtype=torch\.float64"):
        fxdeco.transform(_mlp(), huge)
    small = fxdeco.transform(_mlp(), huge, stat_dtype=torch.float64)
    assert fxdeco.report(small).totals["layers"] == 2


@pytest.mark.parametrize("mode", list(FALOR_MODES))
def test_transform_inside_inference_mode(mode: str) -> None:
    with torch.inference_mode():
        small = fxdeco.transform(_mlp(), [torch.randn(64, 16) for _ in range(3)], **FALOR_MODES[mode])
    assert not any(p.is_inference() for p in small.parameters()), "the result cannot be fine-tuned"
    assert fxdeco.report(small).totals["layers"] == 2


def test_input_fn_errors_name_the_batch() -> None:
    with pytest.raises(TypeError, match="input_fn must be a function of a batch"):
        fxdeco.transform(_mlp(), Counted([]), input_fn="x")
    batches = [{"x": torch.randn(32, 16)} for _ in range(4)]
    batches[2] = {"image": torch.randn(32, 16)}
    with pytest.raises(fxdeco.CalibrationError, match=r"input_fn failed on calibration batch 2 \(a dict with keys "
                                                      r"\['image'\]\): KeyError: 'x'"):
        fxdeco.transform(_mlp(), batches, input_fn=lambda b: b["x"])
    model, gm = _lockd_graph()
    with pytest.raises(fxdeco.CalibrationError, match="input_fn failed on training batch 1"):
        lockd.train(gm, [(torch.randn(8, 16),), {}], steps=3, input_fn=lambda b: b[0])
    with pytest.raises(TypeError, match="input_fn must be a function"):
        fxdeco.finetune(lockd.finalize(gm), model, [torch.randn(8, 16)], steps=1, input_fn=0)


# ----------------------------------------------------------------------------- progress


def _record_progress(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[Any]]:
    """Every progress display from now on writes at once, off a terminal, to the returned stream; the list holds
    the displays made."""
    import io

    from fxdeco import progress as progress_module

    stream = io.StringIO()
    made: list[Any] = []

    class Recorded(progress_module.Progress):
        def __init__(self, desc: str, total: int | None = None, enabled: bool | None = None, **_: Any) -> None:
            super().__init__(desc, total, enabled, stream=stream, first=0.0, every=0.0)
            made.append(self)

    monkeypatch.setattr(progress_module, "Progress", Recorded)
    return stream, made


def test_calibration_progress_knows_the_total_and_reports_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    stream, made = _record_progress(monkeypatch)
    fxdeco.transform(_mlp(), [torch.randn(32, 16) for _ in range(5)], nsr_threshold=0.05)
    calibration = next(p for p in made if p.desc == "calibrating")
    assert calibration.total == 5, "transform lost the loader's length"
    assert "fxdeco calibrating: 5/5 (100%)" in stream.getvalue()


def test_show_progress_false_silences_the_method_as_well_as_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    """transform(show_progress=False) used to reach calibration only: falor's own loops (spectra, layer timing)
    still wrote lines (and the CLI's ranks other than 0 under torchrun). One setting now, given either way; given
    both ways and different, refused."""
    from fxdeco.metadata import model_record

    stream, made = _record_progress(monkeypatch)
    data = [torch.randn(32, 16) for _ in range(3)]
    small = fxdeco.transform(_mlp(), data, nsr_threshold=0.05, show_progress=False)
    assert {"calibrating", "falor: spectra"} <= {p.desc for p in made}
    assert stream.getvalue() == ""
    assert "show_progress" not in model_record(small).options, "a display setting is not a decomposition option"
    made.clear()
    fxdeco.transform(_mlp(), data, fxdeco.Falor(nsr_threshold=0.05, show_progress=False))
    assert "calibrating" in {p.desc for p in made} and stream.getvalue() == ""
    with pytest.raises(ValueError, match="show_progress=True was given to transform but the method config says "
                                         "show_progress=False"):
        fxdeco.transform(_mlp(), data, fxdeco.Falor(show_progress=False), show_progress=True)
    with pytest.raises(TypeError, match="show_progress must be True or False"):
        fxdeco.transform(_mlp(), data, show_progress="no")


class OutOfPlace(InPlace):
    """The same function as ``InPlace(how)`` written without in-place ops."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = h.clamp(min=0) if self.how == "clamp_" else h * 2 if self.how == "mul_" else torch.relu(h)
        return self.b(h)


@pytest.mark.parametrize("how", ["clamp_", "mul_", "relu-module", "relu_", "functional-inplace"])
def test_in_place_ops_after_a_layer_in_gradient_and_replay_passes(how: str) -> None:
    """Budget and final-output mode used to fail on ``Linear -> ReLU(inplace=True)`` (VGG, AlexNet): autograd
    refuses in-place ops on the leaf a site's output was made; they must see exactly what the out-of-place
    model gives."""
    torch.manual_seed(0)
    inplace = InPlace(how).eval()
    plain = OutOfPlace(how).eval()
    plain.load_state_dict(inplace.state_dict())
    calib = [torch.randn(64, 16) for _ in range(3)]
    moments = []
    for model in (inplace, plain):
        prepared = fxdeco.calibrate(fxdeco.prepare(model, sensitivity=True), calib)
        moments.append({name: s.sensitivity for name, s in prepared.statistics.items()})
    for name in moments[1]:
        torch.testing.assert_close(moments[0][name], moments[1][name])
    finals = [fxdeco.transform(m, calib, nsr_final_threshold=0.2, rank_multiple=1).meta["fxdeco"].decisions
              for m in (inplace, plain)]
    assert [(d.rank, d.nsr_final) for d in finals[0]] == [(d.rank, d.nsr_final) for d in finals[1]]
    assert any(d.decomposed for d in finals[0])


class Residual(nn.Module):
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


def test_replays_do_not_change_the_values_the_walk_holds() -> None:
    torch.manual_seed(0)
    inplace, plain = Residual(True), Residual(False)
    plain.load_state_dict(inplace.state_dict())
    calib = [torch.randn(64, 16) for _ in range(2)]
    results = [fxdeco.transform(m, calib, nsr_final_threshold=0.01, rank_multiple=1).meta["fxdeco"].decisions
               for m in (inplace, plain)]
    assert [(d.rank, d.nsr_final, d.probes) for d in results[0]] == [(d.rank, d.nsr_final, d.probes)
                                                                     for d in results[1]]


class SharedInput(nn.Module):
    """``fc1`` and ``fc2`` read the node ``h``, but ``fc2`` reads it after an in-place ReLU."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place
        self.fc0, self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 32), nn.Linear(8, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc0(x)
        a = self.fc1(h)
        if self.in_place:
            h.relu_()
        else:
            h = torch.relu(h)
        return a + self.fc2(h)


def test_statistics_of_an_input_changed_in_place_between_its_readers() -> None:
    """Input-side statistics are shared by the layers reading one node; a layer reading it after an in-place
    change used to get the statistics of the unchanged input."""
    torch.manual_seed(0)
    inplace, plain = SharedInput(True), SharedInput(False)
    plain.load_state_dict(inplace.state_dict())
    calib = [torch.randn(64, 8) for _ in range(2)]
    stats = [fxdeco.calibrate(fxdeco.prepare(m), calib).statistics for m in (inplace, plain)]
    for name in ("fc1", "fc2"):
        torch.testing.assert_close(stats[0][name].second_moment(), stats[1][name].second_moment())


# ----------------------------------------------------------------------------- more silent wrong models


def _low_rank(layer: nn.Module, rank: int = 3) -> nn.Module:
    """Give ``layer`` an exactly rank-``rank`` weight, so a tiny threshold decomposes it without error."""
    with torch.no_grad():
        out, fan_in = layer.weight.shape[0], layer.weight[0].numel()
        layer.weight.copy_((torch.randn(out, rank) @ torch.randn(rank, fan_in)).reshape(layer.weight.shape)
                           / fan_in ** 0.5)
    return layer


def _exact(model: nn.Module, calib: list[torch.Tensor], x: torch.Tensor, **options: Any) -> nn.Module:
    """Decompose at a tiny threshold and check the result computes what ``model`` computes on fresh ``x``."""
    small = fxdeco.transform(model, calib, nsr_threshold=1e-8, rank_multiple=1, stat_dtype=torch.float64, **options)
    with torch.no_grad():
        expected, got = model(x), small(x)
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-4), \
        f"relative error {((got - expected).norm() / expected.norm()).item():.3g}"
    return small


class ReusedWeight(nn.Module):
    """A layer's weight also used through F.linear/F.conv2d with other arguments."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.head = _low_rank(nn.Linear(32, 32))
        self.a = _low_rank(nn.Linear(32, 32))
        self.c = _low_rank(nn.Conv2d(2, 2, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "linear-without-bias":
            h = self.a(x) + nn.functional.linear(x, self.a.weight)
        elif self.how == "bias-read":
            h = self.a(x) + self.a.bias
        else:
            img = x.reshape(-1, 2, 4, 4)
            other = nn.functional.conv2d(img, self.c.weight, self.c.bias, 1, 2, 2)  # dilation 2
            h = (self.c(img) + other).reshape(-1, 32)
        return self.head(h)


@pytest.mark.parametrize("how", ["linear-without-bias", "bias-read", "conv-other-dilation"])
def test_weight_reused_with_other_arguments_is_kept_dense(how: str) -> None:
    torch.manual_seed(0)
    model = ReusedWeight(how).eval()
    small = _exact(model, [torch.randn(64, 32) for _ in range(4)], torch.randn(8, 32))
    rows = {r["name"]: r for r in fxdeco.report(small).rows}
    layer = "c" if how.startswith("conv") else "a"
    assert rows[layer]["rank"] is None, f"{layer!r} was decomposed although another call uses it differently"
    assert rows["head"]["rank"] == 3


def test_out_argument_is_not_dead_code() -> None:
    class Out(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = _low_rank(nn.Linear(32, 32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(x)
            torch.mul(x, 2, out=out)
            return self.a(out)

    torch.manual_seed(0)
    small = _exact(Out().eval(), [torch.randn(64, 32) for _ in range(4)], torch.randn(8, 32))
    assert "torch.mul" in small.code, "the out= call was removed"


def _patched_forward_model() -> nn.Module:
    """A layer whose forward is replaced on the instance (a monkey-patch: clipped input, scaled output)."""
    torch.manual_seed(0)
    model = nn.Sequential(_low_rank(nn.Linear(32, 32)), nn.ReLU(), _low_rank(nn.Linear(32, 32)), nn.ReLU(),
                          _low_rank(nn.Linear(32, 10))).eval()
    layer = model[2]

    def patched(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.clamp(max=0.5), self.weight, self.bias) * 3.0

    layer.forward = types.MethodType(patched, layer)
    return model


def test_layer_with_a_forward_patched_on_the_instance_is_not_taken_for_a_plain_layer() -> None:
    """The class check saw an nn.Linear: symbolic capture decomposed the patched layer as W x + b (report NSR 1e-7,
    model 53% off) and apply() replaced it after an export capture (54% off)."""
    model = _patched_forward_model()
    calib, x = [torch.randn(64, 32) for _ in range(4)], torch.randn(8, 32)
    small = _exact(model, calib, x)  # symbolic: the patched layer stays the leaf call it was
    rows = {r["name"]: r for r in fxdeco.report(small).rows}
    assert "forward is replaced on the instance" in rows["2"]["note"] and rows["4"]["rank"] == 3
    exported = _exact(model, calib, x, capture="export")  # export traces the patch: the layer inside is decomposed
    with pytest.raises(fxdeco.ApplyError, match=r"layer '2'.*forward replaced on the instance.*skip=\['2'\]"):
        fxdeco.apply(_patched_forward_model(), exported)


@pytest.mark.parametrize("hook", ["forward", "pre"])
def test_layers_with_hooks_are_kept_dense(hook: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_low_rank(nn.Linear(32, 32)), nn.ReLU(), _low_rank(nn.Linear(32, 10))).eval()
    if hook == "forward":
        model[0].register_forward_hook(lambda module, inputs, out: out * 2)
    else:
        model[0].register_forward_pre_hook(lambda module, inputs: (inputs[0] * 3,))
    small = _exact(model, [torch.randn(64, 32) for _ in range(4)], torch.randn(8, 32))
    rows = {r["name"]: r for r in fxdeco.report(small).rows}
    assert "hooks" in rows["0"]["note"] and rows["2"]["rank"] == 3


@pytest.mark.parametrize("capture", ["auto", "export"])
def test_parametrized_layer_is_kept_dense_with_the_remedy(capture: str) -> None:
    """torch.export records the parametrization's computation: the layer is named and the remedy is the same there
    (the report used to send users to torch.export, which then called the layer ``linear``, "weight computed")."""
    torch.manual_seed(0)
    model = nn.Sequential(_low_rank(nn.Linear(32, 32)), nn.ReLU(), _low_rank(nn.Linear(32, 10))).eval()
    torch.nn.utils.parametrizations.weight_norm(model[0])
    small = _exact(model, [torch.randn(64, 32) for _ in range(4)], torch.randn(8, 32), capture=capture)
    rows = {r["name"]: r for r in fxdeco.report(small).rows}
    assert "parametrized" in rows["0"]["note"] and "remove_parametrizations" in rows["0"]["note"]
    assert "torch.export" not in rows["0"]["note"]


def test_buffer_changed_in_forward_leaves_the_caller_alone() -> None:
    """Tracing ran ``self.count += 1`` on the caller's buffer and froze its value into the graph."""
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = _low_rank(nn.Linear(32, 32))
            self.register_buffer("count", torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.count += 1
            return self.a(x) + self.count

    torch.manual_seed(0)
    model = Counter().eval()
    calib = [torch.randn(64, 32) for _ in range(4)]
    small = fxdeco.transform(model, calib, nsr_threshold=1e-6, rank_multiple=1)
    assert model.count.item() == 0, "capture or calibration changed the caller's buffer"
    assert small.meta["fxdeco"].capture == "export"  # tracing cannot record the update; export can
    x = torch.randn(8, 32)
    with torch.no_grad():
        first, second = small(x), small(x)
    torch.testing.assert_close(second - first, torch.ones_like(first), rtol=1e-4, atol=1e-4)


def test_export_branch_for_a_batch_of_one_is_guarded() -> None:
    class OneIsSpecial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = _low_rank(nn.Linear(32, 32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            if h.shape[0] == 1:  # export assumes sizes >= 2 and drops this branch without a guard
                h = h * 0
            return h

    torch.manual_seed(0)
    model = OneIsSpecial().eval()
    with pytest.warns(UserWarning, match="computes differently for a batch of one"):
        small = fxdeco.transform(model, [torch.randn(16, 32) for _ in range(4)], nsr_threshold=1e-8,
                                 rank_multiple=1, capture="export")
    with torch.no_grad():
        torch.testing.assert_close(small(torch.randn(4, 32)).shape, torch.Size([4, 32]))
        with pytest.raises(AssertionError, match="assumes a batch of at least 2"):
            small(torch.randn(1, 32))


def test_export_branch_for_a_one_token_sequence_is_guarded() -> None:
    """Not only the batch: export assumes every dynamic size is at least 2, so a one-token step's own branch (an
    incremental decoder's) was silently replaced by the general one. A (16, 16, 32) example, whose batch and
    sequence sizes are equal, must still put the guard on the sequence dimension, and batches of one stay allowed."""

    class OneTokenIsSpecial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = _low_rank(nn.Linear(32, 32)), _low_rank(nn.Linear(32, 32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) if x.shape[1] == 1 else self.b(x)  # export keeps only the second branch

    torch.manual_seed(0)
    model = OneTokenIsSpecial().eval()
    with pytest.warns(UserWarning, match="computes differently when dimension 1 of input 'x' is 1"):
        small = fxdeco.transform(model, [torch.randn(16, 16, 32) for _ in range(4)], nsr_threshold=1e-8,
                                 rank_multiple=1, capture="export")
    with torch.no_grad():
        assert small(torch.randn(1, 5, 32)).shape == (1, 5, 32)  # a batch of one still runs
        with pytest.raises(AssertionError, match="dimension 1 of input 'x' is 1; pass a size of at least 2"):
            small(torch.randn(3, 1, 32))


def test_export_capture_without_a_batch_of_one_branch_takes_batches_of_one() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_low_rank(nn.Linear(32, 32)), nn.ReLU(), _low_rank(nn.Linear(32, 10))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = _exact(model, [torch.randn(64, 32) for _ in range(4)], torch.randn(1, 32), capture="export")
    assert "at least 2" not in small.code, "a model that computes the same for a batch of one got a guard"


# ----------------------------------------------------------------------------- messages that name the right thing


def test_dtype_hint_only_for_dtype_errors_and_guard_hint_for_fixed_sizes() -> None:
    with pytest.raises(fxdeco.CalibrationError, match=r"convert the inputs to floating point"):
        fxdeco.transform(_mlp(), [torch.randint(0, 5, (8, 16))])
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2)
    bert = transformers.BertModel(config).eval()
    batches = [{"input_ids": torch.randint(0, 100, (1, 12))}, {"input_ids": torch.randint(0, 100, (4, 12))}]
    with pytest.raises(fxdeco.CalibrationError) as info:
        fxdeco.transform(bert, batches)
    message = str(info.value)
    assert "calibration batch 1" in message and "batch size and sequence length of at least 2" in message
    assert "floating point" not in message, "token ids were called the wrong dtype"


@pytest.mark.parametrize("dtype, cast", [(torch.float64, "float"), (torch.float16, "float")])
def test_float_inputs_of_another_precision_are_named_with_the_cast(dtype: torch.dtype, cast: str) -> None:
    """A float64 batch (NumPy's default) to a float32 model said only 'mat1 and mat2 must have the same dtype'."""
    with pytest.raises(fxdeco.CalibrationError, match=rf"holds {dtype} tensors but the model computes in "
                                                      rf"torch.float32.*input_fn=lambda b: b.{cast}\(\)"):
        fxdeco.transform(_mlp(), [torch.randn(8, 16, dtype=dtype)])
    double = _mlp().double()
    with pytest.raises(fxdeco.CalibrationError, match=r"holds torch.float32 tensors.*float64.*b.double\(\)"):
        fxdeco.transform(double, [torch.randn(8, 16)])


def test_training_loops_name_a_batch_that_does_not_fit() -> None:
    model, gm = _lockd_graph()
    labelled = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(3)]
    with pytest.raises(fxdeco.CalibrationError, match=r"training batch 0 does not fit.*input_fn=lambda b: b\[0\]"):
        lockd.train(gm, labelled, steps=2)
    with pytest.raises(fxdeco.CalibrationError, match=r"training batch 0 does not fit.*input_fn=lambda b: b\[0\]"):
        fxdeco.finetune(lockd.finalize(gm), model, labelled, steps=2)


def test_more_metric_batches_than_the_loader_holds_is_refused_before_calibration() -> None:
    loader = [torch.randn(32, 16) for _ in range(3)]
    with pytest.raises(ValueError, match="num_metric_batches=5 but the calibration loader holds 3"):
        fxdeco.transform(_mlp(), loader, nsr_final_threshold=0.01, num_metric_batches=5)
    with pytest.raises(ValueError, match="lower num_metric_batches, or give at least 5 batches"):
        fxdeco.transform(_mlp(), iter(loader), nsr_final_threshold=0.01, num_metric_batches=5)


def test_integer_output_in_final_output_mode_says_what_is_wrong() -> None:
    class ArgMax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).argmax(-1)

    with pytest.raises(TypeError, match=r"returns a torch.int64 tensor; final-output criteria compare floating-point"):
        fxdeco.transform(ArgMax(), [torch.randn(32, 16) for _ in range(3)], kl_final_threshold=0.01)


def test_budget_without_gradient_statistics_says_so() -> None:
    prepared = fxdeco.calibrate(fxdeco.prepare(_mlp()), [torch.randn(64, 16) for _ in range(3)])
    with pytest.warns(UserWarning, match=r"allocates ranks by summed layer NSR.*sensitivity=True"):
        fxdeco.convert(prepared, keep_params=0.6)


def test_cli_out_that_cannot_be_created_fails_before_the_work(tmp_path: Any) -> None:
    import subprocess
    import sys

    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    factory = tmp_path / "mlp.py"
    factory.write_text("import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(32, 64), "
                       "torch.nn.ReLU(), torch.nn.Linear(64, 10))\n")
    result = subprocess.run([sys.executable, "-m", "fxdeco.cli", "decompose", f"{factory}:build", "--calib", "random",
                             "--out", str(blocker / "sub")], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "cannot be created" in result.stderr, result.stderr
    assert "calibrat" not in result.stderr.lower(), "the work ran before the output directory was checked"


def test_varargs_model_is_captured_by_export() -> None:
    class VarArgs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = _low_rank(nn.Linear(32, 32))

        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            return self.a(xs[0]) + self.a(xs[1])

    torch.manual_seed(0)
    model = VarArgs().eval()
    calib = [(torch.randn(64, 32), torch.randn(64, 32)) for _ in range(3)]
    small = fxdeco.transform(model, calib, nsr_threshold=1e-6, rank_multiple=1, capture="export")
    x = (torch.randn(5, 32), torch.randn(5, 32))
    with torch.no_grad():
        torch.testing.assert_close(small(*x), model(*x), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("hook", ["forward", "pre"])
def test_a_hook_on_the_model_itself_is_captured_not_dropped(hook: str) -> None:
    """Symbolic tracing calls forward directly, so a hook on the root module would silently vanish from the graph:
    auto capture goes to torch.export (which runs it), a forced symbolic capture is refused with the reason."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    if hook == "forward":
        model.register_forward_hook(lambda module, args, out: out + 1.0)
    else:
        model.register_forward_pre_hook(lambda module, args: (args[0] * 3,))
    x = torch.randn(32, 16)
    small = fxdeco.transform(model, [x], nsr_threshold=1e-9, show_progress=False)
    assert small.meta["fxdeco"].capture == "export"
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)
    with pytest.raises(fxdeco.CaptureError, match="on the model itself, which symbolic tracing does not run"):
        fxdeco.trace(model, x, capture="symbolic")


@pytest.mark.parametrize("small_at", [0, 1])
@pytest.mark.parametrize("config", [fxdeco.Falor(nsr_final_threshold=0.05), fxdeco.Falor(kl_final_threshold=0.05),
                                    fxdeco.Dwain(loss_fn=lambda out, batch: out.pow(2).mean(),
                                                 nsr_final_threshold=0.05)],
                         ids=["nsr_final", "kl_final", "dwain"])
def test_a_metric_batch_of_one_sample_fails_when_it_is_read(config: Any, small_at: int) -> None:
    """A final-output metric batch of one sample failed in channel_variance after the whole calibration, with a
    ValueError that named no batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = [torch.randn(1 if i == small_at else 16, 8) for i in range(20)]
    read = []

    def loader():
        for i, batch in enumerate(batches):
            read.append(i)
            yield batch

    with pytest.raises(fxdeco.CalibrationError, match=f"calibration batch {small_at} is one of the 2 metric batches"
                                                      r".*shape \(1, 4\)"):
        fxdeco.transform(model, loader(), config, show_progress=False)
    assert len(read) <= small_at + 1, f"read {len(read)} batches before failing"


class _CentresInPlace(nn.Module):
    """An MLP whose forward centres its input in place (``x.sub_(3)``), or out of place."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place
        self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_place:
            x.sub_(3.0)
        else:
            x = x - 3.0
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("config", [
    fxdeco.Falor(nsr_final_threshold=0.02), fxdeco.Falor(keep_params=0.5),
    fxdeco.Falor(keep_params=0.5, sequential=True),
    fxdeco.Dwain(loss_fn=lambda out, batch: out.pow(2).mean(), min_rank=2, max_accepted_ppl_diff=0.02),
], ids=["final-output", "budget", "sequential", "dwain"])
def test_a_forward_that_changes_its_input_in_place_is_calibrated_on_the_batch(config: Any) -> None:
    """Every pass over a batch (statistics, cost, gradients, the kept metric batches' reference and probes) ran on
    the caller's tensors, so each ran on the input as the previous one left it: final-output mode compared the
    layers on inputs shifted two and three times and kept them all dense (the same model written out of place got
    ranks 8 and 24), and the caller's batches came back changed."""
    torch.manual_seed(0)
    in_place, out_of_place = _CentresInPlace(True), _CentresInPlace(False)
    out_of_place.load_state_dict(in_place.state_dict())
    basis = torch.randn(8, 32)
    calib = [torch.randn(32, 8) @ basis + 0.05 * torch.randn(32, 32) + 3.0 for _ in range(4)]
    given = [x.clone() for x in calib]
    plans = []
    for model, batches in ((in_place, given), (out_of_place, [x.clone() for x in calib])):
        small = fxdeco.transform(model, batches, config, show_progress=False)
        plans.append({r["name"]: r["rank"] for r in fxdeco.report(small).rows})
    assert plans[0] == plans[1]
    assert any(rank is not None for rank in plans[1].values())
    assert all(torch.equal(x, y) for x, y in zip(given, calib)), "calibration changed the caller's batches"


class _FullyConvolutional(nn.Module):
    """A denoiser-like net with no batch-dependent op, so it runs on single (C, H, W) images as well as batches."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 1)
        self.c3 = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


def test_conv_on_unbatched_images_is_decomposed_as_on_batches() -> None:
    """Calibrating on a dataset of single (C, H, W) images (no DataLoader) took the height for the channels: on images
    constant down each column the rows looked rank 2-3, the report said NSR 0.009 and the model was 99.8% wrong."""
    torch.manual_seed(0)
    model = _FullyConvolutional().eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 1, 16, generator=g).expand(3, 16, 16).contiguous() for _ in range(40)]
    calib, held_out = images[:32], torch.stack(images[32:])
    single = fxdeco.transform(model, calib, nsr_threshold=0.01, rank_multiple=1, show_progress=False)
    batched = fxdeco.transform(model, [torch.stack(calib[i:i + 8]) for i in range(0, 32, 8)], nsr_threshold=0.01,
                               rank_multiple=1, show_progress=False)
    assert [d.rank for d in single.meta["fxdeco"].decisions] == [d.rank for d in batched.meta["fxdeco"].decisions]
    with torch.no_grad():
        error = (single(held_out) - model(held_out)).norm() / model(held_out).norm()
    assert error < 0.2, f"relative error {float(error):.3g}"
    # lockd gates its intermediate channels: dim 1 of an unbatched output is the height (a shape error)
    lockd_small = fxdeco.transform(model, calib[:4], fxdeco.Lockd(steps=2), show_progress=False)
    with torch.no_grad():
        assert lockd_small(calib[0]).shape == (3, 16, 16)
