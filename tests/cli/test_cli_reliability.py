"""CLI reliability: ``--calib random`` for models that do not take images (``--input-shape``, a declared or
implied shape, a one-line failure on the first batch when the shape does not fit, what was fed recorded), the
demo's numeric options as usage errors, the demo's speed sentence when the decomposed model is slower, and
``fxdeco report`` without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxdeco.cli.calib_sources import CalibrationSourceError, example_batch, input_info, load_calibration
from fxdeco.cli import main
from fxdeco.cli.model_specs import ModelSpecError, build_model, parse_model_spec

ROOT = Path(__file__).resolve().parents[2]  # the repository: tests/cli/ is two levels down
pytestmark = pytest.mark.usefixtures("one_thread")

MLP = """
import torch
from torch import nn


def make():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def normed():  # no convolution, and the first layer is not an nn.Linear: nothing to infer the shape from
    return nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 10))
"""


@pytest.fixture()
def mlp_file(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.py"
    path.write_text(MLP)
    return path


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    assert exc.value.code == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------------------- --calib random for non-image models


def test_random_data_takes_the_input_shape(mlp_file: Path) -> None:
    from fxdeco.cli.calib_sources import check_first_batch

    built = build_model(parse_model_spec(f"{mlp_file}:make"))
    calib = load_calibration("random", built, batches=2, batch_size=4, input_shape=(32,))
    assert [tuple(b.shape) for b in calib.batches] == [(4, 32), (4, 32)] and calib.batches[0].dtype == torch.float32
    assert calib.random and calib.description.startswith("RANDOM DATA")
    assert "samples of shape 32 (--input-shape)" in calib.description
    assert "float32 tensors of shape (4, 32)" in calib.description
    info = input_info(calib)
    assert info == {"kind": "tensor", "shape": [32], "dtype": "float32"}
    assert tuple(example_batch(built, info).shape) == (2, 32)
    check_first_batch(built, calib)  # fits: no error
    # a multi-dimensional sample
    calib = load_calibration("random", built, batches=1, batch_size=2, input_shape=(3, 5, 32))
    assert tuple(calib.batches[0].shape) == (2, 3, 5, 32)


def test_input_shape_is_for_random_tensors_only(mlp_file: Path, tmp_path: Path) -> None:
    built = build_model(parse_model_spec(f"{mlp_file}:make"))
    with pytest.raises(CalibrationSourceError, match="--input-shape sets the shape of random data"):
        load_calibration(str(tmp_path), built, input_shape=(32,))
    with pytest.raises(CalibrationSourceError, match="not both"):
        load_calibration("random", built, input_shape=(32,), image_size=28)


def test_image_size_on_a_model_that_takes_vectors_is_refused(mlp_file: Path) -> None:
    # images 32 wide would reach Linear(32, 64) and pass, broadcast over their rows: calibrated on nonsense
    built = build_model(parse_model_spec(f"{mlp_file}:make"))
    with pytest.raises(CalibrationSourceError, match=r"--image-size sizes images, but .* takes samples of shape 32 "
                                                     r"\(guessed from .*in_features 32\).*--input-shape"):
        load_calibration("random", built, batches=1, batch_size=2, image_size=32)


def test_factory_shapes_declared_or_implied(tmp_path: Path, mlp_file: Path) -> None:
    # implied: no convolution and a first nn.Linear -> vectors of its in_features
    built = build_model(parse_model_spec(f"{mlp_file}:make"))
    assert built.input_shape == (32,) and "in_features 32" in built.input_shape_origin
    # nothing to go on -> images, as before
    assert build_model(parse_model_spec(f"{mlp_file}:normed")).input_shape is None
    # declared in the file, and on the model (which wins)
    declared = tmp_path / "declared.py"
    declared.write_text(MLP + "\nexample_input_shape = (5, 32)\n\n\ndef tagged():\n    m = make()\n"
                        "    m.example_input_shape = (7, 32)\n    return m\n\n\ndef bad():\n    m = make()\n"
                        "    m.example_input_shape = '32'\n    return m\n")
    built = build_model(parse_model_spec(f"{declared}:make"))
    assert built.input_shape == (5, 32) and "example_input_shape in" in built.input_shape_origin
    calib = load_calibration("random", built, batches=1, batch_size=2)
    assert tuple(calib.batches[0].shape) == (2, 5, 32) and "example_input_shape" in calib.description
    assert build_model(parse_model_spec(f"{declared}:tagged")).input_shape == (7, 32)
    with pytest.raises(ModelSpecError, match="example_input_shape of the model bad.. returns is '32'"):
        build_model(parse_model_spec(f"{declared}:bad"))
    # a convolutional model still gets images
    conv = tmp_path / "conv.py"
    conv.write_text("from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), "
                    "nn.LazyLinear(2))\n")
    built = build_model(parse_model_spec(f"{conv}:make"))
    assert built.input_shape is None
    calib = load_calibration("random", built, batches=1, batch_size=2, image_size=8)
    assert tuple(calib.batches[0].shape) == (2, 1, 8, 8) and input_info(calib)["kind"] == "image"


def test_mlp_factory_decomposes_on_random_vectors(capsys, caplog, mlp_file: Path, tmp_path: Path) -> None:
    """The reported case: an MLP factory with --calib random used to be fed images and fail deep inside."""
    out = tmp_path / "mlp"
    fed = "float32 tensors of shape (16, 32)"
    code, stdout, err = run_main(capsys, "decompose", f"{mlp_file}:make", "--calib", "random", "--batches", "2",
                                 "--batch-size", "16", "--dump-format", "dot", "--out", str(out))
    assert code == 0, err
    assert f"random data ({fed})" in caplog.text  # the warning says what was fed
    cli = json.loads((out / "cli.json").read_text())
    assert cli["input"] == {"kind": "tensor", "shape": [32], "dtype": "float32"}
    assert fed in cli["calibration"]["description"]
    report = (out / "report.txt").read_text()
    assert report.startswith("model: ") and fed in report.splitlines()[1]  # the calibration line
    assert fed in stdout and fed in json.loads((out / "report.json").read_text())["calibration"]["description"]
    # dump rebuilds an example input of the recorded shape
    code, stdout, err = run_main(capsys, "dump", str(out), "--format", "dot", "--out", str(tmp_path / "again"))
    assert code == 0, err
    assert (tmp_path / "again" / "graph.dot").is_file()


@pytest.mark.parametrize("spec, extra, fed", [
    ("make", ["--input-shape", "16"], "float32 tensors of shape (2, 16)"),
    ("normed", [], "float32 tensors of shape (2, 3, 224, 224)"),  # nothing to infer from: images, as before
])
def test_a_shape_that_does_not_fit_fails_on_the_first_batch(capsys, monkeypatch, mlp_file: Path, tmp_path: Path,
                                                            spec: str, extra: list[str], fed: str) -> None:
    import fxdeco

    def transform(*args, **kwargs):
        raise AssertionError("the decomposition started: the shape should have failed on the first batch")

    monkeypatch.setattr(fxdeco, "transform", transform)
    out = tmp_path / "o"
    code, _, err = run_main(capsys, "decompose", f"{mlp_file}:{spec}", "--calib", "random", "--batches", "2",
                            "--batch-size", "2", *extra, "--out", str(out))
    assert code == 1
    error = err.strip().splitlines()[-1]
    assert error.startswith("fxdeco: error: the model fails on the first calibration batch")
    assert fed in error and "--input-shape" in error and "AssertionError" not in err
    assert not out.exists()


@pytest.mark.parametrize("args", [
    ["--calib", "random", "--input-shape", "0"],
    ["--calib", "random", "--input-shape", "3,-1"],
    ["--calib", "random", "--input-shape", "three"],
    ["--calib", "random", "--input-shape", "32", "--image-size", "32"],
    ["--calib", "fashion-mnist", "--input-shape", "32"],
])
def test_input_shape_usage_errors_exit_2(capsys, args: list[str]) -> None:
    err = usage_error(capsys, "decompose", "m.py:make", *args, "--out", "o")
    assert "usage: fxdeco decompose" in err and "--input-shape" in err.splitlines()[-1]


# ----------------------------------------------------------------------------- demo options and summary


@pytest.mark.parametrize("option, value", [
    ("--batch-size", "0"), ("--batch-size", "-4"), ("--calib-sentences", "0"), ("--eval-sentences", "-1"),
    ("--max-length", "0"), ("--nsr-threshold", "0"), ("--nsr-threshold", "-0.1"),
])
def test_demo_numeric_options_are_usage_errors(capsys, monkeypatch, option: str, value: str) -> None:
    import fxdeco.cli.demo

    def run_demo(*args, **kwargs):
        raise AssertionError("the demo ran")

    monkeypatch.setattr(fxdeco.cli.demo, "run_demo", run_demo)
    err = usage_error(capsys, "demo", option, value)
    assert "usage: fxdeco demo" in err and f"argument {option}" in err


def test_demo_config_refuses_nonpositive_sizes() -> None:
    from fxdeco.cli.demo import DemoConfig

    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        DemoConfig(batch_size=0)
    with pytest.raises(ValueError, match="nsr_threshold"):
        DemoConfig(nsr_threshold=0.0)


class _Report:
    totals = {"params_before": 22_000_000, "params_after": 15_000_000, "macs_before": 1_000_000,
              "macs_after": 700_000}

    def __str__(self) -> str:
        return "(per-layer table)"


def _demo_text(original_s: float, decomposed_s: float) -> str:
    from fxdeco.cli.demo import DemoConfig, format_demo

    return format_demo({"report": _Report(), "config": DemoConfig(eval_sentences=64),
                        "fidelity_before": {"cosine": 1.0, "nn_agreement": 1.0},
                        "fidelity_after": {"cosine": 0.98, "nn_agreement": 0.9}, "decompose_s": 3.0,
                        "eval_original_s": original_s, "eval_decomposed_s": decomposed_s})


def test_demo_summary_says_plainly_when_the_decomposed_model_was_slower() -> None:
    slower = _demo_text(1.0, 1.075)
    assert "the decomposed model ran 0.93x as fast as the original here, i.e. SLOWER" in slower
    assert "fewer MACs do not always mean faster" in slower
    assert "1.00" in slower and "1.07" in slower  # the measured times are still shown
    faster = _demo_text(1.0, 0.8)
    assert "the decomposed model ran 1.25x as fast as the original here" in faster
    assert "SLOWER" not in faster and "fewer MACs" not in faster
    even = _demo_text(1.0, 1.004)  # rounds to 1.00: neither a gain nor hidden
    assert "about as fast as the original here (0.996x)" in even and "SLOWER" not in even


# ----------------------------------------------------------------------------- fxdeco report without torch


def _saved(tmp_path: Path) -> Path:
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "report.txt").write_text("model: m\nTOTAL (model)\n")
    (folder / "report.json").write_text('{"rows": []}\n')
    return folder


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)


CLI_ALONE = r"""
import contextlib, io, sys, types

