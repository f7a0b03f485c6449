"""Token bucket, concurrency gate and the split of proxy-wide limits between workers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pitcher_rpc.degrade.limits import Gate, TokenBucket
from pitcher_rpc.degrade.shares import ShareBook


def test_bucket_allows_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.retry_after() == 1
    assert not bucket.take(0.05)  # half a token
    assert bucket.take(0.1)
    # Never saves more than the burst, however long it was idle.
    assert sum(bucket.take(100.0) for _ in range(20)) == 5
    assert bucket.asked == 6 + 2 + 20


def test_bucket_share_scales_rate_and_burst_and_gives_back() -> None:
    bucket = TokenBucket(rate=100, burst=10, now=0.0, share=0.5)
    assert sum(bucket.take(0.0) for _ in range(10)) == 5
    assert sum(bucket.take(0.1) for _ in range(10)) == 5  # 50/s for 0.1 s
    bucket.set_share(0.1)
    assert bucket.tokens <= 1.0
    bucket.give_back()
    assert bucket.tokens <= 1.0 + 1e-9


def test_retry_after_counts_whole_seconds_until_a_token() -> None:
    bucket = TokenBucket(rate=0.25, burst=1, now=0.0)
    assert bucket.take(0.0)
    assert not bucket.take(0.0)
    assert bucket.retry_after() == 4


def test_gate_holds_its_share_and_reports_demand() -> None:
    gate = Gate(10, share=0.35)
    assert gate.local_limit == 3
    assert [gate.enter() for _ in range(4)] == [True, True, True, False]
    assert gate.demand() == 3 + 1
    gate.leave()
    assert gate.enter()
    assert not gate.enter()
    assert gate.enter(force=True) is False and gate.in_flight == 4
    gate.set_share(0.001)
    assert gate.local_limit == 1  # never zero


def test_under_capacity_every_worker_gets_its_demand_and_an_equal_part_of_the_rest() -> None:
    book = ShareBook()
    shares = book.update({0: {"rate": (10.0, 100.0)}, 1: {"rate": (5.0, 100.0)}})
    # 85 left over: 42.5 each on top of their own demand.
    assert shares[0]["rate"] == pytest.approx(0.525)
    assert shares[1]["rate"] == pytest.approx(0.475)


def test_at_capacity_shares_follow_demand_and_add_up_to_one() -> None:
    book = ShareBook()
    shares = {}
    for _ in range(10):
        shares = book.update({0: {"rate": (900.0, 500.0)}, 1: {"rate": (100.0, 500.0)}})
    assert shares[0]["rate"] + shares[1]["rate"] == pytest.approx(1.0)
    assert shares[0]["rate"] == pytest.approx(0.9, abs=0.03)
    # Demand moves: the shares follow within a few ticks.
    for _ in range(8):
        shares = book.update({0: {"rate": (100.0, 500.0)}, 1: {"rate": (900.0, 500.0)}})
    assert shares[1]["rate"] == pytest.approx(0.9, abs=0.03)


def test_idle_workers_split_evenly_and_a_lost_worker_drops_out() -> None:
    book = ShareBook()
    idle = {"rate": (0.0, 100.0)}
    shares = book.update({0: idle, 1: idle, 2: idle})
    assert [shares[w]["rate"] for w in range(3)] == pytest.approx([1 / 3] * 3)
    shares = book.update({0: {"rate": (50.0, 100.0)}, 2: {"rate": (50.0, 100.0)}})
    assert set(shares) == {0, 2}
    # Worker 1's part is kept for it a while (it may still be admitting).
    assert shares[0]["rate"] + shares[2]["rate"] < 1.0


def test_a_worker_without_demand_keeps_a_floor_at_capacity() -> None:
    book = ShareBook()
    for _ in range(20):
        shares = book.update({0: {"rate": (1000.0, 100.0)}, 1: {"rate": (0.0, 100.0)}})
    assert 0 < shares[1]["rate"] < 0.05


def test_a_silent_worker_keeps_its_part_for_a_while_then_drops_out() -> None:
    book = ShareBook()
    busy = {"rate": (100.0, 100.0)}
    for _ in range(5):
        book.update({0: busy, 1: busy})
    # Worker 1 misses ticks: worker 0 does not get its part (it may still admit).
    shares = book.update({0: busy})
    assert shares[0]["rate"] == pytest.approx(0.5, abs=0.01)
    for _ in range(10):
        shares = book.update({0: busy})
    assert shares[0]["rate"] == pytest.approx(1.0)


@given(
    st.lists(
        st.dictionaries(
            st.integers(0, 5),
            st.dictionaries(
                st.sampled_from(["a", "b", "c"]),
                st.tuples(st.floats(0, 1e6), st.sampled_from([10.0, 1000.0])),
            ),
            min_size=1,
        ),
        min_size=1,
        max_size=20,
    )
)
def test_every_limit_is_split_into_shares_adding_up_to_one(ticks: list) -> None:
    book = ShareBook()
    seen: set[int] = set()
    for reports in ticks:
        shares = book.update(reports)
        keys = {key for report in reports.values() for key in report}
        assert set(shares) == set(reports)
        for key in keys:
            # Never more than the whole; exactly the whole when every worker answered.
            total = sum(shares[w][key] for w in reports)
            assert total <= 1.0 + 1e-9
            if set(reports) >= seen:
                assert total == pytest.approx(1.0)
            assert all(shares[w][key] > 0 for w in reports)
        seen |= set(reports)
