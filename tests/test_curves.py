"""The held-out ELBO at equal wall-clock (estbench.analysis.curves)."""
from __future__ import annotations

import pandas as pd
import pytest

from estbench.analysis import curves


def _records(cells):
    """cells: {(estimator, seed): [(step, wall_time, elbo), ...]} on one task."""
    rows = []
    for (est, seed), points in cells.items():
        for step, t, elbo in points:
            for metric, value in (("wall_time", t), ("elbo", elbo)):
                rows.append({"task": "toy", "estimator": est, "seed": seed, "device": "cpu",
                             "n_samples": 4, "steps": 10, "step": step, "metric": metric,
                             "value": value})
    rows.append({**rows[0], "metric": "final_elbo", "value": 99.0, "step": 10})  # not a curve point
    return pd.DataFrame(rows)


def test_curves_are_read_at_the_shortest_training_time_by_interpolation():
    rec = _records({
        # fast: 1 s of training, ELBO rising linearly from -10 to -2
        ("fast", 0): [(0, 0.0, -10.0), (5, 0.5, -6.0), (10, 1.0, -2.0)],
        # slow: 4 s for the same steps; at 1 s it is a quarter of the way between -10 and -4
        ("slow", 0): [(0, 0.0, -10.0), (5, 2.0, -7.0), (10, 4.0, -4.0)],
    })
    out = curves.elbo_at_common_time(rec).set_index("estimator")
    assert set(out.common_time) == {1.0} and set(out.median_time) == {2.5}
    assert out.loc["fast", "elbo_at_time"] == pytest.approx(-2.0)
    assert out.loc["slow", "elbo_at_time"] == pytest.approx(-10.0 + 3.0 * 1.0 / 2.0)
    # at equal steps the slow estimator is worse than at its end; the fast one's end is its reading


def test_common_time_is_per_task_and_device():
    a = _records({("e", 0): [(0, 0.0, -3.0), (10, 2.0, -1.0)]})
    b = a.assign(device="cuda", value=a.value.where(a.metric != "wall_time", a.value / 4))
    out = curves.elbo_at_common_time(pd.concat([a, b])).set_index("device")
    assert out.loc["cpu", "common_time"] == 2.0 and out.loc["cuda", "common_time"] == 0.5
    assert out.loc["cpu", "elbo_at_time"] == out.loc["cuda", "elbo_at_time"] == -1.0


def test_no_curves_gives_an_empty_frame():
    rec = _records({("e", 0): [(0, 0.0, -3.0)]})
    out = curves.elbo_at_common_time(rec[rec.metric == "final_elbo"])
    assert out.empty and "elbo_at_time" in out.columns
