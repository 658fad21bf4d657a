"""Tests for dropvar_tf.study.rows (scoring and finding result rows)."""

import numpy as np

from dropvar_tf._keras import tf
from dropvar_tf.study import rows


def _row(task, rate, estimator):
  return {"task": task, "rate": rate, "estimator": estimator}


class ScoreRowTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.targets = rng.gamma(2.0, 0.05, 50)
    self.ref = self.targets * np.exp(rng.normal(0.0, 0.1, 50))

  def test_perfect_estimate(self):
    row = rows.score_row("digits", "digits (real)", 0.3, "head: x", "head",
                         self.targets, self.targets, None, head_params=7)
    self.assertAllClose(row["spearman"], 1.0)
    self.assertAllClose(row["r2"], 1.0)
    self.assertEqual(row["n"], 50)
    self.assertEqual(row["head_params"], 7)
    self.assertIsNone(row["us_per_example"])
    self.assertEqual(row["estimate"], self.targets.tolist())
    self.assertFalse(any(k.startswith("ref_") for k in row))

  def test_reversed_estimate_against_reference(self):
    row = rows.score_row("digits", "d", 0.3, "e", "baseline", -self.ref,
                         self.targets, self.ref)
    self.assertAllClose(row["ref_spearman"], -1.0)
    self.assertLess(row["spearman"], -0.5)
    self.assertEqual(row["ref_n"], 50)

  def test_no_estimate_no_scores(self):
    row = rows.score_row("criteo", "c", 0.3, "e", "baseline", None,
                         self.targets, self.ref, unsupported="layer x")
    self.assertEqual(row, {
        "task": "criteo", "data": "c", "rate": 0.3, "estimator": "e",
        "group": "baseline", "head_params": None, "us_per_example": None,
        "layers": None, "unsupported": "layer x"})


class FindTest(tf.test.TestCase):

  def test_find_row_and_order(self):
    found = [_row("b", 0.5, "x"), _row("a", 0.3, "x"), _row("b", 0.1, "y"),
             _row("b", 0.1, "x")]
    self.assertIs(rows.find_row(found, "b", 0.1, "x"), found[3])
    self.assertIsNone(rows.find_row(found, "a", 0.5, "x"))
    self.assertEqual(rows.tasks_in(found), ["b", "a"])
    self.assertEqual(rows.rates_in(found, "b"), [0.1, 0.5])


if __name__ == "__main__":
  tf.test.main()
