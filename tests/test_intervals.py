"""The one 95 % interval of cellssl and its benchmarks: Student-t quantiles from scipy for any count
(the benchmarks' old table returned 2.0 from 7 values on, which understated the intervals)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import common, selection
from cellssl.eval.features import FeatureSet
from cellssl.eval.fewshot import run_fewshot
from cellssl.eval.metrics import mean_ci95, proportion_ci95, t95


@pytest.mark.parametrize(("n", "t"), [(2, 12.706), (3, 4.303), (5, 2.776), (7, 2.447), (8, 2.365), (30, 2.045),
                                      (601, 1.964)])
def test_t95_is_the_student_t_quantile(n: int, t: float) -> None:
    assert t95(n) == pytest.approx(t, abs=5e-4)


def test_t95_needs_two_values() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        t95(1)


def test_mean_ci95_is_a_t_interval_for_any_count() -> None:
    accs = [0.5, 0.7, 0.6, 0.9, 0.55, 0.65, 0.8, 0.75]  # 8 values: t = 2.365, the old table said 2.0
    m, h = mean_ci95(accs)
    assert m == pytest.approx(np.mean(accs))
    assert h == pytest.approx(2.3646 * np.std(accs, ddof=1) / math.sqrt(8), rel=1e-4)
    assert mean_ci95([0.3]) == (0.3, 0.0)
    assert all(math.isnan(v) for v in mean_ci95([]))


def test_proportion_ci95_is_the_normal_interval_of_an_accuracy() -> None:
    assert proportion_ci95(0.8, 100) == pytest.approx(1.95996 * math.sqrt(0.8 * 0.2 / 100), rel=1e-5)
    assert proportion_ci95(1.0, 10) == 0.0


def test_fewshot_episodes_use_the_same_interval() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 1.0, (12, 4)) for c in range(3)]).astype(np.float32)
    y = np.repeat(np.arange(3), 12)
    fs = FeatureSet(x, y, [""] * len(y), ["a", "b", "c"], {}, "mem")
    res = run_fewshot(fs, ways=3, shots=(1,), queries=3, episodes=7, seed=0)["results"]["1"]
    assert res["ci95"] == pytest.approx(t95(7) * res["std"] / math.sqrt(7))


def test_benchmarks_use_cellssl_s_interval_over_seeds() -> None:
    rows = [{"linear": v} for v in (0.70, 0.72, 0.69, 0.74, 0.71, 0.73, 0.70)]  # 7 seeds
    assert common.mean_interval(rows, "linear") == pytest.approx(mean_ci95([r["linear"] for r in rows]))
    assert common.mean_interval(rows, "linear")[1] == pytest.approx(
        2.447 * np.std([r["linear"] for r in rows], ddof=1) / math.sqrt(7), rel=1e-3)
    runs = [{"acc": r["linear"], "classes": 8} for r in rows]
    assert selection.cell(runs, 8).startswith(f"{100 * mean_ci95([r['acc'] for r in runs])[0]:.1f} ± "
                                              f"{100 * mean_ci95([r['acc'] for r in runs])[1]:.1f}")