# fxdeco.cli on its own, without fxdeco/__init__.py (which imports the whole library and torch)
package = types.ModuleType("fxdeco")
package.__path__ = [sys.argv[1]]
sys.modules["fxdeco"] = package
from fxdeco.cli import main

saved, foreign = sys.argv[2], sys.argv[3]
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    assert main(["report", saved]) == 0
    assert main(["report", saved, "--json"]) == 0
    assert main(["report", foreign]) == 1  # a user error, shown in one line
    for argv, code in ([["--help"], 0], [["report", "--help"], 0], [["decompose", "--help"], 0],
                       [["demo", "--batch-size", "0"], 2], [["frobnicate"], 2]):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == code, (argv, exc.code)
assert "TOTAL (model)" in out.getvalue(), out.getvalue()
assert "fxdeco: error: " in err.getvalue() and "has no report.txt" in err.getvalue(), err.getvalue()
heavy = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "numpy", "passes"))
assert not heavy, f"{len(heavy)} heavy modules imported, e.g. {heavy[:5]}"
print("ok")
"""


def test_cli_module_runs_report_help_and_usage_errors_without_torch(tmp_path: Path) -> None:
    """fxdeco/cli/__init__.py itself imports nothing heavy: report, --help, usage errors and user errors need no torch."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    res = _python(CLI_ALONE, str(ROOT / "fxdeco"), str(_saved(tmp_path)), str(foreign))
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_fxdeco_report_does_not_import_torch(tmp_path: Path) -> None:
    """The whole command, as the console script runs it: needs a lazy fxdeco/__init__.py."""
    code = ("import sys; from fxdeco.cli import main; rc = main(['report', sys.argv[1]]); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'fxdeco report imported torch'")
    res = _python(code, str(_saved(tmp_path)))
    assert res.returncode == 0, res.stderr
    assert res.stdout == "model: m\nTOTAL (model)\n"


