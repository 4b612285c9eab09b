"""Whole-model timing and the additive latency prediction."""

import logging
import time

import pytest
import torch
import torch.fx
from torch import nn

from fxdeco.latency import SiteLatency, TimingOptions, compare_models, measure_model, predict_latency, probe_sites
from fxdeco.latency.graph import rest_seconds
from passes.rewrite import Factorization, factorize_sites
from passes.sites import find_sites

pytestmark = pytest.mark.usefixtures("one_thread")


class Sleepy(nn.Module):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x, scale=1.0):
        time.sleep(self.seconds)
        return x * scale


def test_compare_models_interleaves_and_ranks_them():
    t = compare_models({"slow": Sleepy(0.002), "fast": Sleepy(0.0002)}, torch.ones(2), repeats=3, min_sample_s=0.005)
    assert t["slow"] >= 0.002 and t["slow"] > 3 * t["fast"]


def test_measure_model_passes_keyword_batches():
    seen = []

    class Recorder(nn.Module):
        def forward(self, x, scale=1.0):
            seen.append(scale)
            return x

    assert measure_model(Recorder(), {"x": torch.ones(2), "scale": 3.0}, repeats=1, warmup=0, min_sample_s=0.0) > 0
    assert seen and set(seen) == {3.0}


def test_predict_latency_adds_the_rest_and_each_site_dense_or_factored():
    lat = {"a": SiteLatency("a", 3.0, {8: 1.0, 16: 2.0}), "b": SiteLatency("b", 4.0, {4: 1.5}),
           "c": SiteLatency("c", 0.5, {})}
    rest = rest_seconds(10.0, lat)
    assert rest == 2.5
    assert predict_latency(rest, lat, {}) == 10.0  # all dense: the measured model time
    assert predict_latency(rest, lat, {"a": 8, "b": None}) == 2.5 + 1.0 + 4.0 + 0.5
    assert predict_latency(rest, lat, {"a": 12, "b": 4}) == pytest.approx(2.5 + 1.5 + 1.5 + 0.5)  # 12: interpolated
    with pytest.raises(KeyError, match="zz"):
        predict_latency(rest, lat, {"zz": 4})
    with pytest.raises(ValueError, match="no factored rank"):
        predict_latency(rest, lat, {"c": 1})


def test_rest_is_never_negative(caplog):
    with caplog.at_level(logging.WARNING, logger="fxdeco.latency.graph"):
        assert rest_seconds(1.0, {"a": SiteLatency("a", 1.5, {})}) == 0.0
    assert "more than the whole model" in caplog.text


def test_prediction_for_a_decomposed_mlp_is_in_the_right_range():
    """End to end on a real model: the additive model is rough, so only a wide band is asserted."""
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)).eval()
    gm = torch.fx.symbolic_trace(model)
    sites, _ = find_sites(gm)
    x = torch.randn(128, 512)
    lat = probe_sites(gm, sites, x, lambda s: [16], table=None,
                      options=TimingOptions(repeats=5, warmup=1, min_sample_s=0.003))
    small = factorize_sites(gm, sites, {s.target: Factorization(torch.randn(16, 512), torch.randn(512, 16))
                                        for s in sites})
    times = compare_models({"dense": gm, "factored": small}, x, repeats=5, min_sample_s=0.005)
    rest = rest_seconds(times["dense"], lat)
    predicted = predict_latency(rest, lat, {"0": 16, "2": 16})
    assert times["factored"] < times["dense"] / 3  # rank 16 of 512: ~1/16 of the MACs
    assert predicted < times["dense"] / 3
    assert 0.2 * times["factored"] < predicted < 5 * times["factored"]
