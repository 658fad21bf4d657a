"""Tests for dropvar_tf.metrics (fidelity, deciles, MC convergence)."""

import os
import sys

import numpy as np
from sklearn import metrics as sk_metrics

from dropvar_tf import metrics
from dropvar_tf import targets
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testing_models as tm

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
_ERR_SEEDS = (_PREFIX + "`seeds`. Expected two different integer seeds. "
              "Received: seeds=(3, 3)")
_ERR_HALVES = (_PREFIX + "`num_samples`. Expected an integer >= 4. "
               "Received: num_samples=3")
_ERR_NUM_SAMPLES = (_PREFIX + "`num_samples`. Expected an integer >= 2. "
                    "Received: num_samples=1")

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

  def test_decile_auc_of_constant_targets_is_nan(self):
    for top in (True, False):
      self.assertTrue(np.isnan(metrics.decile_auc(_targets(10), np.ones(10),
                                                  top=top)))

  def test_decile_auc_ties_at_the_cut_are_all_positive(self):
    # 30 of 100 targets are exactly 0 (saturated outputs): the bottom 10%
    # is every zero, whatever the examples' order.
    rng = np.random.default_rng(5)
    t = np.where(np.arange(100) < 30, 0.0, rng.gamma(2.0, 0.05, 100))
    e = t + rng.normal(0.0, 0.05, 100)
    want = sk_metrics.roc_auc_score(t == 0.0, -e)
    for seed in range(3):
      order = np.random.default_rng(seed).permutation(100)
      self.assertAllClose(metrics.decile_auc(e[order], t[order], top=False),
                          want, rtol=0, atol=1e-12)

  def test_decile_auc_when_ties_at_the_cut_would_take_every_example(self):
    # 95 zeros: the top "10%" is the 5 nonzero targets, not everything.
    t = np.concatenate([np.zeros(95), np.arange(1.0, 6.0)])
    e = np.random.default_rng(6).normal(size=100)
    self.assertAllClose(metrics.decile_auc(e, t),
                        sk_metrics.roc_auc_score(t > 0, e), rtol=0,
                        atol=1e-12)
    self.assertAllClose(metrics.decile_auc(e, -t, top=False),
                        sk_metrics.roc_auc_score(t > 0, -e), rtol=0,
                        atol=1e-12)

  def test_decile_auc_errors(self):
    t = _targets(20)
    cases = [
        (dict(estimate=t, target=t[:10]),
         _PREFIX + "`estimate`. Expected shape (10,) like `target`. "
         "Received: estimate='array of shape (20,)'"),
        (dict(estimate=t, target=t, fraction=0),
         _PREFIX + "`fraction`. Expected a number in (0, 1). Received: "
         "fraction=0"),
        (dict(estimate=t, target=t, fraction=1.0),
         _PREFIX + "`fraction`. Expected a number in (0, 1). Received: "
         "fraction=1.0")]
    for kwargs, message in cases:
      with self.subTest(message):
        with self.assertRaises(ValueError) as cm:
          metrics.decile_auc(**kwargs)
        self.assertEqual(str(cm.exception), message)

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
    t = _targets(20)
    cases = [
        ((t[:10], t), {}, _PREFIX + "`estimate`. Expected shape (20,) like "
         "`target`. Received: estimate='array of shape (10,)'"),
        ((t, t), dict(bins=0), _PREFIX + "`bins`. Expected an integer >= 1. "
         "Received: bins=0"),
        ((t, t), dict(bins=21), _PREFIX + "`bins`. Expected at most the "
         "number of examples (20). Received: bins=21")]
    for args, kwargs, message in cases:
      with self.subTest(message):
        with self.assertRaises(ValueError) as cm:
          metrics.decile_table(*args, **kwargs)
        self.assertEqual(str(cm.exception), message)


class SklearnAgreementTest(tf.test.TestCase):
  """R^2 and ROC AUC equal scikit-learn's (the core does not import it)."""

  def test_r2_matches_sklearn(self):
    rng = np.random.default_rng(3)
    for trial in range(50):
      n = int(rng.integers(2, 500))
      t = rng.gamma(2.0, 0.05, n)
      e = t + rng.normal(0.0, 0.1 * rng.random(), n) + 0.05 * rng.normal()
      if trial % 5 == 0:
        e = np.round(e, 1)
      got = metrics.fidelity(e, t)
      self.assertAllClose(got["r2"], sk_metrics.r2_score(t, e), rtol=0,
                          atol=1e-12)
      self.assertAllClose(
          got["r2_log"],
          sk_metrics.r2_score(np.log(1e-6 + t),
                              np.log(1e-6 + np.maximum(e, 0))),
          rtol=0, atol=1e-12)

  def test_r2_of_constant_targets_matches_sklearn(self):
    # 0.1 and 1.0: their float mean is off by one rounding, which used to
    # give R^2 of -1e33.
    for value in (0.2, 0.1, 1.0):
      t = np.full(10, value)
      for e in (t.copy(), _targets(10)):
        with self.subTest(value=value):
          got = metrics.fidelity(e, t)
          self.assertEqual(got["r2"], sk_metrics.r2_score(t, e))
          self.assertIn(got["r2_log"], (0.0, 1.0))

  def test_auc_matches_sklearn(self):
    rng = np.random.default_rng(4)
    for trial in range(50):
      n = int(rng.integers(12, 500))
      t = rng.gamma(2.0, 0.05, n)
      e = t + rng.normal(0.0, 0.2 * rng.random(), n)
      if trial % 3 == 0:
        e = np.round(e, 1)  # Ties between positives and negatives.
      for top in (True, False):
        for fraction in (0.1, 0.3):
          k = max(1, int(round(fraction * n)))
          order = np.argsort(t, kind="stable")
          labels = np.zeros(n, bool)
          labels[order[-k:] if top else order[:k]] = True
          want = sk_metrics.roc_auc_score(labels, e if top else -e)
          self.assertAllClose(
              metrics.decile_auc(e, t, top=top, fraction=fraction), want,
              rtol=0, atol=1e-12, msg=(trial, top, fraction))


