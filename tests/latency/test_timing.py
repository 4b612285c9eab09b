"""interleaved_medians: ranks callables correctly, interleaves them, calibrates loops, bounds its time."""

import functools
import time

import pytest
import torch

from fxdeco.latency.timing import device_name, interleaved_medians


def test_sleep_2ms_ranks_above_sleep_0_2ms():
    t = interleaved_medians({"slow": lambda: time.sleep(0.002), "fast": lambda: time.sleep(0.0002)},
                            repeats=5, warmup=1, min_sample_s=0.01)
    assert set(t) == {"slow", "fast"}
    assert t["slow"] >= 0.002  # sleep never returns early
    assert t["fast"] >= 0.0002
    assert t["slow"] > 3 * t["fast"]  # ~2.1 ms against ~0.3 ms: a large, robust gap


def test_rounds_rotate_the_order_after_warmup_and_calibration():
    calls = []
    fns = {name: functools.partial(calls.append, name) for name in "abc"}
    interleaved_medians(fns, repeats=4, warmup=1, min_sample_s=0.0)
    # warm-up (1 call each), calibration (1 loop each: any time is >= 0), then rotated rounds
    assert calls == list("abc") + list("abc") + list("abc") + list("bca") + list("cab") + list("abc")


def test_each_sample_loops_long_enough():
    counts = {"tiny": 0}

    def tiny():
        counts["tiny"] += 1

    interleaved_medians({"tiny": tiny}, repeats=3, warmup=0, min_sample_s=0.002)
    assert counts["tiny"] > 3 * 10  # a no-op lasts well under 0.2 ms: each of the 3 samples loops many times


def test_max_time_stops_rounds_after_min_repeats():
    calls = {"n": 0}

    def sleepy():
        calls["n"] += 1
        time.sleep(0.005)

    start = time.perf_counter()
    interleaved_medians({"s": sleepy}, repeats=1000, warmup=0, min_sample_s=0.0, max_time_s=0.03, min_repeats=3)
    assert time.perf_counter() - start < 1.0
    assert 1 + 3 <= calls["n"] < 50  # calibration + at least min_repeats rounds, far fewer than 1000


def test_runs_under_inference_mode():
    seen = []
    interleaved_medians({"f": lambda: seen.append(torch.is_inference_mode_enabled())}, repeats=1, warmup=1,
                        min_sample_s=0.0)
    assert seen and all(seen)


def test_cuda_device_synchronises_before_reading_the_clock(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    interleaved_medians({"f": lambda: None}, repeats=2, warmup=0, min_sample_s=0.0, device="cuda")
    # two per sample (start, end): one calibration sample and two rounds
    assert len(syncs) == 6 and all(torch.device(d).type == "cuda" for d in syncs)
    syncs.clear()
    interleaved_medians({"f": lambda: None}, repeats=2, warmup=0, min_sample_s=0.0, device="cpu")
    assert syncs == []


def test_bad_options_and_empty_input():
    with pytest.raises(ValueError, match="repeats"):
        interleaved_medians({"f": lambda: None}, repeats=0)
    assert interleaved_medians({}) == {}


def test_device_name_names_the_cpu():
    name = device_name("cpu")
    assert name.startswith("cpu:") and len(name) > len("cpu:")
    assert device_name(None) == name
