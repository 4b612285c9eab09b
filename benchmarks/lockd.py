"""lockd on the Fashion-MNIST CNN and all-MiniLM-L6-v2: fxdeco vs ptdeco 0.5.0's lockd vs fxdeco falor.

``python -m benchmarks.lockd`` writes ``benchmarks/LOCKD.md``: the CNN part (this
module) and the MiniLM part (``benchmarks/lockd_minilm.py``).
``--only cnn`` / ``--only minilm`` runs one part and replaces only its section
of an existing LOCKD.md (for development; the plain command regenerates it all).

In the CNN part every run uses the
same data: ``STEPS`` batches of ``BATCH`` training images (a fixed permutation,
seed 0) for lockd training, then ``KD_STEPS`` further batches for a knowledge-
distillation fine-tune (``fxdeco.train.finetune.finetune``: KL on logits from the
original model, Adam ``KD_LR``, student in training mode). Accuracy is on the
10k test images.

* fxdeco lockd at each ``(tau, lambda)`` of ``SETTINGS``: ``lockd.prepare``
  (SVD init, 1x1-first convs, logits start at 3), ``lockd.train`` (Adam: weights
  1e-3, logits 2e-2), ``lockd.finalize`` (a layer is replaced wherever its pruned
  branch has fewer params), KD fine-tune.
* ptdeco lockd with its own settings (tau 0.05, lambda 1, Adam 1e-3 on weights and
  logits, random init, logits at 3): ``wrap_in_place``, ``get_nsr_loss`` +
  ``get_proportion_loss``, ``decompose_in_place(proportion_threshold=0.5)``,
  then the same KD fine-tune. Cached as JSON in ``benchmarks/cache/`` (keyed by
  settings), so re-runs skip it.
* convergence: fxdeco with ptdeco's learning rates and logit start but SVD
  init, stopped at the first step whose loss is at or below ptdeco's final
  loss (same loss: tau 0.05, lambda 1).
* fxdeco falor budget mode (``fxdeco.transform(keep_params=...)``, 8 calibration
  batches of 128) at each lockd run's parameter count, with and without the
  same KD fine-tune.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

import fxdeco
from benchmarks import fashion_mnist as fm
from benchmarks.ptdeco_falor import macs_per_image, n_params, weights_file
from benchmarks.ptdeco_lockd import train_ptdeco_lockd
from fxdeco import lockd
from fxdeco.train.finetune import finetune
from fxdeco.io.report import human

STEPS, BATCH = 1000, 64
KD_STEPS, KD_LR = 300, 1e-4  # at 3e-4 the fine-tune alone cost an exact copy 0.25 pt
SETTINGS = ((0.01, 1.0), (0.05, 1.0), (0.05, 0.3))  # (tau, lambda) for fxdeco; 0.05, 1 are ptdeco's
PTDECO = {"nsr_threshold": 0.05, "lmbda": 1.0, "lr": 1e-3, "proportion_threshold": 0.5}
RESULTS = Path(__file__).resolve().parent / "LOCKD.md"
log = logging.getLogger(__name__)


def batches(n: int, offset: int, images: torch.Tensor) -> list[torch.Tensor]:
    """``n`` batches of ``BATCH`` images from a fixed permutation of the training set, from batch ``offset``."""
    g = torch.Generator().manual_seed(0)
    need = (offset + n) * BATCH
    order = torch.cat([torch.randperm(len(images), generator=g) for _ in range(need // len(images) + 1)])
    return [images[order[(offset + i) * BATCH:(offset + i + 1) * BATCH]] for i in range(n)]


def kd(student: nn.Module, teacher: nn.Module, data: list[torch.Tensor]) -> float:
    torch.manual_seed(0)
    return finetune(student, teacher, data, steps=KD_STEPS, lr=KD_LR, show_progress=False, log_every=0).seconds


def row(tool: str, settings: str, model: nn.Module, original: nn.Module, test: tuple, example: torch.Tensor,
        seconds: float, **extra: Any) -> dict[str, Any]:
    return {"tool": tool, "settings": settings, "params": n_params(model),
            "params_kept": n_params(model) / n_params(original), "macs": macs_per_image(model, example),
            "accuracy": fm.accuracy(model, *test), "seconds": seconds, **extra}


def run_fxdeco(model: nn.Module, tau: float, lmbda: float, train: list, tune: list, test: tuple) -> list[dict]:
    torch.manual_seed(0)
    start = time.perf_counter()
    gm = lockd.prepare(model, nsr_threshold=tau)
    history = lockd.train(gm, train, steps=STEPS, lmbda=lmbda, show_progress=False)
    small = lockd.finalize(gm)
    seconds = time.perf_counter() - start
    settings = f"tau={tau:g}, lambda={lmbda:g}"
    first = row("fxdeco lockd", settings, small, model, test, train[0], seconds, stage="after finalize",
                final_loss=history.loss[-1], history=history.loss)
    kd_seconds = kd(small, model, tune)
    small.eval()
    second = row("fxdeco lockd", settings, small, model, test, train[0], kd_seconds, stage=f"+ KD {KD_STEPS} steps")
    return [first, second]


def run_ptdeco(model: nn.Module, train: list, tune: list, test: tuple) -> list[dict]:
    """ptdeco's lockd with its own settings, same data and fine-tune; cached JSON."""
    import ptdeco

    spec = {"weights": weights_file("cnn"), "steps": STEPS, "batch": BATCH, "kd_steps": KD_STEPS, "kd_lr": KD_LR,
            "settings": PTDECO, "ptdeco": ptdeco.__version__, "v": 2}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    path = fm.CACHE / f"ptdeco-lockd-cnn-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    # BatchNorm keeps its statistics (eval mode), as in fxdeco
    wrapped, losses, proportion, seconds = train_ptdeco_lockd(model, train, lambda m, x: m(x), PTDECO)
    settings = f"tau={PTDECO['nsr_threshold']:g}, lambda={PTDECO['lmbda']:g}"
    first = row("ptdeco lockd", settings, wrapped, model, test, train[0], seconds, stage="after decompose",
                final_loss=losses[-1], final_proportion=proportion, history=losses)
    kd_seconds = kd(wrapped, model, tune)
    wrapped.eval()
    second = row("ptdeco lockd", settings, wrapped, model, test, train[0], kd_seconds, stage=f"+ KD {KD_STEPS} steps")
    rows = [first, second]
    fm.CACHE.mkdir(exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    return rows


def steps_to_reach(model: nn.Module, target: float, train: list) -> tuple[int | None, float]:
    """Steps fxdeco (SVD init, ptdeco's learning rates and logit start) needs to reach loss <= ``target``."""
    torch.manual_seed(0)
    gm = lockd.prepare(model, nsr_threshold=PTDECO["nsr_threshold"])
    start = time.perf_counter()
    history = lockd.train(gm, train, steps=STEPS, lr=PTDECO["lr"], logit_lr=PTDECO["lr"], lmbda=PTDECO["lmbda"],
                          show_progress=False, eval_batches=0, callback=lambda step, h: h.loss[-1] <= target)
    reached = len(history.loss) if history.loss[-1] <= target else None
    return reached, time.perf_counter() - start


def first_step_at_or_below(history: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(history) if v <= target), None)


