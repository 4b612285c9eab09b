"""Scale: LLaMA-shaped models decomposed one-shot and block-sequentially (``Falor(sequential=True)``).

``python -m benchmarks.scale`` writes ``benchmarks/SCALE.md``. Each LLaMA-shaped ``LlamaForCausalLM`` (random
weights, float32, vocabulary 1024, MLP width ``8/3 * hidden`` rounded up to a multiple of 256 as LLaMA's,
head dimension 128) is decomposed at ``keep_params=0.8`` (``lm_head`` dense) in a fresh process, so its peak
resident memory (``ru_maxrss``) is its own. Both modes allocate the budget by layer NSR (one-shot's default
output-gradient weights need a backward pass, which sequential mode does not have), so the table compares
memory and time of the same criterion. Statistics memory is the float64 sums held at once: all layers' for
one-shot, the largest block's for sequential. "in place" is sequential mode through ``fxdeco.decompose_``:
the caller's model itself is decomposed, each block's dense layers swapped for factored ones (and freed) as
soon as the walk is past the block, so no second model is built.

The perplexity rows run falor one-shot (its default weights, and layer NSR) and sequential on the trained byte
level TinyGPT of :mod:`benchmarks.causal_lm`, on held-out text.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

HERE = Path(__file__).resolve().parent
OUT = HERE / "SCALE.md"
VOCAB, SEQUENCE, BATCH, BATCHES, KEEP = 1024, 128, 4, 8, 0.8
# (hidden width, layers, modes)
# "in place": fxdeco.decompose_ with sequential=True (each block's dense layers swapped out and freed as it goes)
CASES = [(512, 4, ("one-shot", "sequential")), (1024, 4, ("one-shot", "sequential", "in place")),
         (1024, 8, ("one-shot", "sequential", "in place")), (2048, 4, ("one-shot", "sequential")),
         (4096, 4, ("sequential", "in place"))]
# the mode each mode's ranks are compared with
OTHER = {"one-shot": "sequential", "sequential": "one-shot", "in place": "sequential"}
# the depth comparison's cases (hidden 1024, 4 and 8 layers) run this many times, the median peak reported: one
# run's peak RSS varies by about 0.1 GB, half the model's growth from 4 to 8 layers
DEPTH_HIDDEN, DEPTH_REPEATS = 1024, 3
# 1 against 2 processes (torchrun, gloo)
DISTRIBUTED = [(1024, 4, "one-shot"), (1024, 4, "sequential")]
log = logging.getLogger("benchmarks.scale")


def mlp_width(hidden: int) -> int:
    """LLaMA's MLP width: 2/3 of 4 x hidden, rounded up to a multiple of 256 (4096 -> 11008)."""
    return -(-int(2 * 4 * hidden / 3) // 256) * 256


def llama(hidden: int, layers: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=mlp_width(hidden),
                                      num_hidden_layers=layers, num_attention_heads=max(4, hidden // 128),
                                      num_key_value_heads=max(4, hidden // 128), max_position_embeddings=SEQUENCE)
    return transformers.LlamaForCausalLM(config).eval()


def statistics_bytes(model: torch.nn.Module, example: dict[str, torch.Tensor]) -> int:
    """The float64 sums one-shot calibration holds for every layer at once (input-side groups shared)."""
    import fxdeco
    from passes.stats import input_side_groups

    prepared = fxdeco.prepare(model, example)
    sites = [s for s in prepared.sites if s.target != "lm_head"]
    groups = input_side_groups(prepared.gm, sites)
    on_input = {s.node for group in groups.values() for s in group}
    widths = [group[0].in_features for group in groups.values()]
    widths += [s.out_features for s in sites if s.node not in on_input]
    return sum(8 * w * w for w in widths)


def run_case(hidden: int, layers: int, mode: str) -> dict[str, Any]:
    """One decomposition in this process: its wall time, peak RSS and plan."""
    import fxdeco
    from fxdeco.metadata import model_record

    model = llama(hidden, layers)
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, VOCAB, (BATCH, SEQUENCE), generator=g)} for _ in range(BATCHES)]
    config = fxdeco.Falor(keep_params=KEEP, skip=["lm_head"], budget_criterion="nsr", budget_rounds=0,
                          sequential=mode != "one-shot")
    decompose = fxdeco.decompose_ if mode == "in place" else fxdeco.transform
    start = time.perf_counter()
    small = decompose(model, batches, config, show_progress=False)
    seconds = time.perf_counter() - start
    record = model_record(small)
    summary = record.summary.get("sequential")
    stats = summary["peak_statistics_bytes"] if summary else statistics_bytes(model, batches[0])
    return {"hidden": hidden, "layers": layers, "mode": mode, "params": params, "seconds": seconds,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "statistics": stats,
            "kept": sum(p.numel() for p in small.parameters()) / params,
            "ranks": {d.target: d.rank for d in record.decisions}}


def run_distributed_case(hidden: int, layers: int, mode: str) -> dict[str, Any] | None:
    """One rank of a torchrun of ``--distributed-case``: its shard of the same batches, statistics all-reduced.
    Rank 0 returns the figures (its wall time, its peak RSS, the plan), the others None."""
    import torch.distributed as dist

    import fxdeco

    dist.init_process_group("gloo")
    try:
        model = llama(hidden, layers)
        g = torch.Generator().manual_seed(1)
        batches = [{"input_ids": torch.randint(0, VOCAB, (BATCH, SEQUENCE), generator=g)} for _ in range(BATCHES)]
        config = fxdeco.Falor(keep_params=KEEP, skip=["lm_head"], budget_criterion="nsr", budget_rounds=0,
                              sequential=mode == "sequential")
        dist.barrier()
        start = time.perf_counter()
        small = fxdeco.transform(model, fxdeco.distributed.shard(batches), config, show_progress=False)
        seconds = time.perf_counter() - start
        if dist.get_rank() != 0:
            return None
        return {"hidden": hidden, "layers": layers, "mode": mode, "processes": dist.get_world_size(),
                "seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "ranks": {d.target: d.rank for d in small.meta["fxdeco"].decisions}}
    finally:
        dist.destroy_process_group()


def _in_torchrun(hidden: int, layers: int, mode: str, processes: int = 2) -> dict[str, Any]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "benchmarks.scale", "--distributed-case", str(hidden), str(layers), mode]
    done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent, check=False,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _in_subprocess(hidden: int, layers: int, mode: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.scale", "--case", str(hidden), str(layers), mode]
    done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent, check=False,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def perplexity_rows() -> list[list[str]]:
    """One-shot against sequential falor on the trained TinyGPT, at 20% and 40% fewer parameters."""
    import fxdeco
    from benchmarks import causal_lm as lm
    from benchmarks.dwain import SKIP, _calibration, _ids, _params

    model, calib, held_out = lm.train(), _calibration(), lm.evaluation_batches()
    before = _params(model)
    rows = [["original", "100.0%", f"{lm.perplexity(model, held_out):.3f}"]]
    variants = [("one-shot, output-gradient weights (default)", {}),
                ("one-shot, layer NSR", {"budget_criterion": "nsr"}),
                ("sequential (layer NSR)", {"sequential": True})]
    for keep in (0.8, 0.6):
        for name, options in variants:
            config = fxdeco.Falor(keep_params=keep, skip=SKIP, show_progress=False, **options)
            small = fxdeco.transform(model, calib, config, input_fn=_ids, show_progress=False)
            rows.append([f"keep_params={keep}: {name}", f"{_params(small) / before:.1%}",
                         f"{lm.perplexity(small, held_out):.3f}"])
    return rows


def _gb(n: float) -> str:
    return f"{n / 2 ** 30:.2f}"


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median peak RSS (its plan and figures), with every run's peak and the median wall time."""
    ordered = sorted(runs, key=lambda r: r["peak_rss"])
    median = dict(ordered[len(ordered) // 2])
    median["peaks"] = [r["peak_rss"] for r in ordered]
    median["seconds"] = sorted(r["seconds"] for r in runs)[len(runs) // 2]
    return median


def _peak(run: dict[str, Any]) -> str:
    """A peak RSS, with the range of the runs when there were several."""
    peaks = run.get("peaks", [run["peak_rss"]])
    return _gb(run["peak_rss"]) + (f" ({_gb(peaks[0])}-{_gb(peaks[-1])})" if len(peaks) > 1 else "")


def main() -> None:
    start = time.perf_counter()
    results = []
    for hidden, layers, modes in CASES:
        for mode in modes:
            log.warning("scale: hidden %d, %d layers, %s", hidden, layers, mode)
            runs = [_in_subprocess(hidden, layers, mode) for _ in range(DEPTH_REPEATS if hidden == DEPTH_HIDDEN else 1)]
            results.append(_median_run(runs))
    by_key = {(r["hidden"], r["layers"], r["mode"]): r for r in results}
    table = []
    for r in results:
        other = by_key.get((r["hidden"], r["layers"], OTHER[r["mode"]]))
        same = "-"
        if other is not None:
            equal = sum(r["ranks"][t] == other["ranks"][t] for t in r["ranks"])
            same = f"{equal}/{len(r['ranks'])}"
        table.append([r["hidden"], mlp_width(r["hidden"]), r["layers"], f"{r['params'] / 1e6:.0f}M",
                      _gb(4 * r["params"]), r["mode"], f"{r['seconds']:.0f}", _gb(r["peak_rss"]),
                      _gb(r["statistics"]), f"{r['kept']:.1%}", same])
    depth = []
    for mode in OTHER:
        a, b = by_key.get((1024, 4, mode)), by_key.get((1024, 8, mode))
        if a and b:
            model_growth = 4 * (b["params"] - a["params"])
            # the caller's model and the decomposed result must both exist at the end
            both_growth = 4 * (b["params"] * (1 + b["kept"]) - a["params"] * (1 + a["kept"]))
            rss_growth = b["peak_rss"] - a["peak_rss"]
            depth.append([mode, _peak(a), _peak(b), _gb(rss_growth), _gb(model_growth),
                          f"{rss_growth / model_growth:.2f}", "yes" if rss_growth <= 1.1 * model_growth else "NO",
                          _gb(both_growth), "yes" if rss_growth <= 1.1 * both_growth else "NO"])
    processes = []
    for hidden, layers, mode in DISTRIBUTED:
        log.warning("scale: hidden %d, %d layers, %s, 2 processes", hidden, layers, mode)
        two, one = _in_torchrun(hidden, layers, mode), by_key[(hidden, layers, mode)]
        apart = [abs((one["ranks"][t] or 0) - (two["ranks"][t] or 0)) if (one["ranks"][t] is None) ==
                 (two["ranks"][t] is None) else float("inf") for t in one["ranks"]]
        processes.append([hidden, layers, mode, f"{one['seconds']:.0f}", f"{two['seconds']:.0f}",
                          f"{one['seconds'] / two['seconds']:.2f}x", f"{sum(a == 0 for a in apart)}/{len(apart)}",
                          f"{max(apart):g}", "yes" if max(apart) <= 1 else "NO"])
    ppl = perplexity_rows()
    lines = [
        "# Scale: one-shot and block-sequential decomposition",
        "",
        f"Regenerated by `python -m benchmarks.scale` ({(time.perf_counter() - start) / 60:.0f} minutes). CPU "
        f"({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, float32, torch "
        f"{torch.__version__}; each run in its own process. LLaMA-shaped `LlamaForCausalLM`, random weights, "
        f"vocabulary {VOCAB}, {BATCHES} calibration batches of {BATCH} x {SEQUENCE} tokens, "
        f"`keep_params={KEEP}`, `lm_head` dense, budget allocated by layer NSR in both modes, no measured rounds.",
        "",
        tabulate(table, headers=["hidden", "MLP", "layers", "params", "model (GB)", "mode", "wall (s)",
                                 "peak RSS (GB)", "statistics (GB)", "params kept", "same ranks as compared mode"],
                 tablefmt="github"),
        "",
        "Compared modes: one-shot with sequential, in place with sequential (the same walk: its ranks must be "
        "equal). One-shot and sequential ranks differ by design: sequential statistics see the decomposed upstream "
        "blocks.",
        "",
        "## Depth at fixed width (hidden 1024): peak memory against the model's own growth",
        "",
        f"Each case run {DEPTH_REPEATS} times (in its own process each time); the median peak, the runs' range in "
        "parentheses, and the growth between the medians. The table above shows the median run of these cases.",
        "",
        tabulate(depth, headers=["mode", "4 layers peak RSS (GB)", "8 layers peak RSS (GB)", "RSS growth (GB)",
                                 "model growth (GB)", "ratio", "within model growth + 10%",
                                 "model + result growth (GB)", "within model + result growth + 10%"],
                 tablefmt="github"),
        "",
        "With `transform`, the caller's model and the decomposed model (its own weights: it must not alias the "
        "caller's) both exist when it returns, so their growth is the floor; the statistics are what sequential "
        "mode keeps from growing with depth. `decompose_` (in place) changes the caller's model instead, freeing "
        "each block's dense weights as it goes, so its floor is the model's own growth.",
        "",
        "## One process against two (torchrun, gloo, one thread each)",
        "",
        "The same batches: one process calibrates on all of them (2 threads), or two ranks on half each, "
        "statistics all-reduced. Both ranks' plans are checked equal by fxdeco itself (it raises otherwise).",
        "",
        tabulate(processes, headers=["hidden", "layers", "mode", "1 process (s)", "2 processes (s)", "speed-up",
                                     "same ranks", "most ranks apart", "at most 1 apart"], tablefmt="github"),
        "",
        "## Perplexity on the trained TinyGPT (same budget)",
        "",
        tabulate(ppl, headers=["variant", "params kept", "held-out perplexity"], tablefmt="github"),
        "",
    ]
    OUT.write_text("\n".join(lines))
    print(OUT.read_text())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs=3, metavar=("HIDDEN", "LAYERS", "MODE"))
    parser.add_argument("--distributed-case", nargs=3, metavar=("HIDDEN", "LAYERS", "MODE"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.distributed_case:
        logging.disable(logging.WARNING)
        figures = run_distributed_case(int(args.distributed_case[0]), int(args.distributed_case[1]),
                                       args.distributed_case[2])
        if figures is not None:
            print(json.dumps(figures))
    elif args.case:
        logging.disable(logging.WARNING)
        print(json.dumps(run_case(int(args.case[0]), int(args.case[1]), args.case[2])))
    else:
        main()
