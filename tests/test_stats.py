"""Intervals, the exact paired test and per-image records, on hand-computed cases (issue 16, item 2)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpool_cli import stats


def test_wilson_354_of_360_by_hand():
    # p = 354/360, z = 1.96: centre = (p + z^2/720) / (1 + z^2/360), half = z/(1 + z^2/360) * sqrt(p(1-p)/360 + z^2/518400)
    z = 1.959963984540054
    p = 354 / 360
    d = 1 + z * z / 360
    centre, half = (p + z * z / 720) / d, z / d * math.sqrt(p * (1 - p) / 360 + z * z / 518400)
    assert stats.wilson(354, 360) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert stats.wilson_pct(354, 360) == (96.41, 99.23)  # 98.33% of 360 images: 96.41-99.23
    # 360/360: the lower bound is n / (n + z^2) = 360 / 363.84 = 98.94%
    assert stats.interval_fields(354, 360, 360) == {"top1_ci": [96.41, 99.23], "top5_ci": [98.94, 100.0]}


def test_wilson_edges():
    lo, hi = stats.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)  # z^2 / (n + z^2) = 3.8415 / 13.8415
    assert stats.wilson(10, 10)[1] == 1.0 and stats.wilson(10, 10)[0] == pytest.approx(1 - 0.2775, abs=1e-4)
    assert all(math.isnan(v) for v in stats.wilson(0, 0))
    with pytest.raises(ValueError):
        stats.wilson(11, 10)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_contains_the_estimate_and_shrinks_with_n(kn):
    k, n = kn
    lo, hi = stats.wilson(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    lo4, hi4 = stats.wilson(4 * k, 4 * n)
    assert hi4 - lo4 < hi - lo


def test_mcnemar_on_hand_computed_flip_tables():
    # 2x2 table of two classifiers on the same images: both right 340, A only 3, B only 10, both wrong 7.
    # Only the 13 flips count: P(X <= 3), X ~ Bin(13, 1/2) = (1 + 13 + 78 + 286) / 8192; two-sided: doubled.
    assert stats.mcnemar(3, 10) == 2 * 378 / 8192 == pytest.approx(0.0922851562)
    assert stats.mcnemar(10, 3) == stats.mcnemar(3, 10)
    assert stats.mcnemar(0, 5) == 2 / 32  # all 5 flips one way: 0.0625, not significant at 0.05
    assert stats.mcnemar(0, 6) == 2 / 64  # 6 flips one way: 0.03125, significant
    assert stats.mcnemar(0, 0) == 1.0 and stats.mcnemar(4, 4) == 1.0  # the two-sided doubling is capped at 1
    assert 0.0 < stats.mcnemar(2000, 2300) < 1e-5  # exact in integers, no underflow on large counts


def test_unpaired_two_proportion_test():
    # 354/360 vs 340/360: pooled p = 694/720, z = (354 - 340)/360 / sqrt(p(1-p) * 2/360)
    pooled = 694 / 720
    z = (14 / 360) / math.sqrt(pooled * (1 - pooled) * 2 / 360)
    assert stats.two_proportion(354, 360, 340, 360) == pytest.approx(math.erfc(z / math.sqrt(2)))
    assert stats.two_proportion(5, 10, 5, 10) == 1.0 and stats.two_proportion(10, 10, 10, 10) == 1.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), max_size=70), st.data())
def test_bits_round_trip_and_flips_count_the_discordant_images(a, data):
    b = data.draw(st.lists(st.booleans(), min_size=len(a), max_size=len(a)))
    ea, eb = stats.encode_bits(a), stats.encode_bits(b)
    assert stats.decode_bits(ea, len(a)) == a
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    assert stats.flips(ea, eb, len(a)) == (only_a, only_b)
    if a:
        assert stats.paired_p(ea, eb, len(a)) == (only_a, only_b, stats.mcnemar(only_a, only_b))


def test_correct_bits_are_in_sample_order_and_records_must_cover_the_images():
    labels = [0, 1, 2, 3]
    # predictions come batch by batch in any order of samples: sample 2 wrong, the rest right
    bits = stats.correct_bits([3, 9, 0, 1], [3, 2, 0, 1], labels)
    assert stats.decode_bits(bits, 4) == [True, True, False, True]
    assert stats.paired_p(bits, None, 4) is None
    assert stats.paired_p(bits, stats.encode_bits([True] * 20), 4) is None  # other images: not paired


def test_thread_policy_sets_passive_waiting_only_on_shared_cores_and_never_over_a_choice(monkeypatch):
    import sys

    from tpool_cli import threads
    from tpool_cli.errors import TpoolError

    monkeypatch.delitem(sys.modules, "torch")  # as at `tpool` start-up, before torch is imported
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.7, 1.0, 1.0))
    env: dict[str, str] = {}
    assert threads.early_policy(env) == "PASSIVE" and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    chosen = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.early_policy(chosen) is None and chosen == {"OMP_WAIT_POLICY": "ACTIVE"}
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    idle: dict[str, str] = {}
    assert threads.early_policy(idle) is None and idle == {}
    assert threads.parse_threads("3") == 3 and threads.parse_threads(None) is None
    with pytest.raises(TpoolError, match="--threads must be >= 1"):
        threads.parse_threads(0)


def test_speed_flags_name_their_reasons():
    from tpool_cli import speedflags

    assert speedflags.spread([100.0, 110.0, 90.0]) == 0.2 and speedflags.spread([5.0]) is None
    assert speedflags.speed_flag(0.2, {"load1": 2.3, "cores": 2}) is None  # tpool's own 2 threads on 2 cores
    assert speedflags.speed_flag(0.41, {"load1": 3.1, "cores": 2}) == "noisy: spread 41%; busy: load 3.10 on 2 cores"
    assert speedflags.speed_flag(None, {"gpu_other_procs": 2}) == "busy: 2 other process(es) on the GPU"
    assert speedflags.speed_flag(None, {"gpu_other_procs": None}) is None  # no nvidia-smi: cannot tell, not flagged
    timings = [(4, 1.0)] + [(4, 0.04)] * 6 + [(4, 0.4)] + [(2, 0.01)]  # warm-up, steady, one slow batch, partial
    assert speedflags.batch_spread(timings, 4) == 0.0  # the inter-quartile range ignores the one outlier
