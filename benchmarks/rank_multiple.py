"""Which ``rank_multiple`` pays on this CPU: latency of factored Linear layers by rank.

For layer shapes taken from the benchmark models (MiniLM's 384/1536, the
Fashion-MNIST ViT's 128/256) and a fixed number of rows, the two-matmul
factored layer ``x @ Aᵀ @ Bᵀ`` is timed at every rank ``r`` in a range. For each
candidate multiple ``m``, rounding ``r`` up to a multiple of ``m`` costs
``time(round_up(r, m)) / time(r)``: below 1 when aligned ranks run faster despite
the extra work. The geometric mean of that ratio over all ranks and shapes
decides: the default ``rank_multiple`` is the ``m`` with the lowest mean.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

SHAPES = ((384, 384), (384, 1536), (1536, 384), (128, 128), (128, 256))
ROWS = 2048
RANKS = range(24, 97)
MULTIPLES = (1, 4, 8, 16, 32)


def _latency(inp: int, out: int, rank: int, repeats: int = 15) -> float:
    x = torch.randn(ROWS, inp)
    a, b = torch.randn(rank, inp), torch.randn(out, rank)
    with torch.no_grad():
        for _ in range(3):
            torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run() -> dict[str, Any]:
    """Median latency per (shape, rank) and the geometric-mean cost of each multiple."""
    torch.manual_seed(0)
    latency = {(i, o, r): _latency(i, o, r) for i, o in SHAPES for r in range(RANKS.start, RANKS.stop + 32)}
    rows = []
    for m in MULTIPLES:
        logs = [math.log(latency[(i, o, -(-r // m) * m)] / latency[(i, o, r)]) for i, o in SHAPES for r in RANKS]
        per_shape = {f"{i}x{o}": math.exp(sum(math.log(latency[(i, o, -(-r // m) * m)] / latency[(i, o, r)])
                                              for r in RANKS) / len(RANKS)) for i, o in SHAPES}
        rows.append({"multiple": m, "mean_ratio": math.exp(sum(logs) / len(logs)), **per_shape})
    best = min(rows, key=lambda row: row["mean_ratio"])["multiple"]
    return {"rows": rows, "best": best, "threads": torch.get_num_threads(), "rows_per_call": ROWS}


if __name__ == "__main__":
    result = run()
    for row in result["rows"]:
        print(row)
    print("best multiple:", result["best"])
