"""ptdeco's falor against fxdeco on all-MiniLM-L6-v2 (real pretrained weights, real English text).

Both tools see the same model: the sentence encoder of ``fxdeco.cli.minilm`` (mean
pooling over the attention mask, L2 normalisation) with BERT's pooler removed
(it does not feed the sentence embedding; ptdeco would otherwise decompose
that dead layer at rank 1 and count the saving). ptdeco's ``data_iterator``
yields one tensor per batch, so each tokenized batch is packed as
``stack([input_ids, attention_mask])`` and :class:`Packed` unpacks it. The
calibration batches are the same 16 batches of 32 stdlib docstring sentences
(at most 64 tokens) as the local-mode benchmark; ptdeco cycles over them,
fxdeco calibrates on all of them once (with padding masked out of the
statistics) and takes its metric batches from the first two. Fidelity is
measured on 512 other sentences. ptdeco results are cached in
``benchmarks/cache/`` (a run takes minutes).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fxdeco
from benchmarks import fashion_mnist as fm
from benchmarks.ptdeco_falor import PTDECO_SETTINGS, n_params

THRESHOLDS = (0.001, 0.005)
DATA_SPEC = {"dataset": "stdlib docstrings", "calibration": 512, "evaluation": 512, "batch_size": 32,
             "max_length": 64, "iterator": "itertools.cycle"}


class Packed(nn.Module):
    """Call a two-input sentence encoder with one packed ``(2, batch, tokens)`` tensor."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.inner = encoder

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=packed[0], attention_mask=packed[1])


