"""SiteLatency: interpolation between measured ranks, speedups, and snapping up to a faster rank nearby."""

import pytest

from fxdeco.latency.curve import RankTime, SiteLatency


def curve():
    return SiteLatency("fc", dense=100.0, measured={128: 80.0, 8: 10.0, 32: 30.0, 64: 40.0})


def test_measured_ranks_are_exact_and_sorted():
    lat = curve()
    assert lat.ranks == [8, 32, 64, 128]
    assert lat.factored(32) == RankTime(30.0, True)
    assert lat.seconds(64) == 40.0 and lat.seconds(None) == 100.0


def test_interpolation_is_piecewise_linear_between_measured_ranks():
    lat = curve()
    assert lat.factored(20) == RankTime(20.0, False)      # halfway from 8 (10) to 32 (30)
    assert lat.factored(48).seconds == pytest.approx(35.0)
    assert lat.factored(96).seconds == pytest.approx(60.0)


def test_outside_the_measured_ranks_estimates_never_flatter():
    lat = curve()
    assert lat.factored(2) == RankTime(10.0, False)       # held at the smallest measured rank
    assert lat.factored(192) == RankTime(120.0, False)    # last slope (40 per 64 ranks) continued
    falling = SiteLatency("x", 1.0, {8: 0.5, 16: 0.4})
    assert falling.factored(64).seconds == 0.4            # a falling last segment is held flat
    single = SiteLatency("x", 1.0, {10: 0.2})
    assert single.factored(20).seconds == pytest.approx(0.4) and single.factored(5).seconds == 0.2


def test_no_measured_rank_and_bad_rank_are_errors():
    with pytest.raises(ValueError, match="no factored rank"):
        SiteLatency("tiny", 1.0, {}).factored(1)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        curve().factored(0)


def test_speedup_and_is_faster_with_margins():
    lat = curve()
    assert lat.speedup(8) == 10.0 and lat.speedup(128) == 1.25
    assert lat.is_faster(128, margin=0.2) and not lat.is_faster(128, margin=0.25)
    assert lat.is_faster(20) and not lat.is_faster(20, measured_only=True)
    slower = SiteLatency("x", 1.0, {8: 1.02})
    assert not slower.is_faster(8, margin=0.0)
    with pytest.raises(ValueError, match="margin"):
        lat.is_faster(8, margin=-1)


def test_fastest_near_snaps_up_only_to_faster_measured_ranks_within_the_window():
    lat = SiteLatency("fc", 100.0, {40: 50.0, 44: 60.0, 48: 45.0, 56: 46.0, 64: 30.0})
    assert lat.fastest_near(40) == 48                 # 44 is slower, 48 faster; 64 is outside 40 * 1.25 = 50
    assert lat.fastest_near(40, window=0.6) == 64
    assert lat.fastest_near(40, ranks=[44, 56]) == 40  # 44 slower, 56 outside the window
    assert lat.fastest_near(44) == 48                  # 48 and 56 in the window: 48 is fastest
    assert lat.fastest_near(64) == 64                  # nothing measured above
    assert lat.fastest_near(42) == 48                  # an unmeasured rank (estimated 55) snaps up too
    assert lat.fastest_near(46, window=0.0) == 46      # no window: never moves
    ties = SiteLatency("t", 1.0, {10: 0.5, 11: 0.4, 12: 0.4})
    assert ties.fastest_near(10) == 11                 # equally fast: the smaller rank
    assert all(lat.fastest_near(r) >= r for r in range(30, 70))   # never a smaller (less accurate) rank
