"""falor local mode on real data: kept params/MACs vs accuracy/fidelity, and wall time.

Models: a small CNN and a small ViT trained here on Fashion-MNIST (accuracy on
the 10k test images; calibration on 1024 training images), and the pretrained
all-MiniLM-L6-v2 (fidelity on held-out stdlib docstring sentences). Each row
also gives the time of one plain forward pass over the calibration batches,
the floor any data-driven method pays.
"""

from __future__ import annotations

import time
from typing import Any

import torch

import fxdeco
from benchmarks import fashion_mnist as fm

THRESHOLDS = (0.005, 0.01, 0.02, 0.05)


def _plain_forward_s(model: torch.nn.Module, batches: list[Any]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model(**b) if isinstance(b, dict) else model(b)
    return time.perf_counter() - start


def _row(name: str, threshold: float, small: torch.fx.GraphModule, quality: dict[str, float], seconds: float,
         floor: float) -> dict[str, Any]:
    t = fxdeco.report(small).totals
    return {"model": name, "nsr_threshold": threshold, "params": t["params_after"],
            "params_kept": t["params_after"] / t["params_before"], "macs": t["macs_after"],
            "macs_kept": t["macs_after"] / t["macs_before"], **quality, "decompose_s": seconds,
            "calib_forward_s": floor}


def fashion_mnist_rows(name: str) -> list[dict[str, Any]]:
    model = fm.train(name)
    test_x, test_y = fm.load("test")
    train_x, _ = fm.load("train")
    calib = [train_x[i:i + 128] for i in range(0, 1024, 128)]
    floor = _plain_forward_s(model, calib)
    base = fm.accuracy(model, test_x, test_y)
    t = sum(p.numel() for p in model.parameters())
    rows = [{"model": name, "nsr_threshold": None, "params": t, "params_kept": 1.0, "macs": None, "macs_kept": 1.0,
             "accuracy": base, "decompose_s": None, "calib_forward_s": floor}]
    for threshold in THRESHOLDS:
        start = time.perf_counter()
        small = fxdeco.transform(model, calib, nsr_threshold=threshold, show_progress=False)
        seconds = time.perf_counter() - start
        rows.append(_row(name, threshold, small, {"accuracy": fm.accuracy(small, test_x, test_y)}, seconds, floor))
    rows[0]["macs"] = fxdeco.report(small).totals["macs_before"]
    return rows


def minilm_rows() -> list[dict[str, Any]]:
    from fxdeco.cli.minilm import embed, fidelity, load_minilm, padding_mask, tokenized_batches
    from fxdeco.cli.text_corpus import calibration_and_evaluation

    model, tokenizer = load_minilm()
    calib_texts, eval_texts = calibration_and_evaluation(512, 512)
    calib = list(tokenized_batches(tokenizer, calib_texts, 32, 64))
    evaluation = list(tokenized_batches(tokenizer, eval_texts, 32, 64))
    floor = _plain_forward_s(model, calib)
    reference = embed(model, evaluation)
    rows = [{"model": "minilm", "nsr_threshold": None, "params": sum(p.numel() for p in model.parameters()),
             "params_kept": 1.0, "macs": None, "macs_kept": 1.0, **fidelity(reference, reference),
             "decompose_s": None, "calib_forward_s": floor}]
    for threshold in THRESHOLDS:
        start = time.perf_counter()
        small = fxdeco.transform(model, calib, nsr_threshold=threshold, stat_mask_fn=padding_mask,
                                 show_progress=False)
        seconds = time.perf_counter() - start
        rows.append(_row("minilm", threshold, small, fidelity(reference, embed(small, evaluation)), seconds, floor))
    rows[0]["macs"] = fxdeco.report(small).totals["macs_before"]
    return rows


def run() -> list[dict[str, Any]]:
    """Every row of this benchmark, models one after the other in this process."""
    torch.manual_seed(0)
    return fashion_mnist_rows("cnn") + fashion_mnist_rows("vit") + minilm_rows()
