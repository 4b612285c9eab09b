"""The verdicts benchmarks/LATENCY.md prints: keep_latency against keep_macs at the same measured latency."""

from __future__ import annotations

import pytest

from benchmarks.latency import _judge


def _row(variant: str, eager: float, quality: float) -> dict:
    return {"variant": variant, "eager": eager, "quality": quality}


ROWS = [_row("original", 1.0, 1.0), _row("keep_macs=0.6", 0.7, 0.9), _row("keep_macs=0.3", 0.5, 0.6)]


def test_inside_the_keep_macs_range_the_curve_is_interpolated() -> None:
    assert _judge(ROWS, _row("keep_latency=0.6", 0.6, 0.76)) == ("0.75", "yes")
    assert _judge(ROWS, _row("keep_latency=0.6", 0.6, 0.74)) == ("0.75", "NO")


def test_faster_than_every_keep_macs_row_it_must_dominate_one() -> None:
    baseline, verdict = _judge(ROWS, _row("keep_latency=0.4", 0.45, 0.65))
    assert baseline == "-" and verdict.startswith("yes (faster and better than keep_macs=0.3")
    assert _judge(ROWS, _row("keep_latency=0.4", 0.45, 0.55)) == ("-", "-")


def test_the_layer_table_counts_factorized_layers_measured_no_faster_than_dense() -> None:
    from types import SimpleNamespace

    from benchmarks.latency import _layer_speedups

    def decision(decomposed: bool, dense: float, factored: float | None, macs: tuple[int, int]) -> SimpleNamespace:
        return SimpleNamespace(decomposed=decomposed, seconds_dense=dense, seconds_factored=factored,
                               macs_before=macs[0], macs_after=macs[1])

    record = SimpleNamespace(decisions=[decision(True, 4.0, 1.0, (8, 2)), decision(True, 2.0, 2.0, (4, 2)),
                                        decision(False, 9.0, 9.5, (9, 9)), decision(True, 1.0, None, (1, 1))])
    assert _layer_speedups(record) == (2.0, 3.0, 2, 1)  # the equal one counts; kept or untimed ones do not
    assert _layer_speedups(SimpleNamespace(decisions=[decision(False, 1.0, 2.0, (1, 1))])) is None


def test_output_fidelity_does_not_credit_a_model_that_ignores_its_input() -> None:
    """Random-weight networks put most of their output in one input-independent vector: the plain cosine gave a
    constant output 0.999 on resnet18. Centred, the constant scores about 0 and the reference 1."""
    import torch

    from benchmarks.latency import _fidelity

    torch.manual_seed(0)
    offset = torch.randn(10) * 30

    def reference(x: torch.Tensor) -> torch.Tensor:
        return x @ torch.ones(4, 10) + offset

    inputs = [torch.randn(16, 4) for _ in range(3)]
    score = _fidelity(reference, inputs)
    constant = lambda x: offset.expand(len(x), 10)  # noqa: E731
    plain = torch.nn.functional.cosine_similarity(reference(inputs[0]), constant(inputs[0])).mean()
    assert plain > 0.9, "the case the centring is for: the plain cosine credits the constant"
    assert score(reference) == pytest.approx(1.0)
    assert abs(score(constant)) < 0.2
    assert 0.5 < score(lambda x: reference(x) + 0.5 * torch.randn(len(x), 10)) < 0.99


def test_the_speed_up_floor_drops_ranks_that_realise_too_little_of_their_mac_speed_up(monkeypatch) -> None:
    from benchmarks import latency_efficiency as eff
    from fxdeco.latency.curve import SiteLatency
    from fxdeco.methods.falor import local
    from fxdeco.methods.falor.speed import LatencyModel
    from passes import Site

    site = Site("fc", "linear", "fc", "fc.weight", None, (128, 128))
    assert eff.mac_speedup(site, 8) == 8.0  # 128*128 / (8 * (128 + 128))
    latency = LatencyModel({"fc": SiteLatency("fc", 10.0, {8: 2.0, 16: 3.0, 32: 5.0, 64: 9.0})}, 10.0, 0.0, ((), {}))
    monkeypatch.setattr(local, "_budget_candidates", lambda site, config, latency: [8, 16, 32, 64])
    with eff.speedup_floor(0.8):
        # rank 8: measured 5x of 8x (0.62) is dropped; 16: 3.3x of 4x (0.83), 32 and 64 stay
        assert local._budget_candidates(site, None, latency) == [16, 32, 64]
        assert local._budget_candidates(Site("x", "linear", "x", "x.weight", None, (128, 128)), None, latency) \
            == [8, 16, 32, 64]  # a layer that was not timed is left to falor
    assert local._budget_candidates(site, None, latency) == [8, 16, 32, 64]  # restored


def test_the_cuda_benchmark_judges_its_targets_from_the_measured_ratios() -> None:
    import torch

    from benchmarks import latency_cuda

    def row(variant: str, latency: float) -> dict:
        return {"model": "m", "batch": 1, "variant": variant, "latency": latency, "original_ms": 1.0,
                "ms": latency, "predicted": None, "cosine": 0.99, "params": 0.5, "note": ""}

    rows = [row("keep_latency=0.6 (timed at 1)", 0.65), row("keep_latency=0.6 (timed at 64)", 0.67),
            row("nsr_threshold=0.05, faster (timed at 1)", 1.01), row("nsr_threshold=0.05, faster (timed at 64)", 1.03),
            {"model": "m", "batch": 64, "variant": "keep_macs=0.5", "note": "refused: too far"}]
    text = latency_cuda.write(rows, torch.device("cpu"), torch.bfloat16, 60.0, save=False)
    targets = text.split("## Targets")[1]
    verdicts = [line.split("|")[-2].strip() for line in targets.splitlines() if line.startswith("| m ")]
    assert verdicts == ["yes", "NO", "yes", "NO"]  # <= 0.66; then not slower than 1.02
    assert "refused: too far" in text


def test_the_decode_stacks_weights_keep_a_random_inputs_size_and_have_a_decaying_spectrum() -> None:
    import torch

    from benchmarks.latency_cuda import _decaying

    torch.manual_seed(0)
    w = _decaying(torch.Size((96, 64)))
    s = torch.linalg.svdvals(w)
    assert float((w ** 2).sum()) == pytest.approx(64, rel=1e-4)
    assert s[0] / s[31] == pytest.approx(1 + 31 / 32, rel=1e-3) and bool((s[:-1] >= s[1:] - 1e-6).all())
