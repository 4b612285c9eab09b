"""Method configs: ``fxdeco.Falor`` is the one source of falor's options, defaults and ranges."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fxdeco
from fxdeco.methods.falor.local import falor_local
from fxdeco.methods import method_config, option_names

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))


def _calib() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(64, 32) for _ in range(4)]


@pytest.mark.parametrize("options", [dict(keep_params=0.5), dict(nsr_threshold=0.05), dict(keep_macs=0.4),
                                     dict(nsr_final_threshold=0.02, rank_multiple=1)])
def test_config_and_keywords_give_the_same_graph(options: dict[str, Any]) -> None:
    by_config = fxdeco.transform(_model(), _calib(), fxdeco.Falor(**options))
    by_keywords = fxdeco.transform(_model(), _calib(), method="falor", **options)
    assert by_config.code == by_keywords.code
    for (name, a), (_, b) in zip(by_config.state_dict().items(), by_keywords.state_dict().items()):
        assert torch.equal(a, b), name
    assert by_config.meta["fxdeco"].options == by_keywords.meta["fxdeco"].options == options


@pytest.mark.parametrize("options, match", [
    (dict(nsr_threshold=-1), "nsr_threshold must be a number in"),
    (dict(keep_params=1.5), "keep_params must be a number in"),
    (dict(min_rank=0), "min_rank must be a positive integer"),
    (dict(budget_criterion="best"), "budget_criterion must be"),
    (dict(nsr_threshold=0.1, keep_params=0.5), "keep_params selects falor's budget mode, which ignores nsr_threshold"),
])
def test_falor_is_validated_at_construction(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fxdeco.Falor(**options)


def test_spill_dir_is_checked_at_construction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing directory or a file failed only after capture, as an OSError naming a generated subdirectory."""
    missing, a_file = tmp_path / "missing", tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=f"spill_dir='{missing}' does not exist"):
        fxdeco.Falor(sequential=True, spill_dir=str(missing))
    with pytest.raises(ValueError, match=f"spill_dir='{a_file}' is not a directory"):
        fxdeco.Falor(sequential=True, spill_dir=str(a_file))
    with pytest.raises(TypeError, match="spill_dir must be a directory path"):
        fxdeco.Falor(sequential=True, spill_dir=3)
    assert fxdeco.Falor(sequential=True, spill_dir=tmp_path).spill_dir == str(tmp_path)  # a Path, kept as text
    with pytest.raises(ValueError, match="spill_dir is an option of sequential mode"):  # before the filesystem
        fxdeco.Falor(spill_dir=str(missing))
    monkeypatch.setattr("os.access", lambda path, mode: False)  # root may write anywhere: pretend it may not
    with pytest.raises(ValueError, match="is not writable"):
        fxdeco.Falor(sequential=True, spill_dir=str(tmp_path))


@pytest.mark.parametrize("blocks", [[], ["layers.0", ""], ["layers.0", 1]])
def test_blocks_must_name_modules(blocks: list[Any]) -> None:
    with pytest.raises(ValueError, match="blocks must be a non-empty list of qualified module names"):
        fxdeco.Falor(sequential=True, blocks=blocks)


