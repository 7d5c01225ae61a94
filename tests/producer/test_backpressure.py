"""The producer's pause and resume decisions, with a clock the tests move by hand."""

from __future__ import annotations

from producer.queue import MIN_AUTO_HIGH_WATER, Backpressure


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def test_fixed_mark_pauses_at_high_water() -> None:
    backpressure = Backpressure(10, 0.5, 180.0, 10_000, Clock())

    assert backpressure.should_wait(9) is False
    assert backpressure.should_wait(10) is True


def test_fixed_mark_resumes_at_low_water() -> None:
    backpressure = Backpressure(10, 0.5, 180.0, 10_000, Clock())
    backpressure.should_wait(12)

    assert backpressure.should_wait(9) is True
    assert backpressure.should_wait(6) is True
    assert backpressure.should_wait(5) is False


def test_auto_mark_starts_at_minimum() -> None:
    backpressure = Backpressure("auto", 0.5, 180.0, 10_000, Clock())

    assert backpressure.high_water == MIN_AUTO_HIGH_WATER


def test_auto_mark_follows_drain_rate() -> None:
    clock = Clock()
    backpressure = Backpressure("auto", 0.5, 180.0, 10_000, clock)
    backpressure.should_wait(1000)
    # The fleet takes 5 tasks per second for two minutes while the producer sends nothing.
    for second in range(1, 121):
        clock.now_s = float(second)
        backpressure.should_wait(1000 - 5 * second)
    rate = backpressure.rate_tasks_per_s

    assert rate is not None
    assert abs(rate - 5.0) < 0.01
    assert backpressure.high_water == int(rate * 180.0)


def test_auto_mark_averages_bursts_of_takes() -> None:
    clock = Clock()
    backpressure = Backpressure("auto", 0.5, 180.0, 10_000, clock)
    backpressure.should_wait(3000)
    # Pods that finish in step take 30 tasks every 6th second and none in between: 5 tasks per second.
    length = 3000
    for second in range(1, 601):
        clock.now_s = float(second)
        if second % 6 == 0:
            length -= 30
        backpressure.should_wait(length)
    rate = backpressure.rate_tasks_per_s

    assert rate is not None
    assert 4.0 < rate < 6.0


def test_auto_mark_ignores_an_empty_queue() -> None:
    clock = Clock()
    backpressure = Backpressure("auto", 0.5, 180.0, 10_000, clock)
    backpressure.should_wait(100)
    clock.now_s = 10.0
    backpressure.should_wait(0)  # 10 tasks per second
    for second in range(11, 60):
        clock.now_s = float(second)
        backpressure.should_wait(0)

    assert backpressure.rate_tasks_per_s == 10.0


def test_auto_mark_counts_sent_tasks() -> None:
    clock = Clock()
    backpressure = Backpressure("auto", 0.5, 60.0, 10_000, clock)
    backpressure.should_wait(50)
    # 30 tasks sent and the queue grew by 10, so the fleet took 20 in 2 s.
    backpressure.sent(30)
    clock.now_s = 2.0
    backpressure.should_wait(60)

    assert backpressure.rate_tasks_per_s == 10.0


def test_auto_mark_capped_by_max_tasks() -> None:
    clock = Clock()
    backpressure = Backpressure("auto", 0.5, 180.0, 2_000, clock)
    backpressure.should_wait(5_000)
    clock.now_s = 60.0
    backpressure.should_wait(1_000)  # 4,000 tasks in 60 s: 66.7 tasks/s, 12,000 tasks for 180 s

    assert backpressure.high_water == 2_000


def test_auto_mark_ignores_short_intervals() -> None:
    clock = Clock()
    backpressure = Backpressure("auto", 0.5, 180.0, 10_000, clock)
    backpressure.should_wait(500)
    clock.now_s = 0.1
    backpressure.should_wait(100)

    assert backpressure.rate_tasks_per_s is None


def test_queue_read_skipped_while_far_below() -> None:
    clock = Clock()
    backpressure = Backpressure(10, 0.5, 180.0, 10_000, clock)
    backpressure.should_wait(3)
    backpressure.sent(2)

    assert backpressure.needs_check() is False


def test_queue_read_when_sends_could_fill() -> None:
    clock = Clock()
    backpressure = Backpressure(10, 0.5, 180.0, 10_000, clock)
    backpressure.should_wait(3)
    backpressure.sent(7)

    assert backpressure.needs_check() is True


def test_queue_read_once_per_second() -> None:
    clock = Clock()
    backpressure = Backpressure(10, 0.5, 180.0, 10_000, clock)
    backpressure.should_wait(3)
    clock.now_s = 1.0

    assert backpressure.needs_check() is True