def run_falor(model: nn.Module, keep: float, calib: list, tune: list, test: tuple, label: str) -> list[dict]:
    start = time.perf_counter()
    small = fxdeco.transform(model, calib, keep_params=keep)
    seconds = time.perf_counter() - start
    first = row("fxdeco falor budget", f"keep_params={keep:.3f} ({label})", small, model, test, calib[0], seconds,
                stage="after transform")
    kd_seconds = kd(small, model, tune)
    small.eval()
    second = row("fxdeco falor budget", f"keep_params={keep:.3f} ({label})", small, model, test, calib[0],
                 kd_seconds, stage=f"+ KD {KD_STEPS} steps")
    return [first, second]


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    headers = ["tool", "settings", "stage", "params", "params kept", "MACs/image", "accuracy %", "wall s"]
    body = [[r["tool"], r["settings"], r["stage"], human(r["params"]), f"{r['params_kept']:.1%}",
             human(int(r["macs"])), f"{r['accuracy']:.2f}", f"{r['seconds']:.0f}"] for r in rows]
    return tabulate([[_fmt(v) for v in b] for b in body], headers=headers, tablefmt="github")


def cnn_section() -> str:
    """Run the CNN part; return its section of LOCKD.md."""
    start = time.perf_counter()
    model = fm.train("cnn")
    images, _ = fm.load("train")
    test = fm.load("test")
    train, tune = batches(STEPS, 0, images), batches(KD_STEPS, STEPS, images)
    calib = [images[i:i + 128] for i in range(0, 1024, 128)]
    base = row("original", "-", model, model, test, train[0], 0.0, stage="-")
    rows = [base]
    pt = run_ptdeco(model, train, tune, test)
    for tau, lmbda in SETTINGS:
        rows += run_fxdeco(model, tau, lmbda, train, tune, test)
    rows += pt
    for r in [r for r in rows if r["tool"] == "fxdeco lockd" and r["stage"] == "after finalize"]:
        rows += run_falor(model, r["params_kept"], calib, tune, test, f"lockd {r['settings']}")
    target = pt[0]["final_loss"]
    reached, reach_s = steps_to_reach(model, target, train)
    same_loss = [r for r in rows if r["tool"] == "fxdeco lockd" and r["settings"] == "tau=0.05, lambda=1"
                 and "history" in r]
    ours_default = first_step_at_or_below(same_loss[0]["history"], target) if same_loss else None
    total = time.perf_counter() - start
    return (
        "# lockd on the Fashion-MNIST CNN\n\n"
        "Generated by `python -m benchmarks.lockd` — do not edit by hand.\n\n"
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"shared CPU (other jobs running; wall times are as measured under that load). "
        f"CNN part: {total:.0f} s (ptdeco rows from the cache when present: their wall time is from "
        "the run that filled it).\n\n"
        f"Training budget for both lockd implementations: {STEPS} steps of {BATCH} training images (one fixed "
        f"permutation, seed 0). Then a KD fine-tune of every decomposed model: {KD_STEPS} further batches of "
        f"{BATCH}, KL on logits from the original, Adam lr {KD_LR:g}, BatchNorm statistics frozen. Accuracy on "
        "the 10k test images; MACs per image from `passes.CostProp`. `wall s`: lockd prepare+train+finalize "
        "(or falor transform), and the fine-tune on its own row.\n\n"
        "fxdeco lockd: SVD init, 1x1-first convs, gate logits start at 3, Adam lr 1e-3 (weights) and 2e-2 "
        "(logits), `finalize()` replaces a layer wherever its pruned branch has fewer params. ptdeco lockd "
        f"0.5.0: its own settings (random init, logits at 3, Adam lr {PTDECO['lr']:g} on everything, "
        f"tau {PTDECO['nsr_threshold']:g}, lambda {PTDECO['lmbda']:g}), `decompose_in_place("
        f"proportion_threshold={PTDECO['proportion_threshold']})`. Both keep the original layers in eval mode "
        "(frozen BatchNorm statistics) while training. fxdeco falor budget: `transform(keep_params=...)` at the "
        "parameter fraction each lockd run reached, 8 calibration batches of 128.\n\n"
        f"{table(rows)}\n\n"
        "## Convergence (same loss: tau 0.05, lambda 1)\n\n"
        f"ptdeco's loss after {STEPS} steps: {target:.4f} (of which proportion term {pt[0]['final_proportion']:.3f}, "
        f"i.e. mean sigmoid of the logits; it kept {pt[0]['params_kept']:.1%} of the params). fxdeco with "
        "ptdeco's learning rates and logit start but SVD init reaches that loss after "
        f"{reached if reached is not None else f'more than {STEPS}'} steps ({reach_s:.0f} s); fxdeco with its "
        f"default logit learning rate after {ours_default if ours_default is not None else f'more than {STEPS}'} "
        "steps.\n"
    )