def test_falor_is_frozen_and_says_what_calibration_it_needs() -> None:
    config = fxdeco.Falor(keep_params=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.keep_params = 0.1  # type: ignore[misc]
    assert (config.mode, config.needs_sensitivity) == ("budget", True)
    assert fxdeco.Falor(keep_params=0.5, budget_criterion="nsr").needs_sensitivity is False
    assert fxdeco.Falor(kl_final_threshold=0.01, num_metric_batches=3).kept_batches == 3
    assert fxdeco.Falor(skip=["head*"]).skip == ("head*",)


def test_typos_and_options_beside_a_config_are_refused() -> None:
    with pytest.raises(TypeError, match=r"unknown option 'keep_param' for method 'falor' \(did you mean 'keep_params'"):
        method_config("falor", keep_param=0.5)
    with pytest.raises(TypeError, match="set them in the config"):
        fxdeco.transform(_model(), _calib(), fxdeco.Falor(), keep_params=0.5)


def test_option_names_come_from_the_config() -> None:
    names = option_names(fxdeco.Falor)
    assert {"nsr_threshold", "keep_params", "budget_rounds", "kl_final_threshold", "skip"} <= set(names)
    assert names == [f.name for f in dataclasses.fields(fxdeco.Falor)]


def test_budget_rounds_has_one_default() -> None:
    """falor_local defaulted to 0 measured rounds while falor and its option check defaulted to 1."""
    prepared = fxdeco.calibrate(fxdeco.prepare(_model(), sensitivity=True), _calib())
    rounds = []

    def measure(ranks: Any, spectra: Any) -> dict[str, float]:
        rounds.append(dict(ranks))
        return {target: 0.01 for target in ranks}

    falor_local(prepared.gm, prepared.sites, prepared.statistics, keep_params=0.5, measure_final_nsr=measure)
    assert len(rounds) == fxdeco.Falor().budget_rounds == 1


def test_cli_takes_the_library_range(tmp_path: Path) -> None:
    """The CLI limited --nsr-threshold to (0, 1]; the library takes (0, inf]."""
    from fxdeco.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["decompose", "m.py:f", "--calib", "random", "--out", str(tmp_path),
                              "--nsr-threshold", "1.5"])
    assert args.nsr_threshold == 1.5
    result = subprocess.run([sys.executable, "-m", "fxdeco.cli", "decompose", "m.py:f", "--calib", "random",
                             "--out", str(tmp_path / "o"), "--keep-params", "1.5"], capture_output=True, text=True)
    assert result.returncode == 2 and "keep_params must be a number in (0.0, 1.0], got 1.5" in result.stderr


# ----------------------------------------------------------------------------- lockd


def _rank4() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(64, 4) @ torch.randn(4, 16) / 4)
    return model


def test_lockd_through_transform_equals_its_three_steps() -> None:
    from fxdeco import lockd

    data = [torch.randn(64, 16) for _ in range(4)]
    config = fxdeco.Lockd(steps=120, nsr_threshold=0.05, proportion_threshold=0.5)
    model = _rank4()
    torch.manual_seed(5)  # the gates' Gumbel noise
    one_call = fxdeco.transform(model, data, config)
    torch.manual_seed(5)
    gm = lockd.prepare(model, data[0], nsr_threshold=0.05)
    lockd.train(gm, data, steps=120)
    by_steps = lockd.finalize(gm, proportion_threshold=0.5)
    assert one_call.code == by_steps.code
    for (name, a), (_, b) in zip(one_call.state_dict().items(), by_steps.state_dict().items()):
        assert torch.equal(a, b), name
    report = fxdeco.report(one_call)
    assert report.totals["method"] == "lockd" and report.totals["decomposed"] >= 1
    assert one_call.meta["fxdeco"].options == config.options()


def test_lockd_config_is_the_one_check_and_the_one_default() -> None:
    from fxdeco import lockd

    with pytest.raises(ValueError, match="lmbda must be a positive number"):
        fxdeco.Lockd(lmbda=0)
    with pytest.raises(ValueError, match="conv_order must be one of"):
        lockd.prepare(_rank4(), conv_order="diagonal")
    with pytest.raises(TypeError, match=r"unknown option 'stepz' for method 'lockd' \(did you mean 'steps'"):
        method_config("lockd", stepz=10)
    import inspect
    defaults = {n: p.default for n, p in inspect.signature(lockd.train).parameters.items()}
    assert defaults["lr"] == fxdeco.Lockd().lr and defaults["logit_lr"] == fxdeco.Lockd().logit_lr
    with pytest.raises(ValueError, match="does not decompose from calibration statistics"):
        fxdeco.convert(fxdeco.calibrate(fxdeco.prepare(_rank4()), [torch.randn(64, 16)]), fxdeco.Lockd())
    with pytest.raises(ValueError, match="stat_dtype apply to falor's statistics"):
        fxdeco.transform(_rank4(), [torch.randn(64, 16)], fxdeco.Lockd(steps=1), stat_dtype=torch.float64)


def test_backend_takes_a_config_and_refuses_lockd() -> None:
    model = _model().eval()
    deco = fxdeco.backend(fxdeco.Falor(keep_params=0.6), calib_loader=_calib(), inner="eager")
    deco.calibrate(torch.compile(model, backend=deco))
    decomposed = deco.graphs[0].decomposed
    assert fxdeco.report(decomposed).totals["params_after"] <= 0.6 * sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="cannot run as a torch.compile backend"):
        fxdeco.backend(fxdeco.Lockd())
