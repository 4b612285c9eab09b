"""Scale: does sequential mode's peak memory grow with depth, or does the C allocator's heap?

``python -m benchmarks.scale_allocator`` writes ``benchmarks/SCALE_ALLOCATOR.md`` (about 25 minutes). The depth
cases of :mod:`benchmarks.scale` (LLaMA-shaped, hidden 1024, 4 and 8 layers, ``keep_params=0.8``, sequential
mode through ``transform`` and in place through ``decompose_``), each run 3 times in a fresh process, once with
glibc's default allocator settings and once with ``MALLOC_MMAP_THRESHOLD_=1048576``: every allocation of 1 MiB
or more is then its own ``mmap``, returned to the system when freed. By default glibc raises that threshold each
time it frees such a block (up to 32 MiB), after which activations, statistics and factors of a few MiB are
carved from the heap, where the holes they leave are kept.

A second table follows the walk block by block (8 layers, sequential, one run per setting): the peak resident
memory over the built model while each block is analysed, in the first walk (statistics and curves only; by
design nothing is kept from one block to the next but a few numbers per layer) and the second (decomposition;
through ``transform`` the result's factors accumulate).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from benchmarks.scale import BATCH, BATCHES, DEPTH_HIDDEN, DEPTH_REPEATS, KEEP, SEQUENCE, VOCAB, _gb

HERE = Path(__file__).resolve().parent
OUT = HERE / "SCALE_ALLOCATOR.md"
SETTINGS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=1048576": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}
MODES = ("sequential", "in place")
DEPTHS = (4, 8)


def _case(layers: int, mode: str, env: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.scale", "--case", str(DEPTH_HIDDEN), str(layers), mode]
    done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent, check=False,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **env})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _walk(env: dict[str, str]) -> dict[str, list[float]]:
    command = [sys.executable, "-m", "benchmarks.scale_allocator", "--walk"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent, check=False,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **env})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def walk_peaks(layers: int = 8) -> dict[str, list[float]]:
    """In this process: sequential falor on the ``layers``-deep model, the peak RSS over the built model (bytes)
    while each block's statistics and analysis run, per walk (sampled every 10 ms)."""
    import fxdeco
    from benchmarks.scale import llama
    from fxdeco.sequential import BlockCalibration

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    model = llama(DEPTH_HIDDEN, layers)
    base = rss()
    label: list[Any] = [None]
    peaks: dict[tuple[int, int], int] = {}
    walk = [0]

    def sample() -> None:
        while True:
            if label[0] is not None:
                peaks[label[0]] = max(peaks.get(label[0], 0), rss() - base)
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    original = BlockCalibration.statistics

    @functools.wraps(original)
    def labelled(self: BlockCalibration, index: int, advance: bool = False) -> Any:
        walk[0] += index == 0
        label[0] = (walk[0], index)  # until the next block's statistics: this block's analysis too
        return original(self, index, advance)

    BlockCalibration.statistics = labelled  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, VOCAB, (BATCH, SEQUENCE), generator=g)} for _ in range(BATCHES)]
    config = fxdeco.Falor(keep_params=KEEP, skip=["lm_head"], budget_criterion="nsr", budget_rounds=0,
                          sequential=True)
    fxdeco.transform(model, batches, config, show_progress=False)
    time.sleep(0.05)
    blocks = max(i for _, i in peaks) + 1
    return {f"walk {w}": [peaks.get((w, i), 0) for i in range(blocks)] for w in (1, 2)}


def main() -> None:
    start = time.perf_counter()
    depth, walks = [], {}
    for name, env in SETTINGS.items():
        for mode in MODES:
            runs = {layers: [_case(layers, mode, env)["peak_rss"] for _ in range(DEPTH_REPEATS)] for layers in DEPTHS}
            params = {layers: _case_params(layers) for layers in DEPTHS}
            a, b = (statistics.median(runs[d]) for d in DEPTHS)
            model_growth = 4 * (params[8] - params[4])
            depth.append([name, mode, f"{_gb(a)} ({_gb(min(runs[4]))}-{_gb(max(runs[4]))})",
                          f"{_gb(b)} ({_gb(min(runs[8]))}-{_gb(max(runs[8]))})", _gb(b - a), _gb(model_growth),
                          f"{(b - a) / model_growth:.2f}", "yes" if b - a <= 1.1 * model_growth else "NO"])
        walks[name] = _walk(env)
    blocks = len(next(iter(walks.values()))["walk 1"])
    per_block = [[f"{w}, block {i}", *(_gb(walks[name][w][i]) for name in SETTINGS)]
                 for w in ("walk 1", "walk 2") for i in range(blocks)]
    lines = [
        "# Scale: sequential mode's peak memory against depth, and glibc's heap",
        "",
        f"Regenerated by `python -m benchmarks.scale_allocator` ({(time.perf_counter() - start) / 60:.0f} minutes). "
        f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, float32, torch "
        f"{torch.__version__}, Python {platform.python_version()}. LLaMA-shaped `LlamaForCausalLM`, hidden "
        f"{DEPTH_HIDDEN}, random weights, {BATCHES} calibration batches of {BATCH} x {SEQUENCE} tokens, "
        f"`keep_params={KEEP}`, `lm_head` dense, each case in its own process, {DEPTH_REPEATS} runs each: the "
        "median peak RSS (GiB) and the runs' range.",
        "",
        tabulate(depth, headers=["allocator", "mode", "4 layers peak", "8 layers peak", "growth", "model growth",
                                 "ratio", "within model growth + 10%"], tablefmt="github"),
        "",
        "With `transform` (\"sequential\") the result's factors also grow with depth (about 0.8 of the model's "
        "growth at this budget); `decompose_` (\"in place\") replaces the model's layers as it goes, so the "
        "model's own growth is its floor.",
        "",
        "## Block by block (8 layers, sequential, one run each)",
        "",
        "Peak RSS over the built model (GiB) while each block's statistics and analysis ran. The last block is the "
        "final norm and `lm_head` (skipped).",
        "",
        tabulate(per_block, headers=["walk, block", *SETTINGS], tablefmt="github"),
        "",
    ]
    OUT.write_text("\n".join(lines))
    print(OUT.read_text())


@functools.cache
def _case_params(layers: int) -> int:
    from benchmarks.scale import llama

    return sum(p.numel() for p in llama(DEPTH_HIDDEN, layers).parameters())


if __name__ == "__main__":
    if sys.argv[1:] == ["--walk"]:
        import logging

        logging.disable(logging.WARNING)
        print(json.dumps(walk_peaks()))
    else:
        main()