def _data() -> tuple[nn.Module, list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    from fxdeco.cli.minilm import load_minilm, tokenized_batches
    from fxdeco.cli.text_corpus import calibration_and_evaluation

    model, tokenizer = load_minilm()
    model.encoder.pooler = None  # dead for sentence embeddings: see the module docstring
    calib_texts, eval_texts = calibration_and_evaluation(DATA_SPEC["calibration"], DATA_SPEC["evaluation"])
    calib = list(tokenized_batches(tokenizer, calib_texts, DATA_SPEC["batch_size"], DATA_SPEC["max_length"]))
    evaluation = list(tokenized_batches(tokenizer, eval_texts, DATA_SPEC["batch_size"], DATA_SPEC["max_length"]))
    return model, calib, evaluation


def _quality(model: nn.Module, evaluation: list[dict[str, torch.Tensor]], reference: torch.Tensor) -> dict[str, float]:
    from fxdeco.cli.minilm import embed, fidelity

    return fidelity(reference, embed(model, evaluation))


def run_ptdeco(model: nn.Module, calib: list[dict[str, torch.Tensor]], evaluation: list[dict[str, torch.Tensor]],
               reference: torch.Tensor, threshold: float) -> dict[str, Any]:
    """One cached ptdeco falor run on a copy of the encoder."""
    import ptdeco
    import ptdeco.falor

    spec = {"model": "minilm-no-pooler", "data": DATA_SPEC, "settings": PTDECO_SETTINGS,
            "nsr_final_threshold": threshold, "ptdeco": ptdeco.__version__, "v": 1}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    path = fm.CACHE / f"ptdeco-falor-minilm-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    packed = Packed(copy.deepcopy(model)).eval()
    passes = [0]
    hook = packed.register_forward_pre_hook(lambda _m, _a: passes.__setitem__(0, passes[0] + 1))
    data = [torch.stack([b["input_ids"], b["attention_mask"]]) for b in calib]
    start = time.perf_counter()
    ptdeco.falor.decompose_in_place(module=packed, device=torch.device("cpu"), data_iterator=itertools.cycle(data),
                                    nsr_final_threshold=threshold, **PTDECO_SETTINGS)
    seconds = time.perf_counter() - start
    hook.remove()
    row = {"model": "minilm", "threshold": threshold, "tool": "ptdeco", "mode": "falor nsr_final_threshold",
           "params": n_params(packed), "params_kept": n_params(packed) / n_params(model),
           **_quality(packed.inner, evaluation, reference), "seconds": seconds, "forward_passes": passes[0],
           "spec": spec}
    fm.CACHE.mkdir(exist_ok=True)
    path.write_text(json.dumps(row, indent=1, sort_keys=True))
    return row


def run_fxdeco(model: nn.Module, calib: list[dict[str, torch.Tensor]], evaluation: list[dict[str, torch.Tensor]],
               reference: torch.Tensor, threshold: float | None, keep: float | None, mode: str,
               rounds: int = 1) -> dict[str, Any]:
    """fxdeco in final-output mode (``threshold``) or budget mode (``keep``), padding masked out."""
    from fxdeco.cli.minilm import padding_mask

    budget = {"keep_params": keep, "rank_multiple": 1, "budget_rounds": rounds}
    options: dict[str, Any] = budget if keep is not None else {
        "nsr_final_threshold": threshold, "kl_final_threshold": PTDECO_SETTINGS["kl_final_threshold"],
        "num_metric_batches": PTDECO_SETTINGS["num_metric_steps"], "rank_multiple": 1}
    start = time.perf_counter()
    small = fxdeco.transform(model, calib, stat_mask_fn=padding_mask, show_progress=False, **options)
    seconds = time.perf_counter() - start
    meta = small.meta["fxdeco"]
    measured = [d.nsr_final for d in meta.decisions if d.nsr_final is not None]
    return {"model": "minilm", "threshold": threshold, "tool": "fxdeco", "mode": mode,
            "params": n_params(small), "params_kept": n_params(small) / n_params(model),
            **_quality(small, evaluation, reference), "seconds": seconds, "probes": meta.get("probes"),
            "max_nsr_final": max(measured, default=None),
            "verified": all(v <= threshold for v in measured) if threshold is not None and keep is None else None}


def run() -> list[dict[str, Any]]:
    """Original, then per threshold: ptdeco, fxdeco final-output mode, fxdeco budget at ptdeco's size."""
    from fxdeco.cli.minilm import embed

    torch.manual_seed(0)
    model, calib, evaluation = _data()
    reference = embed(model, evaluation)
    start = time.perf_counter()
    with torch.no_grad():
        for b in calib:
            model(**b)
    floor = time.perf_counter() - start
    rows: list[dict[str, Any]] = [{"model": "minilm", "threshold": None, "tool": "original", "mode": "-",
                                   "params": n_params(model), "params_kept": 1.0, "cosine": 1.0,
                                   "nn_agreement": 1.0, "seconds": None, "calib_forward_s": floor}]
    for threshold in THRESHOLDS:
        pt = run_ptdeco(model, calib, evaluation, reference, threshold)
        rows.append(pt)
        rows.append(run_fxdeco(model, calib, evaluation, reference, threshold, None, "final-output"))
        rows.append(run_fxdeco(model, calib, evaluation, reference, threshold, pt["params_kept"], "budget"))
        rows.append(run_fxdeco(model, calib, evaluation, reference, threshold, pt["params_kept"],
                               "budget, predicted only", rounds=0))
    return rows


PLOT = fm.CACHE.parent / "minilm_vs_ptdeco.png"


def plot(rows: list[dict[str, Any]], path: Path = PLOT) -> Path:
    """Mean cosine similarity to the original embeddings vs params kept, one series per tool / mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.axhline(1.0, color="grey", lw=0.8, ls=":", label="original")
    for tool, mode, label, style in (("ptdeco", "falor nsr_final_threshold", "ptdeco falor", "o-"),
                                     ("fxdeco", "final-output", "fxdeco final-output mode", "d-"),
                                     ("fxdeco", "budget", "fxdeco budget (at ptdeco's size)", "s--"),
                                     ("fxdeco", "budget, predicted only", "fxdeco budget, predicted only", "+:")):
        pts = sorted((r["params_kept"], r["cosine"]) for r in rows if r["tool"] == tool and r["mode"] == mode)
        if pts:
            ax.plot([100 * p for p, _ in pts], [c for _, c in pts], style, label=label)
    ax.set_title("all-MiniLM-L6-v2, held-out sentences")
    ax.set_xlabel("params kept %")
    ax.set_ylabel("mean cosine to original embedding")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    for r in run():
        print({k: v for k, v in r.items() if k != "spec"})