def test_python_dash_m_fxdeco_is_the_command(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "fxdeco", "report", str(_saved(tmp_path))], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout == "model: m\nTOTAL (model)\n", res.stderr


def test_report_json_of_a_damaged_file_is_an_error_not_output(capsys, tmp_path: Path) -> None:
    from fxdeco.cli import main

    folder = _saved(tmp_path)
    (folder / "report.json").write_text("{bad")
    assert main(["report", str(folder), "--json"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "report.json is not valid JSON" in err


def test_dump_from_another_directory_rebuilds_the_saved_model_file(capsys, tmp_path: Path, monkeypatch) -> None:
    """cli.json records a relative ``file.py:FACTORY`` as an absolute path: ``fxdeco dump`` run from another
    directory once rebuilt whatever file of that name lay there (a GELU model drawn for a saved ReLU one)."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    for folder, act in ((mine, "ReLU"), (other, "GELU")):
        folder.mkdir()
        (folder / "net.py").write_text("import torch\nfrom torch import nn\n\n\ndef build():\n"
                                       "    torch.manual_seed(0)\n"
                                       f"    return nn.Sequential(nn.Linear(16, 32), nn.{act}(), nn.Linear(32, 8))\n")
    monkeypatch.chdir(mine)
    out = tmp_path / "out"
    assert main(["decompose", "net.py:build", "--calib", "random", "--batches", "2", "--nsr-threshold", "0.2",
                 "--dump-format", "dot", "--out", str(out)]) == 0
    assert json.loads((out / "cli.json").read_text())["model"] == f"{mine / 'net.py'}:build"
    monkeypatch.chdir(other)
    code, _, err = run_main(capsys, "dump", str(out), "--format", "dot", "--out", str(tmp_path / "again"))
    assert code == 0, err
    dot = (tmp_path / "again" / "graph.dot").read_text()
    assert "relu" in dot.lower() and "gelu" not in dot.lower()


def test_decompose_again_into_one_directory_leaves_no_file_of_the_previous_run(capsys, mlp_file: Path,
                                                                                tmp_path: Path) -> None:
    """A second ``decompose --out DIR`` that writes fewer graph formats than the first used to leave the first
    model's graph.html beside the new plan, and list it among the files it wrote."""
    out = tmp_path / "out"
    common = ["--calib", "random", "--batches", "2", "--nsr-threshold", "0.2", "--out", str(out)]
    assert main(["decompose", f"{mlp_file}:make", *common, "--dump-format", "html", "dot"]) == 0
    assert (out / "graph.html").is_file()
    capsys.readouterr()
    assert main(["decompose", f"{mlp_file}:make", *common, "--dump-format", "dot"]) == 0
    wrote = capsys.readouterr().out.splitlines()[-1]
    assert not (out / "graph.html").exists() and "graph.html" not in wrote and "graph.dot" in wrote