MINILM_HEADING = "# lockd on all-MiniLM-L6-v2"


def merge(cnn: str | None, minilm: str | None, old: str = "") -> str:
    r"""LOCKD.md from the new sections, keeping a section of ``old`` where no new one is given.

    Example:
        >>> merge("# cnn\n", None, "# cnn old\n\n# lockd on all-MiniLM-L6-v2\nkept\n")
        '# cnn\n\n# lockd on all-MiniLM-L6-v2\nkept\n'
    """
    old_cnn, found, old_minilm = old.partition(MINILM_HEADING)
    parts = [cnn if cnn is not None else old_cnn.rstrip("\n") + "\n",
             minilm if minilm is not None else (found + old_minilm if found else "")]
    return "\n".join(p for p in parts if p.strip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="lockd benchmark: writes benchmarks/LOCKD.md")
    parser.add_argument("--only", choices=("cnn", "minilm"),
                        help="run one part and replace only its section of LOCKD.md (development)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cnn = cnn_section() if args.only in (None, "cnn") else None
    minilm = None
    if args.only in (None, "minilm"):
        from benchmarks import lockd_minilm

        minilm = lockd_minilm.section(*lockd_minilm.run())
    text = merge(cnn, minilm, RESULTS.read_text() if RESULTS.exists() and args.only else "")
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
