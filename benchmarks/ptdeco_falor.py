"""ptdeco's falor against fxdeco on the Fashion-MNIST CNN and ViT of ``benchmarks/fashion_mnist.py``.

For each ``nsr_final_threshold`` ptdeco's ``falor.decompose_in_place`` runs on a
deep copy of the trained model (CPU, float64 statistics, ptdeco's own script
settings ``use_mean=False, use_damping=True``; ``kl_final_threshold=1e9`` so the
final-output NSR alone decides, as fxdeco's criterion is an NSR too). Its data
iterator cycles over the same calibration batches as ``falor_local`` (training
images [0:1024], 8 batches of 128): ptdeco pulls ``num_data_steps`` batches per
layer for the covariance and ``num_metric_steps`` per binary-search probe, each
probe costing two full forward passes, so it reads far more than 8 batches.
Full-model forward passes are counted with a forward pre-hook on the root module.

Right after, in the same process, fxdeco's budget mode runs at ptdeco's kept
parameter fraction: (a) over every layer it can decompose, (b) restricted to the
layers ptdeco can decompose (Linear and 1x1 Conv2d; kxk convolutions skipped),
the like-for-like comparison. ptdeco results are cached as JSON in
``benchmarks/cache/`` keyed by model, weights file, data, settings and ptdeco
version; fxdeco always re-runs (it takes about a second).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Iterator
from unittest import mock

import torch
import torch.fx
from torch import nn

import fxdeco
from benchmarks import fashion_mnist as fm
from passes import CostProp, graph_macs
from passes.sensitivity import SensitivityInterpreter

THRESHOLDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
MODELS = ("cnn", "vit")
PTDECO_SETTINGS: dict[str, Any] = {
    "proportion_threshold": 1.0, "kl_final_threshold": 1e9, "num_data_steps": 8, "num_metric_steps": 2,
    "use_float64": True, "use_mean": False, "use_damping": True,
}
DATA_SPEC = {"dataset": "fashion-mnist", "split": "train", "start": 0, "stop": 1024, "batch_size": 128,
             "iterator": "itertools.cycle"}
PLOT = Path(__file__).resolve().parent / "falor_vs_ptdeco.png"
log = logging.getLogger(__name__)


def weights_file(name: str) -> str:
    """Name of the cached weights file ``fm.train(name)`` loads (same key as ``fashion_mnist.train``)."""
    settings = {"name": name, "epochs": 3, "batch_size": 128, "lr": 2e-3, "seed": 0, "v": 1}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = fm.CACHE / f"{name}-{key}.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run fashion_mnist.train({name!r}) first (python -m benchmarks.run)")
    return path.name


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs_per_image(model: nn.Module, batch: torch.Tensor) -> float:
    """MACs per image from fxdeco's cost pass on a fresh symbolic trace of ``model``."""
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        CostProp(gm).run(batch)
    return graph_macs(gm) / batch.shape[0]


def _ptdeco_layers(model: nn.Module) -> list[str]:
    from ptdeco.falor import is_decomposeable_module
    return [n for n, m in model.named_modules() if is_decomposeable_module(m)]


def kxk_conv_names(model: nn.Module) -> list[str]:
    """Linear/Conv2d layers that ptdeco's falor cannot decompose (kxk convolutions, k > 1, or grouped)."""
    from ptdeco.falor import is_decomposeable_module
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not is_decomposeable_module(m)]


