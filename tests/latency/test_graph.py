"""Whole-model timing and the additive latency prediction."""

import logging
import time

import pytest
import torch
import torch.fx
from torch import nn

from fxdeco.latency import SiteLatency, compare_models, measure_model, predict_latency
from fxdeco.latency.graph import rest_seconds

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
