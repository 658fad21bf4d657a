"""Tests for dropvar_tf.metrics (fidelity, decile_auc, decile_table)."""

import numpy as np

from dropvar_tf import metrics
from dropvar_tf._keras import tf

_PREFIX = "Invalid value received for argument "
_ERR_SHAPE = (_PREFIX + "`estimate`. Expected shape (10,) like `mc_targets`. "
              "Received: estimate='array of shape (9,)'")
_ERR_NAN = (_PREFIX + "`mc_targets`. Expected finite values (no NaN or "
            "Inf). Received: mc_targets='array with 1 non-finite values'")
_ERR_INF = (_PREFIX + "`estimate`. Expected finite values (no NaN or Inf). "
            "Received: estimate='array with 1 non-finite values'")
_ERR_ONE_VALUE = (_PREFIX + "`estimate`. Expected a 1-D array of at least 2 "
                  "values. Received: estimate='array of shape (1,)'")
_ERR_MATRIX = (_PREFIX + "`mc_targets`. Expected a 1-D array of at least 2 "
               "values. Received: mc_targets='array of shape (5, 2)'")
_ERR_NONE = (_PREFIX + "`estimate`. Expected an array of per-example values. "
             "Received: estimate=None")
_ERR_TABLE_TARGET = (_PREFIX + "`target`. Expected a 1-D array of at least 2 "
                     "values. Received: target='array of shape (1, 3)'")

_KEYS = {"pearson", "spearman", "kendall", "r2", "r2_log", "mae",
         "auc_top10", "auc_bottom10", "n"}


def _targets(n=200, seed=0):
  return np.random.default_rng(seed).gamma(2.0, 0.05, n)


class FidelityTest(tf.test.TestCase):

  def test_perfect_estimate(self):
    t = _targets()
    f = metrics.fidelity(t.copy(), t)
    self.assertEqual(set(f), _KEYS)
    for key in ("pearson", "spearman", "kendall", "r2", "r2_log",
                "auc_top10", "auc_bottom10"):
      self.assertAllClose(f[key], 1.0, atol=1e-12, msg=key)
    self.assertEqual(f["mae"], 0.0)
    self.assertEqual(f["n"], 200)

  def test_constant_estimate_gives_nan_correlations(self):
    t = _targets()
    f = metrics.fidelity(np.full_like(t, t.mean()), t)
    for key in ("pearson", "spearman", "kendall"):
      self.assertTrue(np.isnan(f[key]), msg=key)
    # Predicting the mean explains nothing: R^2 is exactly 0.
    self.assertAllClose(f["r2"], 0.0, atol=1e-12)
    self.assertAllClose(f["mae"], np.mean(np.abs(t - t.mean())))

  def test_constant_targets_give_nan_correlations(self):
    f = metrics.fidelity(_targets(10), np.full(10, 0.2))
    self.assertTrue(np.isnan(f["spearman"]))
    self.assertTrue(np.isnan(f["pearson"]))

  def test_reversed_order(self):
    t = _targets()
    f = metrics.fidelity(t.max() + t.min() - t, t)
    self.assertAllClose(f["spearman"], -1.0)
    self.assertAllClose(f["kendall"], -1.0)
    self.assertAllClose(f["pearson"], -1.0)
    self.assertAllClose(f["auc_top10"], 0.0)
    self.assertAllClose(f["auc_bottom10"], 0.0)
    self.assertLess(f["r2"], 0.0)

  def test_biased_estimate_keeps_ranks_but_loses_r2(self):
    t = _targets()
    f = metrics.fidelity(2.0 * t, t)
    self.assertAllClose(f["spearman"], 1.0)
    self.assertAllClose(f["pearson"], 1.0)
    # Not a refitted line: doubling every value is penalised.
    expected_r2 = 1.0 - np.sum(t**2) / np.sum((t - t.mean())**2)
    self.assertAllClose(f["r2"], expected_r2)
    self.assertLess(f["r2"], 0.5)
    self.assertAllClose(f["mae"], np.mean(t))
    self.assertAllClose(f["r2_log"], 1.0 - np.sum(
        (np.log(1e-6 + 2 * t) - np.log(1e-6 + t))**2) / np.sum(
            (np.log(1e-6 + t) - np.log(1e-6 + t).mean())**2))

  def test_monotone_transform_keeps_rank_scores(self):
    t = _targets()
    f = metrics.fidelity(t**3, t)
    self.assertAllClose(f["spearman"], 1.0)
    self.assertAllClose(f["kendall"], 1.0)
    self.assertLess(f["pearson"], 1.0)

  def test_independent_estimate_is_near_zero(self):
    t = _targets(2000, seed=1)
    f = metrics.fidelity(_targets(2000, seed=2), t)
    self.assertLess(abs(f["spearman"]), 0.1)
    self.assertBetween(f["auc_top10"], 0.4, 0.6)

  def test_trailing_unit_axis_and_lists_accepted(self):
    t = _targets(20)
    self.assertAllClose(metrics.fidelity(t[:, None], list(t))["spearman"],
                        1.0)

  def test_errors(self):
    t = _targets(10)
    nan, inf = t.copy(), t.copy()
    nan[2] = np.nan
    inf[4] = np.inf
    cases = [
        ("shape", _ERR_SHAPE, t[:9], t),
        ("nan", _ERR_NAN, t, nan),
        ("inf", _ERR_INF, inf, t),
        ("one_value", _ERR_ONE_VALUE, t[:1], t[:1]),
        ("matrix", _ERR_MATRIX, t, t.reshape(5, 2)),
        ("none", _ERR_NONE, None, t),
    ]
    for label, message, estimate, target in cases:
      with self.subTest(label):
        with self.assertRaises(ValueError) as cm:
          metrics.fidelity(estimate, target)
        self.assertEqual(str(cm.exception), message)


