"""lockd on all-MiniLM-L6-v2: fxdeco vs ptdeco 0.5.0's lockd vs fxdeco falor at the same size.

The MiniLM part of ``python -m benchmarks.lockd`` (which writes
``benchmarks/LOCKD.md``). The model and text are those of
``benchmarks/ptdeco_minilm.py`` (its ``_data``): the sentence encoder of
``fxdeco.cli.minilm`` (real pretrained weights, offline, BERT's dead pooler removed),
512 stdlib docstring sentences for training (tokenized in batches of 32, at most
64 tokens, each split here into two batches of ``BATCH`` = 16 with their common
padding trimmed, cycled) and 512 other sentences for evaluation only.

* fxdeco lockd at each setting of ``SETTINGS``: ``lockd.prepare`` (SVD init,
  logits start at 3), ``lockd.train`` for ``STEPS`` steps (Adam: weights 1e-3,
  logits ``logit_lr``), ``lockd.finalize`` (a layer is replaced wherever its
  pruned branch has fewer params), then a KD fine-tune of ``KD_STEPS`` steps
  (``fxdeco.train.finetune.finetune(distill_loss="cosine")``: 1 - cosine between the
  student's and the original's embeddings, Adam ``KD_LR``, student in eval mode).
* ptdeco lockd with its own settings (those of the CNN part: tau 0.05, lambda 1,
  Adam 1e-3 on weights and logits, random init, logits at 3), the same steps and
  batches, ``decompose_in_place(proportion_threshold=0.5)``, the same KD
  fine-tune. Cached as JSON in ``benchmarks/cache/`` (keyed by settings).
* fxdeco falor budget mode (``fxdeco.transform(keep_params=...)``, padding masked
  out of the statistics, the 16 calibration batches of 32) at the parameter
  fraction each lockd run reached, with and without the same KD fine-tune.

Fidelity (``fxdeco.cli.minilm.fidelity``): mean cosine between the compressed and the
original embeddings of the evaluation sentences, and top-1 nearest-neighbour
agreement among them. MACs per sentence from ``passes.CostProp`` on the first
evaluation batch (32 sentences padded to the longest).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

import fxdeco
from benchmarks import fashion_mnist as fm
from benchmarks.ptdeco_falor import n_params
from benchmarks.ptdeco_lockd import train_ptdeco_lockd
from benchmarks.ptdeco_minilm import DATA_SPEC, _data
from fxdeco import lockd
from fxdeco.capture import trace
from fxdeco.train.finetune import finetune
from fxdeco.cli.minilm import embed, fidelity, padding_mask
from fxdeco.io.report import human
from passes import CostProp, graph_macs

Batch = dict[str, torch.Tensor]

STEPS, BATCH = 200, 16
# Adam moves every weight by about lr per step even where the loss is ~0, so the fine-tune alone moves an exact
# copy's embeddings: at 5e-5 (the usual BERT fine-tuning rate) two steps cost it 0.006 of cosine; hence 1e-5.
KD_STEPS, KD_LR = 50, 1e-5
# (tau, lambda, logit_lr) for fxdeco: the defaults (ptdeco's tau), then a looser tau with faster logits. In 200 steps
# tau 0.05 with logit lr 0.1 decomposed nothing either (every layer kept more than its break-even share of gates).
SETTINGS = ((0.05, 1.0, 2e-2), (0.2, 1.0, 0.1))
PTDECO = {"nsr_threshold": 0.05, "lmbda": 1.0, "lr": 1e-3, "proportion_threshold": 0.5}
log = logging.getLogger(__name__)


def split_batches(batches: list[Batch], size: int = BATCH) -> list[Batch]:
    """Each tokenized batch cut into batches of ``size`` sentences, padding columns none of them uses dropped."""
    out = []
    for b in batches:
        for start in range(0, len(b["input_ids"]), size):
            rows = slice(start, start + size)
            length = int(b["attention_mask"][rows].sum(1).max())
            out.append({k: v[rows, :length].clone() for k, v in b.items()})  # not views: see export guards
    return out


def cycled(batches: list[Batch], n: int) -> list[Batch]:
    """The first ``n`` batches of ``batches`` repeated (the training budget, as a list)."""
    return [batches[i % len(batches)] for i in range(n)]


@torch.no_grad()
def macs_per_sentence(model: nn.Module, batch: Batch) -> float:
    """MACs per sentence from the cost pass on ``batch`` (graph inputs fed in placeholder order)."""
    gm = trace(model, batch, capture="export") if not isinstance(model, torch.fx.GraphModule) else model
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    CostProp(gm).run(*[batch[name] for name in names])
    return graph_macs(gm) / batch["input_ids"].shape[0]


def kd(student: nn.Module, teacher: nn.Module, data: list[Batch]) -> tuple[float, list[float]]:
    torch.manual_seed(0)
    history = finetune(student, teacher, data, steps=KD_STEPS, lr=KD_LR, distill_loss="cosine",
                       show_progress=False, log_every=0)
    return history.seconds, history.loss


def row(tool: str, settings: str, stage: str, model: nn.Module, original: nn.Module, evaluation: list[Batch],
        reference: torch.Tensor, seconds: float, **extra: Any) -> dict[str, Any]:
    model.eval()
    return {"tool": tool, "settings": settings, "stage": stage, "params": n_params(model),
            "params_kept": n_params(model) / n_params(original), "macs": macs_per_sentence(model, evaluation[0]),
            **fidelity(reference, embed(model, evaluation)), "seconds": seconds, **extra}


def _after_kd(first: dict[str, Any], model: nn.Module, original: nn.Module, tune: list[Batch],
              evaluation: list[Batch], reference: torch.Tensor) -> dict[str, Any]:
    seconds, losses = kd(model, original, tune)
    return row(first["tool"], first["settings"], f"+ KD {KD_STEPS} steps", model, original, evaluation, reference,
               seconds, kd_loss_first=losses[0], kd_loss_last=losses[-1])


def run_fxdeco(model: nn.Module, tau: float, lmbda: float, logit_lr: float, train: list[Batch],
               evaluation: list[Batch], reference: torch.Tensor) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    start = time.perf_counter()
    gm = lockd.prepare(model, train[0], nsr_threshold=tau)
    history = lockd.train(gm, train, steps=STEPS, lmbda=lmbda, logit_lr=logit_lr, show_progress=False, log_every=50)
    small = lockd.finalize(gm)
    seconds = time.perf_counter() - start
    decided = small.meta["fxdeco"].decisions
    settings = f"tau={tau:g}, lambda={lmbda:g}, logit lr={logit_lr:g}"
    first = row("fxdeco lockd", settings, "after finalize", small, model, evaluation, reference, seconds,
                final_loss=history.loss[-1], gates_open=history.kept[-1],
                layers_decomposed=sum(d.decomposed for d in decided), layers=len(decided))
    return [first, _after_kd(first, small, model, train, evaluation, reference)]


def run_ptdeco(model: nn.Module, train: list[Batch], evaluation: list[Batch],
               reference: torch.Tensor) -> list[dict[str, Any]]:
    """ptdeco's lockd with its own settings, same batches and fine-tune; cached JSON."""
    import ptdeco

    spec = {"model": "minilm-no-pooler", "data": DATA_SPEC, "batch": BATCH, "steps": STEPS, "kd_steps": KD_STEPS,
            "kd_lr": KD_LR, "kd_loss": "cosine", "settings": PTDECO, "ptdeco": ptdeco.__version__, "v": 1}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    path = fm.CACHE / f"ptdeco-lockd-minilm-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    # dropout off (eval mode), as in fxdeco
    wrapped, losses, proportion, seconds = train_ptdeco_lockd(model, train, lambda m, batch: m(**batch), PTDECO)
    settings = f"tau={PTDECO['nsr_threshold']:g}, lambda={PTDECO['lmbda']:g}"
    first = row("ptdeco lockd", settings, "after decompose", wrapped, model, evaluation, reference, seconds,
                final_loss=losses[-1], final_proportion=proportion)
    rows = [first, _after_kd(first, wrapped, model, train, evaluation, reference)]
    fm.CACHE.mkdir(exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    return rows


def run_falor(model: nn.Module, keep: float, label: str, calib: list[Batch], train: list[Batch],
              evaluation: list[Batch], reference: torch.Tensor) -> list[dict[str, Any]]:
    start = time.perf_counter()
    small = fxdeco.transform(model, calib, keep_params=keep, rank_multiple=1, stat_mask_fn=padding_mask,
                             show_progress=False)
    seconds = time.perf_counter() - start
    first = row("fxdeco falor budget", f"keep_params={keep:.3f} ({label})", "after transform", small, model,
                evaluation, reference, seconds)
    return [first, _after_kd(first, small, model, train, evaluation, reference)]


def run() -> tuple[list[dict[str, Any]], float]:
    """All MiniLM rows (original first) and the total wall time."""
    start = time.perf_counter()
    torch.manual_seed(0)
    model, calib, evaluation = _data()
    reference = embed(model, evaluation)
    train = cycled(split_batches(calib), STEPS)
    rows = [row("original", "-", "-", model, model, evaluation, reference, 0.0)]
    pt = run_ptdeco(model, train, evaluation, reference)
    for tau, lmbda, logit_lr in SETTINGS:
        rows += run_fxdeco(model, tau, lmbda, logit_lr, train, evaluation, reference)
    rows += pt
    for r in [r for r in rows if r["tool"] == "fxdeco lockd" and r["stage"] == "after finalize"]:
        if r["params_kept"] < 0.999:
            rows += run_falor(model, r["params_kept"], f"lockd {r['settings']}", calib, train, evaluation, reference)
    return rows, time.perf_counter() - start


def table(rows: list[dict[str, Any]]) -> str:
    headers = ["tool", "settings", "stage", "params", "params kept", "MACs/sentence", "mean cosine",
               "NN agreement", "wall s"]
    body = [[r["tool"], r["settings"], r["stage"], human(r["params"]), f"{r['params_kept']:.1%}",
             human(int(r["macs"])), f"{r['cosine']:.4f}", f"{r['nn_agreement']:.3f}", f"{r['seconds']:.0f}"]
            for r in rows]
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def section(rows: list[dict[str, Any]], seconds: float) -> str:
    """The MiniLM part of LOCKD.md."""
    ours = [r for r in rows if r["tool"] == "fxdeco lockd" and r["stage"] == "after finalize"]
    pt = next(r for r in rows if r["tool"] == "ptdeco lockd" and r["stage"] == "after decompose")
    layers = "; ".join(f"{r['settings']}: {r['layers_decomposed']} of {r['layers']} Linear layers decomposed, "
                       f"{r['gates_open']:.1%} of gates open at the end" for r in ours)
    return (
        "# lockd on all-MiniLM-L6-v2\n\n"
        f"MiniLM part: {seconds:.0f} s (ptdeco rows from the cache when present: their wall time is from the run "
        "that filled it). Same shared CPU, one thread, wall times as measured under that load.\n\n"
        "Model and text as in the falor MiniLM benchmark (`benchmarks/ptdeco_minilm.py`): the real pretrained "
        "sentence encoder (mean pooling, L2 normalisation, BERT's dead pooler removed), "
        f"{DATA_SPEC['calibration']} stdlib docstring sentences (at most {DATA_SPEC['max_length']} tokens) for "
        f"training, {DATA_SPEC['evaluation']} other sentences for evaluation only. Training budget for both lockd "
        f"implementations: {STEPS} steps of {BATCH} sentences (the training sentences cycled). Then a KD fine-tune "
        f"of every compressed model: {KD_STEPS} steps of {BATCH} of the same sentences, loss 1 - cosine between "
        f"the student's and the original's embeddings (`finetune(distill_loss=\"cosine\")`), Adam lr {KD_LR:g}. "
        "Fidelity on the evaluation sentences: mean cosine to the original embeddings and top-1 nearest-neighbour "
        "agreement (`fxdeco.cli.minilm.fidelity`). MACs per sentence from `passes.CostProp` on one evaluation batch of "
        "32 sentences padded to the longest. `wall s`: lockd prepare+train+finalize (or falor transform), and the "
        "fine-tune on its own row.\n\n"
        "fxdeco lockd: SVD init, logits start at 3, Adam lr 1e-3 (weights) and the logit lr shown, `finalize()` "
        "replaces a layer wherever its pruned branch has fewer params (a 384x384 layer must close more than half "
        "of its 384 gates, a 384x1536 one more than a fifth). ptdeco lockd 0.5.0: its own settings (random init, "
        f"logits at 3, Adam lr {PTDECO['lr']:g} on everything, tau {PTDECO['nsr_threshold']:g}, lambda "
        f"{PTDECO['lmbda']:g}), `decompose_in_place(proportion_threshold={PTDECO['proportion_threshold']})`. "
        "fxdeco falor budget: `transform(keep_params=..., rank_multiple=1, stat_mask_fn=padding_mask)` on the 16 "
        "calibration batches of 32, at the parameter fraction each lockd run reached. The word embeddings "
        "(11.7M of the 22.7M params) are not decomposable by any of them.\n\n"
        f"{table(rows)}\n\n"
        f"fxdeco lockd: {layers}. ptdeco's loss after {STEPS} steps: {pt['final_loss']:.4f} (proportion term "
        f"{pt['final_proportion']:.3f}).\n"
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    found, total = run()
    print(section(found, total))