class FitReportTest(tf.test.TestCase):

  def test_noise_bound_matches_simulated_gaussian_samples(self):
    rng = np.random.default_rng(0)
    sigma = rng.lognormal(-3.0, 0.5, 20000)
    for num_samples in (10, 100):
      t = np.std(rng.normal(0.0, sigma[:, None], (len(sigma), num_samples)),
                 axis=1, ddof=0) * np.sqrt(num_samples / (num_samples - 1))
      bound = metrics.noise_bound(t, num_samples)
      with self.subTest(num_samples=num_samples):
        # The true DPV is the best estimate there is: its R^2 is the bound.
        self.assertAllClose(bound["r2"], metrics.fidelity(sigma, t)["r2"],
                            atol=0.03)
        self.assertAllClose(bound["correlation"],
                            metrics.fidelity(sigma, t)["pearson"], atol=0.03)
        self.assertEqual(bound["method"], "gaussian_sampling_noise")

  def test_arguments_that_are_not_finite_numbers_are_named(self):
    t = _targets(10)
    nan = t.copy()
    nan[3] = np.nan
    dict_message = (
        "Expected an array of per-example values (for a model with several "
        "outputs, score each output: e.g. fidelity(estimate[name], "
        "targets[name])). Received: {arg}=\"dict with keys ['a', 'b']\"")
    cases = [
        (lambda: metrics.noise_bound({"a": t, "b": t}, 10),
         _PREFIX + "`targets`. " + dict_message.format(arg="targets")),
        (lambda: metrics.fit_report(t, {"a": t, "b": t}),
         _PREFIX + "`targets`. " + dict_message.format(arg="targets")),
        (lambda: metrics.fidelity({"a": t, "b": t}, t),
         _PREFIX + "`estimate`. " + dict_message.format(arg="estimate")),
        (lambda: metrics.noise_bound(nan, 10),
         _PREFIX + "`targets`. Expected finite values (no NaN or Inf). "
         "Received: targets='array with 1 non-finite values'"),
        (lambda: metrics.fit_report(np.array(["x"] * 10), t),
         _PREFIX + "`estimate`. Expected numbers. Received: "
         "estimate='ndarray that is not numeric'"),
        (lambda: metrics.fit_report(t[:9], t),
         _PREFIX + "`estimate`. Expected 10 values like `targets`. "
         "Received: estimate='9 values'")]
    for function, message in cases:
      with self.subTest(message):
        with self.assertRaises(ValueError) as cm:
          function()
        self.assertEqual(str(cm.exception), message)

  def test_noise_bound_of_constant_targets_is_undefined(self):
    bound = metrics.noise_bound(np.full(5, 0.2), 10)
    self.assertIsNone(bound["r2"])
    self.assertIsNone(bound["correlation"])

  def test_report_of_a_good_and_a_poor_estimate(self):
    rng = np.random.default_rng(1)
    truth = rng.lognormal(-3.0, 0.5, 500)
    t = truth * (1.0 + 0.01 * rng.normal(size=500))
    good = metrics.fit_report(truth, t, num_samples=1000)
    self.assertEqual(good["num_examples"], 500)
    self.assertGreater(good["spearman"], 0.95)
    self.assertGreater(good["r2"], 0.9)
    self.assertAllClose(good["mean_ratio"], 1.0, atol=0.01)
    self.assertEqual(good["far_below_bound"], [])
    poor = metrics.fit_report(0.1 * rng.permutation(truth), t,
                              num_samples=1000)
    self.assertLen(poor["far_below_bound"], 3)
    self.assertIn("mean estimate / mean target is 0.100",
                  poor["far_below_bound"][2])

  def test_report_without_num_samples_or_of_a_constant_estimate(self):
    report = metrics.fit_report(np.zeros(4), np.array([0.1, 0.2, 0.3, 0.4]))
    self.assertIsNone(report["noise_bound"])
    self.assertIsNone(report["spearman"])
    self.assertEqual(report["mean_ratio"], 0.0)
    self.assertEqual(report["far_below_bound"],
                     ["mean estimate / mean target is 0.000"])


