"""keep_latency planned at the calibration batch against ``latency_batch=1``, both timed at batch 1.

``python -m benchmarks.latency_batch [--keep 0.8] [--only cnn,vit,resnet18,minilm]`` prints, per model, each
plan's quality and its measured latency (interleaved with the original, medians) at batch 1 and at the calibration
batch, as fractions of the original's. Printed only: the numbers depend on the machine's load (run it alone), and
on the small Fashion-MNIST models batch-1 timings are around a millisecond, noisy enough that a budget reachable in
one run is refused in the next. Uses the models and data of :mod:`benchmarks.latency`.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import fxdeco
from benchmarks import latency as bench

def compare(name: str, keep: float) -> None:
    case = bench._cases(False)[name]()
    prepared = fxdeco.calibrate(fxdeco.prepare(case.model, case.batch, keep_batches=2, sensitivity=True,
                                               **case.prepare_options), case.calib, show_progress=False)
    models: dict[str, Any] = {"original": case.model}
    for label, extra in (("planned at the calibration batch", {}), ("latency_batch=1", {"latency_batch": 1})):
        start = time.perf_counter()
        try:
            models[label] = fxdeco.convert(prepared, fxdeco.Falor(keep_latency=keep, latency_cache=False,
                                                                  show_progress=False, **extra))
        except fxdeco.BudgetError as exc:
            print(f"{case.name} | {label}: refused: {exc}")
            continue
        print(f"{case.name} | {label}: converted in {time.perf_counter() - start:.1f} s, {case.quality_name} "
              f"{case.quality(models[label]):.4g}")
    single, whole = bench._time(models, case.single), bench._time(models, case.batch)
    for label in models:
        print(f"{case.name} | {label}: batch 1 {single[label] / single['original']:.3f} "
              f"({single[label] * 1e3:.3g} ms), calibration batch {whole[label] / whole['original']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.8, help="keep_latency of both plans")
    parser.add_argument("--only", default="cnn,vit,resnet18,minilm", help="comma-separated models")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name in args.only.split(","):
        compare(name.strip(), args.keep)


if __name__ == "__main__":
    main()