class DecileTest(tf.test.TestCase):

  def test_decile_auc_perfect_reversed_bottom(self):
    t = _targets(100)
    self.assertEqual(metrics.decile_auc(t, t), 1.0)
    self.assertEqual(metrics.decile_auc(-t, t), 0.0)
    self.assertEqual(metrics.decile_auc(t, t, top=False), 1.0)
    self.assertEqual(metrics.decile_auc(-t, t, top=False), 0.0)

  def test_decile_auc_counts_the_top_fraction(self):
    t = np.arange(20, dtype="float64")
    # The top 10% of 20 targets are the two largest (18 and 19). The largest
    # gets the lowest estimate: positive 18 outranks all 18 negatives,
    # positive 19 none, so AUC = 0.5; with fraction 0.05 only 19 is positive.
    e = t.copy()
    e[19] = -1.0
    self.assertAllClose(metrics.decile_auc(e, t), 0.5)
    self.assertAllClose(metrics.decile_auc(e, t, fraction=0.05), 0.0)

  def test_decile_auc_all_positive_is_nan(self):
    t = _targets(10)
    self.assertTrue(np.isnan(metrics.decile_auc(t, t, fraction=1.0)))

  def test_decile_table(self):
    e = np.arange(100, dtype="float64")
    t = 2.0 * e
    table = metrics.decile_table(e, t)
    self.assertEqual(set(table), {"estimate_mean", "target_mean", "count"})
    self.assertAllEqual(table["count"], [10] * 10)
    self.assertAllClose(table["estimate_mean"], np.arange(10) * 10 + 4.5)
    self.assertAllClose(table["target_mean"], 2 * table["estimate_mean"])

  def test_decile_table_uneven_bins_sorted_by_estimate(self):
    rng = np.random.default_rng(0)
    e = rng.normal(size=23)
    t = rng.normal(size=23)
    table = metrics.decile_table(e, t, bins=4)
    self.assertEqual(int(table["count"].sum()), 23)
    self.assertAllEqual(table["count"], [6, 6, 6, 5])
    self.assertTrue(np.all(np.diff(table["estimate_mean"]) > 0))
    order = np.argsort(e, kind="stable")
    self.assertAllClose(table["target_mean"][0], t[order[:6]].mean())

  def test_decile_table_errors(self):
    with self.assertRaises(ValueError) as cm:
      metrics.decile_table(np.ones(3), np.ones((1, 3)))
    self.assertEqual(str(cm.exception), _ERR_TABLE_TARGET)


if __name__ == "__main__":
  tf.test.main()
