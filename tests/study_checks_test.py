"""Tests for dropvar_tf.study.checks (the issue's goals on result rows)."""

from dropvar_tf._keras import tf
from dropvar_tf.study import checks
from dropvar_tf.study import config as config_lib
from dropvar_tf.study import estimators

_RATE = config_lib.TARGET_RATE


class TargetChecksTest(tf.test.TestCase):

  def _rows(self, rec, all_layers, single, pred, mp):
    def row(name, s, r2, group=estimators.HEAD, layers=None):
      return {"task": "digits", "rate": _RATE, "estimator": name,
              "group": group, "spearman": s, "r2": r2, "layers": layers,
              "features": "neurons", "include_prediction": False}
    return [row(estimators.RECOMMENDED, *rec, layers=["a", "b"]),
            row(estimators.ALL_LAYERS, *all_layers, layers=["a", "b"]),
            row("head: a", *single, layers=["a"]),
            row(estimators.PREDICTION_HEAD, *pred,
                group=estimators.BASELINE),
            row(estimators.MOMENT_PROPAGATION, *mp,
                group=estimators.BASELINE)]

  def test_all_pass(self):
    found = checks.target_checks(self._rows(
        (0.95, 0.8), (0.94, 0.7), (0.93, 0.7), (0.9, 0.5), (0.9, 0.6)))
    self.assertLen(found, 5)
    self.assertTrue(all(c["passed"] for c in found))

  def test_misses(self):
    found = checks.target_checks(self._rows(
        (0.92, 0.7), (0.94, 0.7), (0.90, 0.7), (0.93, 0.5), (0.9, 0.75)))
    self.assertEqual([c["passed"] for c in found],
                     [False, False, False, False, False])
    gap = found[2]
    self.assertAllClose(gap["value"], 0.04)

  def test_noise_ceiling_gives_the_attainable_bound(self):
    rows = self._rows((0.95, 0.8), (0.94, 0.7), (0.93, 0.7), (0.9, 0.5),
                      (0.9, 0.6))
    rows.append({"task": "digits", "rate": _RATE,
                 "estimator": estimators.NOISE_CEILING,
                 "group": estimators.CEILING,
                 "spearman": 0.81, "pearson": 0.85, "r2": 0.7})
    found = checks.target_checks(rows)
    self.assertLen(found, 6)
    bound = found[2]
    self.assertIn("bound for any estimator", bound["check"])
    self.assertAllClose(bound["value"], (0.9, 0.85))
    self.assertIsNone(bound["passed"])
    # Against the less noisy reference run the bound does not apply.
    ref_rows = [dict(r, ref_spearman=r["spearman"], ref_r2=r["r2"])
                for r in rows]
    ref_checks = checks.target_checks(ref_rows, against="ref")
    self.assertLen(ref_checks, 5)
    self.assertFalse(any("bound" in c["check"] for c in ref_checks))

  def test_unsupported_baseline_is_not_applicable(self):
    rows = self._rows((0.95, 0.8), (0.94, 0.7), (0.93, 0.7), (0.9, 0.5),
                      (0.9, 0.6))
    rows[-1] = {"task": "digits", "rate": _RATE,
                "estimator": estimators.MOMENT_PROPAGATION,
                "group": estimators.BASELINE, "unsupported": "layer x"}
    self.assertIsNone(checks.target_checks(rows)[-1]["passed"])


if __name__ == "__main__":
  tf.test.main()