def _full_rank(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return min(m.in_features, m.out_features)
    return min(m.in_channels, m.out_channels)


def _rank(m: nn.Module) -> int:
    first = m[0]
    return first.out_features if isinstance(first, nn.Linear) else first.out_channels


def run_ptdeco(name: str, model: nn.Module, calib: list[torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
               threshold: float) -> dict[str, Any]:
    """One ptdeco falor run on a deep copy of ``model``; its JSON-able result row (cached)."""
    import ptdeco
    import ptdeco.falor

    spec = {"model": name, "weights": weights_file(name), "data": DATA_SPEC, "settings": PTDECO_SETTINGS,
            "nsr_final_threshold": threshold, "ptdeco": ptdeco.__version__, "v": 1}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    path = fm.CACHE / f"ptdeco-falor-{name}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())

    small = copy.deepcopy(model).eval()
    passes = [0]
    hook = small.register_forward_pre_hook(lambda _m, _a: passes.__setitem__(0, passes[0] + 1))
    start = time.perf_counter()
    config = ptdeco.falor.decompose_in_place(module=small, device=torch.device("cpu"),
                                             data_iterator=itertools.cycle(calib),
                                             nsr_final_threshold=threshold, **PTDECO_SETTINGS)
    seconds = time.perf_counter() - start
    hook.remove()
    layers = {}
    for layer in _ptdeco_layers(model):
        m = small.get_submodule(layer)
        full = _full_rank(model.get_submodule(layer))
        layers[layer] = {"rank": _rank(m) if isinstance(m, nn.Sequential) else None, "full_rank": full,
                         "nsr_final": config.get(layer, {}).get("__meta__", {}).get("nsr_final")}
    row = {"model": name, "threshold": threshold, "tool": "ptdeco", "mode": "falor nsr_final_threshold",
           "params": n_params(small), "params_kept": n_params(small) / n_params(model),
           "macs": macs_per_image(small, calib[0]), "accuracy": fm.accuracy(small, *test),
           "seconds": seconds, "forward_passes": passes[0], "layers": layers, "spec": spec}
    fm.CACHE.mkdir(exist_ok=True)
    path.write_text(json.dumps(row, indent=1, sort_keys=True))
    return row


class _Counting:
    """An iterable over ``batches`` that counts the batches read."""

    def __init__(self, batches: Iterable[torch.Tensor]) -> None:
        self.batches, self.read = batches, 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        for b in self.batches:
            self.read += 1
            yield b


def run_fxdeco(name: str, model: nn.Module, calib: list[torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
               threshold: float, keep: float, skip: list[str], mode: str,
               criterion: str = "auto", rounds: int = 1) -> dict[str, Any]:
    """fxdeco budget mode at ``keep_params=keep`` with ``budget_rounds=rounds``.

    Forward passes = calibration batches + cost-pass runs + sensitivity passes (each of those also
    runs one backward pass) + for the measured refinement, one reference pass, one incremental walk
    per round and the probes' replays in whole-forward equivalents.
    """
    loader = _Counting(calib)
    with mock.patch.object(CostProp, "run", autospec=True, side_effect=CostProp.run) as cost_runs, \
            mock.patch.object(SensitivityInterpreter, "run", autospec=True,
                              side_effect=SensitivityInterpreter.run) as sensitivity_runs:
        start = time.perf_counter()
        small = fxdeco.transform(model, loader, keep_params=keep, skip=skip, budget_criterion=criterion,
                                 budget_rounds=rounds, rank_multiple=1, show_progress=False)  # ptdeco's granularity
        seconds = time.perf_counter() - start
    summary = small.meta["fxdeco"].summary
    refinement = 1 + summary["budget_rounds"] + summary["probe_forward_equivalents"] if "probes" in summary else 0.0
    layers = {r["name"]: {"rank": r["rank"], "full_rank": r["full_rank"]} for r in fxdeco.report(small).rows}
    return {"model": name, "threshold": threshold, "tool": "fxdeco", "mode": mode,
            "params": n_params(small), "params_kept": n_params(small) / n_params(model),
            "macs": macs_per_image(small, calib[0]), "accuracy": fm.accuracy(small, *test),
            "seconds": seconds,
            "forward_passes": round(loader.read + cost_runs.call_count + sensitivity_runs.call_count + refinement, 1),
            "layers": layers}


def run_fxdeco_final(name: str, model: nn.Module, calib: list[torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                     threshold: float, skip: list[str], mode: str) -> dict[str, Any]:
    """fxdeco final-output mode at ptdeco's ``nsr_final_threshold`` (same KL setting, 2 metric batches,
    rank_multiple=1 as ptdeco).

    Forward passes = calibration batches + the cost pass + one sensitivity pass per metric batch (each with a
    backward pass) + per metric batch one reference pass and one incremental walk + the probes' replays, in
    whole-forward equivalents (MACs replayed / MACs of one forward).
    """
    loader = _Counting(calib)
    with mock.patch.object(CostProp, "run", autospec=True, side_effect=CostProp.run) as cost_runs, \
            mock.patch.object(SensitivityInterpreter, "run", autospec=True,
                              side_effect=SensitivityInterpreter.run) as sensitivity_runs:
        start = time.perf_counter()
        small = fxdeco.transform(model, loader, nsr_final_threshold=threshold,
                                 kl_final_threshold=PTDECO_SETTINGS["kl_final_threshold"],
                                 num_metric_batches=PTDECO_SETTINGS["num_metric_steps"], rank_multiple=1, skip=skip,
                                 show_progress=False)
        seconds = time.perf_counter() - start
    meta = small.meta["fxdeco"]
    decisions, summary = meta.decisions, meta.summary
    layers = {d.target: {"rank": d.rank, "full_rank": d.full_rank, "nsr_final": d.nsr_final} for d in decisions}
    measured = [d.nsr_final for d in decisions if d.decomposed]
    passes = (loader.read + cost_runs.call_count + sensitivity_runs.call_count + 2 * summary["metric_batches"]
              + summary["probe_forward_equivalents"])
    return {"model": name, "threshold": threshold, "tool": "fxdeco", "mode": mode,
            "params": n_params(small), "params_kept": n_params(small) / n_params(model),
            "macs": macs_per_image(small, calib[0]), "accuracy": fm.accuracy(small, *test),
            "seconds": seconds, "forward_passes": round(passes, 1), "probes": summary["probes"],
            "max_nsr_final": max(measured, default=0.0),
            "verified": all(v <= threshold for v in measured), "layers": layers}


def model_rows(name: str) -> list[dict[str, Any]]:
    """Baseline, then for each threshold: ptdeco, fxdeco budget, fxdeco budget on ptdeco's layers."""
    model = fm.train(name)
    test = fm.load("test")
    train_x, _ = fm.load("train")
    calib = [train_x[i:i + 128] for i in range(DATA_SPEC["start"], DATA_SPEC["stop"], DATA_SPEC["batch_size"])]
    base_macs = macs_per_image(model, calib[0])
    rows = [{"model": name, "threshold": None, "tool": "original", "mode": "-", "params": n_params(model),
             "params_kept": 1.0, "macs": base_macs, "accuracy": fm.accuracy(model, *test), "seconds": None,
             "forward_passes": None}]
    skip = kxk_conv_names(model)
    fxdeco.transform(model, calib[:1], nsr_threshold=0.02, show_progress=False)  # warm-up, not timed
    for threshold in THRESHOLDS:
        pt = run_ptdeco(name, model, calib, test, threshold)
        rows.append(pt)
        rows.append(run_fxdeco(name, model, calib, test, threshold, pt["params_kept"], [], "budget"))
        rows.append(run_fxdeco(name, model, calib, test, threshold, pt["params_kept"], [],
                               "budget, predicted only", rounds=0))
        rows.append(run_fxdeco(name, model, calib, test, threshold, pt["params_kept"], [],
                               "budget, summed layer NSR", criterion="nsr"))
        if skip:
            rows.append(run_fxdeco(name, model, calib, test, threshold, pt["params_kept"], skip,
                                   "budget, ptdeco's layers only"))
        rows.append(run_fxdeco_final(name, model, calib, test, threshold, [], "final-output"))
        if skip:
            rows.append(run_fxdeco_final(name, model, calib, test, threshold, skip, "final-output, ptdeco's layers only"))
    for r in rows:
        r["macs_kept"] = r["macs"] / base_macs
    return rows


def run() -> list[dict[str, Any]]:
    """Every row of this benchmark (cached ptdeco runs are read, not re-run)."""
    torch.manual_seed(0)
    logging.getLogger("ptdeco").setLevel(logging.WARNING)  # it logs every binary-search probe at INFO
    return [r for name in MODELS for r in model_rows(name)]


def plot(rows: list[dict[str, Any]], path: Path = PLOT) -> Path:
    """Accuracy vs params kept, one panel per model: ptdeco vs fxdeco budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    series = [("ptdeco", "falor nsr_final_threshold", "ptdeco falor", "o-"),
              ("fxdeco", "budget", "fxdeco budget (all layers)", "s-"),
              ("fxdeco", "budget, predicted only", "fxdeco budget, predicted only", "+:"),
              ("fxdeco", "budget, summed layer NSR", "fxdeco budget, summed layer NSR", "x:"),
              ("fxdeco", "budget, ptdeco's layers only", "fxdeco budget (ptdeco's layers)", "^--"),
              ("fxdeco", "final-output", "fxdeco final-output mode", "d-"),
              ("fxdeco", "final-output, ptdeco's layers only", "fxdeco final-output (ptdeco's layers)", "v--")]
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r["model"] == name]
        base = next(r for r in mine if r["tool"] == "original")
        ax.axhline(base["accuracy"], color="grey", lw=0.8, ls=":", label="original")
        for tool, mode, label, style in series:
            pts = sorted((r["params_kept"], r["accuracy"]) for r in mine if r["tool"] == tool and r["mode"] == mode)
            if pts:
                ax.plot([100 * p for p, _ in pts], [a for _, a in pts], style, label=label)
        ax.set_title(f"Fashion-MNIST {name}")
        ax.set_xlabel("params kept %")
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _main() -> None:  # python -m benchmarks.ptdeco_falor: print the rows without touching RESULTS.md
    logging.basicConfig(level=logging.WARNING)
    for r in run():
        print({k: v for k, v in r.items() if k not in ("layers", "spec")})


if __name__ == "__main__":
    _main()