class ConvergenceTest(tf.test.TestCase):

  def test_halves_agree_more_with_more_samples(self):
    model = tm.target_model("regression")
    x = tm.target_features(60)
    few = metrics.mc_convergence(model, x, num_samples=6)
    many = metrics.mc_convergence(model, x, num_samples=200)
    self.assertEqual(set(many), {"pearson", "spearman", "reliability",
                                 "mean_relative_std_error", "num_samples",
                                 "num_examples"})
    self.assertEqual(many["num_samples"], 200)
    self.assertEqual(many["num_examples"], 60)
    self.assertGreater(many["pearson"], few["pearson"])
    self.assertGreater(many["reliability"], 0.9)
    self.assertAllClose(many["reliability"],
                        2 * many["pearson"] / (1 + many["pearson"]))
    self.assertLess(many["mean_relative_std_error"],
                    few["mean_relative_std_error"])
    self.assertBetween(many["spearman"], 0.5, 1.0)

  def test_one_convergence_per_output_of_a_multi_output_model(self):
    model = tm.multi_output("dict")
    x = tm.target_features(40)
    got = metrics.mc_convergence(model, x, num_samples=20)
    self.assertEqual(set(got), {"value", "klass"})
    a, b, full = targets.split_half_targets(model, x, num_samples=20)
    for name in ("value", "klass"):
      self.assertEqual(got[name]["num_examples"], 40)
      self.assertAllClose(got[name]["pearson"],
                          np.corrcoef(a[name].ravel(), b[name].ravel())[0, 1])

  def test_statistics_of_the_split_halves(self):
    model = tm.target_model("softmax")
    x = tm.target_features(40)
    got = metrics.mc_convergence(model, x, num_samples=8, seed=2,
                                 statistic="per_class_std")
    a, b, full = (v.astype(np.float64).ravel() for v in
                  targets.split_half_targets(model, x, num_samples=8, seed=2,
                                             statistic="per_class_std"))
    self.assertEqual(got["num_examples"], 40)
    self.assertAllClose(got["pearson"], np.corrcoef(a, b)[0, 1], atol=1e-12)
    ranks = [np.argsort(np.argsort(v)) for v in (a, b)]  # No ties here.
    self.assertAllClose(got["spearman"], np.corrcoef(*ranks)[0, 1],
                        atol=1e-12)
    positive = full > 0
    rel = np.abs(a - b)[positive] / (2 * full[positive])
    self.assertAllClose(got["mean_relative_std_error"],
                        np.sqrt(np.mean(rel**2)))

  def test_constant_or_too_few_values_give_nan(self):
    # Rate 0: every DPV is 0, so the halves are constant.
    inputs = keras.Input((4,))
    zero = keras.Model(inputs, keras.layers.Dropout(0.0)(inputs))
    nan_keys = ("pearson", "spearman", "reliability",
                "mean_relative_std_error")
    got = metrics.mc_convergence(zero, np.ones((5, 4), np.float32),
                                 num_samples=4)
    for key in nan_keys:
      self.assertTrue(np.isnan(got[key]), msg=key)
    self.assertEqual(got["num_examples"], 5)
    # No examples at all is a bad `x`, refused as `mc_dropout_targets` does.
    with self.assertRaisesRegex(ValueError, "Expected at least one example"):
      metrics.mc_convergence(zero, np.ones((0, 4), np.float32), num_samples=4)
    one = metrics.mc_convergence(tm.target_model("regression"),
                                 tm.target_features(1), num_samples=4)
    for key in ("pearson", "spearman", "reliability"):
      self.assertTrue(np.isnan(one[key]), msg=key)
    self.assertGreater(one["mean_relative_std_error"], 0.0)

  def test_invalid_num_samples(self):
    model = tm.target_model("regression")
    for num_samples, message in [(1, _ERR_NUM_SAMPLES), (3, _ERR_HALVES)]:
      with self.assertRaises(ValueError) as e:
        metrics.mc_convergence(model, tm.target_features(),
                               num_samples=num_samples)
      self.assertEqual(str(e.exception), message)

  def test_noise_ceiling_returns_two_independent_runs(self):
    model = tm.target_model("binary")
    x = tm.target_features(30)
    a, b = metrics.noise_ceiling(model, x, num_samples=20, seeds=(3, 8))
    self.assertAllEqual(
        a, targets.mc_dropout_targets(model, x, num_samples=20, seed=3))
    self.assertAllEqual(
        b, targets.mc_dropout_targets(model, x, num_samples=20, seed=8))
    self.assertNotAllClose(a, b)
    with self.assertRaises(ValueError) as e:
      metrics.noise_ceiling(model, x, seeds=(3, 3))
    self.assertEqual(str(e.exception), _ERR_SEEDS)


if __name__ == "__main__":
  tf.test.main()
