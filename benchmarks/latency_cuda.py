"""Measured speed of decomposed models on CUDA in bfloat16: ``keep_latency`` against ``keep_macs``.
``python -m benchmarks.latency_cuda``.

Writes ``benchmarks/LATENCY_CUDA.md`` (on a CUDA device; one run of a few minutes). For each model, one
calibration (64 samples a batch, ``sensitivity=True``) is converted, for each serving batch (1 and 64), at
``keep_latency=0.6`` timed at that batch (``latency_batch``), ``keep_macs=0.5``, and
``nsr_threshold=0.05, acceptance="faster"``; every variant is then timed beside the original at that batch
(eager, CUDA-synchronised interleaved medians). Random weights throughout (timing, not quality): fidelity is
the cosine of the outputs to the original's on held-out inputs, both less the original's mean output
(``benchmarks.latency._fidelity``).

Models: a decode-shaped Linear stack (one token through 4 blocks of 4096-wide projections and a 4096 -> 11008
-> 4096 MLP, weights with a decaying spectrum, as trained LLM layers have), torchvision resnet18 and timm
deit_small at 224, and a BERT of all-MiniLM-L6-v2's shape (6 layers, width 384) at 128 tokens.

``--device cpu --quick`` runs the same code on the CPU, small and printed only, to check the script before a
GPU is lent (the issue's CUDA targets need one).
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tabulate import tabulate
from torch import nn

import fxdeco
from benchmarks import latency as bench
from fxdeco.latency.timing import device_name

HERE = Path(__file__).resolve().parent
OUT = HERE / "LATENCY_CUDA.md"
BATCHES = (1, 64)
log = logging.getLogger("benchmarks.latency_cuda")


class DecodeStack(nn.Module):
    """One token through ``depth`` blocks: four ``width``-wide projections (as attention's q, k, v, o would be
    applied to one token, without the attention itself) and a SiLU MLP, each with a residual."""

    def __init__(self, width: int = 4096, hidden: int = 11008, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict({
                "q": nn.Linear(width, width, bias=False), "k": nn.Linear(width, width, bias=False),
                "v": nn.Linear(width, width, bias=False), "o": nn.Linear(width, width, bias=False),
                "up": nn.Linear(width, hidden, bias=False), "down": nn.Linear(hidden, width, bias=False)}))
        with torch.no_grad():
            for linear in self.modules():
                if isinstance(linear, nn.Linear):
                    linear.weight.copy_(_decaying(linear.weight.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b["o"](b["v"](x) * torch.sigmoid(b["q"](x) + b["k"](x)))
            x = x + b["down"](nn.functional.silu(b["up"](x)))
        return x


def _decaying(shape: torch.Size) -> torch.Tensor:
    """A random matrix whose singular values fall as 1 / (1 + i / 32), scaled so that a layer keeps the size of
    a random input (its Frobenius norm squared is the input width)."""
    out_f, in_f = shape
    k = min(out_f, in_f)
    u = torch.linalg.qr(torch.randn(out_f, k))[0]
    v = torch.linalg.qr(torch.randn(in_f, k))[0]
    s = 1.0 / (1.0 + torch.arange(k) / 32.0)
    return (u * (s / s.norm() * in_f ** 0.5)) @ v.T


def _cases(quick: bool) -> dict[str, tuple[str, Callable[[], tuple[nn.Module, Callable[[int, int], Any]]]]]:
    """short name -> (title, builder of (model, batch(size, seed))), on the CPU in float32 (moved and cast
    later)."""
    width, hidden, depth = (256, 688, 2) if quick else (4096, 11008, 4)
    size, tokens = (64, 32) if quick else (224, 128)  # image side, sequence length

    def stack():
        return DecodeStack(width, hidden, depth).eval(), lambda n, seed: _randn(seed, n, width)

    def resnet18():
        import torchvision

        return torchvision.models.resnet18().eval(), lambda n, seed: _randn(seed, n, 3, size, size)

    def deit():
        import timm

        model = timm.create_model("deit_small_patch16_224", img_size=size).eval()
        return model, lambda n, seed: _randn(seed, n, 3, size, size)

    def minilm_shape():
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536, attn_implementation="eager")
        model = _LastHidden(BertModel(config, add_pooling_layer=False)).eval()
        return model, lambda n, seed: {"input_ids": torch.randint(0, 30522, (n, tokens),
                                                                  generator=torch.Generator().manual_seed(seed))}

    return {"stack": (f"decode-shaped Linear stack ({width} wide, {depth} blocks)", stack),
            "resnet18": (f"torchvision resnet18 {size}", resnet18), "deit": (f"timm deit_small {size}", deit),
            "bert": (f"BERT of all-MiniLM-L6-v2's shape, {tokens} tokens", minilm_shape)}


class _LastHidden(nn.Module):
    """A Hugging Face encoder returning its last hidden state as a tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _to(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(batch, dict):
        return {k: _to(v, device, dtype) for k, v in batch.items()}
    return batch.to(device, dtype) if batch.is_floating_point() else batch.to(device)


def run_model(name: str, build: Callable[[], Any], device: torch.device, dtype: torch.dtype,
              calib_batches: int) -> list[dict[str, Any]]:
    """Every variant of one model at each serving batch: measured latency, fidelity, params kept."""
    torch.manual_seed(0)
    model, make = build()
    model = model.to(device, dtype)
    calib = [_to(make(64, seed), device, dtype) for seed in range(calib_batches)]
    held_out = [_to(make(64, 100 + seed), device, dtype) for seed in range(2)]
    start = time.perf_counter()
    prepared = fxdeco.calibrate(fxdeco.prepare(model, calib[0], sensitivity=True, keep_batches=2), calib)
    log.info("%s: calibrated in %.1f s", name, time.perf_counter() - start)
    fidelity = bench._fidelity(model, held_out)
    params0 = sum(p.numel() for p in model.parameters())
    rows = []
    for batch in BATCHES:
        configs = {f"keep_latency=0.6 (timed at {batch})": dict(keep_latency=0.6, latency_batch=batch),
                   "keep_macs=0.5": dict(keep_macs=0.5),
                   f"nsr_threshold=0.05, faster (timed at {batch})": dict(nsr_threshold=0.05, acceptance="faster",
                                                                         latency_batch=batch)}
        variants: dict[str, nn.Module] = {}
        for label, options in configs.items():
            t = time.perf_counter()
            try:
                variants[label] = fxdeco.convert(prepared, fxdeco.Falor(**options, show_progress=False))
            except fxdeco.BudgetError as exc:
                rows.append({"model": name, "batch": batch, "variant": label, "note": f"refused: {exc}"[:160]})
                continue
            log.info("%s batch %d %s: converted in %.1f s", name, batch, label, time.perf_counter() - t)
        serving = _to(make(batch, 7), device, dtype)
        times = bench._time({"original": model, **variants}, serving)
        for label, small in variants.items():
            summary = small.meta["fxdeco"].summary
            rows.append({"model": name, "batch": batch, "variant": label,
                         "latency": times[label] / times["original"], "original_ms": times["original"] * 1e3,
                         "ms": times[label] * 1e3, "cosine": fidelity(small),
                         "params": sum(p.numel() for p in small.parameters()) / params0,
                         "predicted": summary["latency_predicted_s"] / summary["latency_original_s"]
                         if "latency_predicted_s" in summary else None, "note": ""})
    return rows


def write(rows: list[dict[str, Any]], device: torch.device, dtype: torch.dtype, seconds: float,
          save: bool) -> str:
    fmt = bench._fmt
    body = [[r["model"], r["batch"], r["variant"], fmt(r.get("latency"), ".3f"),
             f"{fmt(r.get('original_ms'), '.3g')} -> {fmt(r.get('ms'), '.3g')}", fmt(r.get("predicted"), ".3f"),
             fmt(r.get("cosine"), ".4f"), fmt(r.get("params"), ".1%"), r["note"]] for r in rows]
    target = [[r["model"], r["batch"], r["variant"], f"{r['latency']:.3f}",
               "yes" if r["latency"] <= bench.TARGET_MEASURED else "NO"] for r in rows
              if r["variant"].startswith("keep_latency") and "latency" in r]
    slower = [[r["model"], r["batch"], r["variant"], f"{r['latency']:.3f}",
               "yes" if r["latency"] <= 1.02 else "NO"] for r in rows if "faster" in r["variant"] and "latency" in r]
    text = "\n".join([
        "# Measured latency on CUDA: keep_latency vs keep_macs", "",
        f"Regenerated by `python -m benchmarks.latency_cuda` ({seconds / 60:.0f} minutes). Device: "
        f"{device_name(device)}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}, Python "
        f"{platform.python_version()}, eager. Times are medians of CUDA-synchronised interleaved rounds of all "
        "variants of a model at one serving batch, as ratios to the original. Random weights: `cosine` is the "
        "outputs' centred cosine to the original's on held-out inputs (timing, not quality). `keep_latency` and "
        "`acceptance=\"faster\"` time the layers at the serving batch (`latency_batch`); `keep_macs` is one plan "
        "for both batches.", "",
        tabulate(body, headers=["model", "batch", "variant", "latency", "ms", "predicted", "cosine", "params kept",
                                "note"], tablefmt="github"), "",
        "## Targets", "", "`keep_latency=0.6` measures at most 0.66 of the original:", "",
        tabulate(target, headers=["model", "batch", "variant", "measured", "<= 0.66"], tablefmt="github"), "",
        "With `acceptance=\"faster\"` no decomposed model is slower than the original (2% allowed for noise):", "",
        tabulate(slower, headers=["model", "batch", "variant", "measured", "not slower"], tablefmt="github"), ""])
    if save:
        OUT.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: a check of the script)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="small models, printed only")
    parser.add_argument("--calib-batches", type=int, default=4, help="calibration batches of 64 (default 4)")
    parser.add_argument("--only", default="stack,resnet18,deit,bert", help="comma-separated models (a subset is "
                        "printed only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.latency_cuda needs a CUDA device (--device cpu --quick checks the script)")
    start = time.perf_counter()
    cases = _cases(args.quick)
    names = [n.strip() for n in args.only.split(",")]
    unknown = sorted(set(names) - set(cases))
    if unknown:
        raise SystemExit(f"--only: unknown model(s) {unknown}; choose from {sorted(cases)}")
    rows = [row for name in names for row in run_model(*cases[name], device, dtype, args.calib_batches)]
    whole = set(names) == set(cases)
    print(write(rows, device, dtype, time.perf_counter() - start, save=device.type == "cuda" and not args.quick
                and whole))


if __name__ == "__main__":
    main()
