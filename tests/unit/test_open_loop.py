"""`bench/open_loop.py`: the seeded open-loop schedule and the two scheduling goals that
`bench/step_batching.py` and the GPU check's `sd.step_scheduling` are read by."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from open_loop import capacity, goal_lines, onset, percentile, schedule  # noqa: E402

CLASSES = (4, 20)
UNLOADED = {"step": {4: 0.1, 20: 0.4}, "request": {4: 0.1, 20: 0.4}}


def _table(rows: dict[float, tuple[float, float, float, float]]) -> dict:
    """rate -> (step p95 short, long, request p95 short, long)."""
    return {rate: {"step": {4: a, 20: b}, "request": {4: c, 20: d}}
            for rate, (a, b, c, d) in rows.items()}


def test_a_schedule_is_seeded_poisson_with_both_classes_and_distinct_seeds() -> None:
    first = schedule(10.0, 30.0, seed=3, classes=CLASSES)
    assert first == schedule(10.0, 30.0, seed=3, classes=CLASSES)
    assert first != schedule(10.0, 30.0, seed=4, classes=CLASSES)
    times = [at for at, _, _ in first]
    assert times == sorted(times) and times[0] > 0 and times[-1] <= 30.0
    assert 240 <= len(first) <= 360  # 300 expected at 10/s for 30 s
    shares = [steps for _, steps, _ in first].count(4) / len(first)
    assert 0.4 <= shares <= 0.6 and {steps for _, steps, _ in first} == set(CLASSES)
    assert len({seed for _, _, seed in first}) == len(first)


def test_percentile_of_few_values() -> None:
    assert percentile([], 95) != percentile([], 95)  # nan
    assert percentile([0.3], 95) == 0.3
    assert percentile([float(v) for v in range(1, 101)], 95) == pytest.approx(95.05)


def test_onset_is_read_at_the_lowest_rate_where_request_level_p95_doubles() -> None:
    table = _table({1.0: (0.12, 0.5, 0.15, 0.6),   # request short 1.5x: not yet
                    2.0: (0.13, 0.6, 0.25, 0.7),   # request short 2.5x: the onset for 4 steps
                    4.0: (0.14, 0.7, 0.60, 0.9)})  # request long 2.25x: the onset for 20
    assert onset(table, UNLOADED, 4) == (2.0, pytest.approx(0.52))
    assert onset(table, UNLOADED, 20) == (4.0, pytest.approx(0.7 / 0.9))
    assert onset(_table({1.0: (0.1, 0.4, 0.1, 0.4)}), UNLOADED, 4) is None


def test_capacity_is_the_highest_rate_with_every_class_within_3x() -> None:
    table = _table({1.0: (0.12, 0.5, 0.15, 0.6),
                    2.0: (0.13, 0.6, 0.35, 0.7),   # request short 3.5x: over
                    4.0: (0.31, 0.7, 0.60, 0.9)})  # step short 3.1x: over
    assert capacity(table, UNLOADED, "step", CLASSES) == 2.0
    assert capacity(table, UNLOADED, "request", CLASSES) == 1.0
    assert capacity(_table({1.0: (0.5, 0.5, 0.5, 0.5)}), UNLOADED, "step", CLASSES) == 0.0


def test_goal_lines_say_met_or_not_with_the_figures() -> None:
    table = _table({1.0: (0.12, 0.5, 0.15, 0.6), 2.0: (0.13, 0.6, 0.25, 0.7),
                    4.0: (0.14, 0.7, 0.60, 0.9)})
    first, second = goal_lines(table, UNLOADED, CLASSES)
    assert first == ("goal 1: 4 steps at 2/s: step p95 = 0.52x request (met, goal <= 0.6x); "
                     "20 steps at 4/s: step p95 = 0.78x request (NOT met, goal <= 0.6x)")
    assert second.startswith("goal 2: highest rate with p95 <= 3x unloaded: step 4/s, "
                             "request 2/s: 2.00x (met")
    never = goal_lines(_table({1.0: (0.1, 0.4, 0.5, 1.5)}), UNLOADED, CLASSES)[1]
    assert never.startswith("goal 2: request-level p95 exceeded 3x unloaded at every rate")
