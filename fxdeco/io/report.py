"""``fxdeco.report``: what a decomposition did, per layer and for the whole model."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.fx
from tabulate import tabulate

from fxdeco.metadata import model_record
from fxdeco.plan import LayerDecision


def human(n: float | None) -> str:
    """``1234567 -> '1.23M'``: compact counts for tables."""
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


@dataclasses.dataclass
class Report:
    """Per-layer rows and model totals of a decomposed GraphModule.

    ``str(report)`` is a table; ``report.rows`` / ``report.totals`` are plain data.
    MACs are per sample (per image, or per sequence at the calibration length).
    """

    rows: list[dict[str, Any]]
    totals: dict[str, Any]

    def table(self, fmt: str = "simple") -> str:
        timed = any(r.get("ms_dense") is not None for r in self.rows)  # falor measured latency: show it
        lossy = any(r.get("ppl_diff") is not None for r in self.rows)  # dwain measured the loss: show it
        kl = any(r.get("kl_final") is not None for r in self.rows)  # falor's final-output mode measured the KL
        headers = ["layer", "kind", "weight", "rank", "params", "MACs", *(["ms"] if timed else []), "nsr",
                   *(["kl"] if kl else []),
                   *(["ppl_diff", "probes"] if lossy else []), "note"]
        body = [
            [r["name"], r["kind"], "x".join(map(str, r["weight_shape"])) if r["weight_shape"] else "-",
             f"{r['rank']}/{r['full_rank']}" if r["rank"] else (f"-/{r['full_rank']}" if r["full_rank"] else "-"),
             f"{human(r['params_before'])} -> {human(r['params_after'])}" if r["params_before"] is not None else "-",
             f"{human(r['macs_before'])} -> {human(r['macs_after'])}" if r["macs_before"] is not None else "-",
             *([_ms_cell(r.get("ms_dense"), r.get("ms_factored"))] if timed else []),
             _nsr_cell(r), *([_fmt(r.get("kl_final"), ".4g")] if kl else []),
             *([_fmt(r.get("ppl_diff"), ".4f"), r.get("probes") or "-"] if lossy else []), r["note"]]
            for r in self.rows
        ]
        t = self.totals
        latency = (f"{t['ms_original']:.3g} -> {t['ms_measured']:.3g} ({t['ms_measured'] / t['ms_original']:.1%}, "
                   f"predicted {t['ms_predicted']:.3g})") if t.get("ms_measured") is not None else ""
        body.append(["TOTAL (model)", "", "", f"{t['decomposed']} decomposed",
                     f"{human(t['params_before'])} -> {human(t['params_after'])} ({t['params_after'] / t['params_before']:.1%})",
                     f"{human(t['macs_before'])} -> {human(t['macs_after'])}"
                     + (f" ({t['macs_after'] / t['macs_before']:.1%})" if t["macs_before"] else ""),
                     *([latency] if timed else []), "", *([""] if kl else []),
                     *(["", t.get("probes") or ""] if lossy else []), ""])
        return tabulate(body, headers=headers, tablefmt=fmt)

    def __str__(self) -> str:
        return self.table() + self._memory_line()

    def _memory_line(self) -> str:
        t = self.totals
        if t.get("peak_host_bytes") is None:
            return ""  # a model decomposed before memory was recorded
        device = t.get("peak_device_bytes")
        return (f"\nmemory: statistics held at most {_gib(t['statistics_bytes'])}, process peak "
                f"{_gib(t['peak_host_bytes'])}" + (f", device peak {_gib(device)}" if device is not None else ""))


def _gib(n: float) -> str:
    """Bytes in binary units: ``_gib(3 * 2 ** 29) == '1.50 GiB'``."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _decision_row(d: LayerDecision) -> dict[str, Any]:
    return {"name": d.target, "kind": d.kind, "weight_shape": d.weight_shape, "rank": d.rank,
            "full_rank": d.full_rank, "params_before": d.params_before, "params_after": d.params_after,
            "macs_before": d.macs_before, "macs_after": d.macs_after, "nsr": d.nsr,
            "calib_rows": d.calib_rows, "ms_dense": _ms(d.seconds_dense), "ms_factored": _ms(d.seconds_factored),
            "nsr_final": d.nsr_final, "kl_final": d.kl_final, "ppl_diff": d.ppl_diff, "probes": d.probes,
            "note": ("decomposed" if d.decomposed else f"kept: {d.reason}")
            + (f" (TOO LITTLE DATA: {d.calib_rows:.0f} calibration rows < full rank {d.full_rank})"
               if d.too_little_data else "")}


def _other_row(name: str, note: str) -> dict[str, Any]:
    return {"name": name, "kind": "-", "weight_shape": None, "rank": None, "full_rank": None,
            "params_before": None, "params_after": None, "macs_before": None, "macs_after": None,
            "nsr": None, "calib_rows": None, "ms_dense": None, "ms_factored": None, "nsr_final": None,
            "kl_final": None, "ppl_diff": None, "probes": None, "note": note}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _nsr_cell(row: dict[str, Any]) -> str:
    """The layer-output NSR falor predicted, else the final-output NSR a method measured (``"out 0.0123"``)."""
    if row["nsr"] is not None:
        return f"{row['nsr']:.4f}"
    return f"out {row['nsr_final']:.4f}" if row.get("nsr_final") is not None else "-"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _ms_cell(dense: float | None, factored: float | None) -> str:
    """``"4.1 -> 1.2"`` (milliseconds per call, dense -> factored), or the dense time of a layer kept dense."""
    if dense is None:
        return "-"
    return f"{dense:.3g} -> {factored:.3g}" if factored is not None else f"{dense:.3g}"


def report(gm: torch.fx.GraphModule) -> Report:
    """Summarise a GraphModule returned by ``fxdeco.transform``/``convert``.

    Example:
        >>> import torch, fxdeco
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> small = fxdeco.transform(model, [torch.randn(16, 8)], nsr_threshold=0.5)
        >>> fxdeco.report(small).totals["params_before"]
        72
    """
    info = model_record(gm, purpose="report()")
    decisions, skipped = info.decisions, info.skipped
    rows = [_decision_row(d) for d in decisions]
    # a layer called at several nodes is skipped at each of them: one row
    rows += [_other_row(target, f"skipped: {reason}") for target, reason in dict.fromkeys((k.target, k.reason)
                                                                                           for k in skipped)]
    rows += [_other_row(name, "removed: output never used") for name in info.removed]
    totals = {
        "method": info.method,
        "decomposed": sum(d.decomposed for d in decisions),
        "layers": len(decisions),
        "params_before": info.params_before,
        "params_after": info.params_after,
        "macs_before": info.macs_before,
        "macs_after": info.macs_after,
        "probes": info.summary.get("probes"),  # final-output measurements (falor's final-output mode, dwain)
        # measured end to end on the calibration batch, when falor timed the model (milliseconds per call)
        **{f"ms_{k}": _ms(info.summary.get(f"latency_{k}_s")) for k in ("original", "predicted", "measured")},
        # what the run held (fxdeco.memory): the process's and the device's peaks, and the statistics' sums
        **(info.summary.get("memory") or {}),
    }
    return Report(rows, totals)
