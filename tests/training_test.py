"""Tests for dropvar_tf.training (fit_variation_head, train_variation_head)."""

import json
import os
import sys
import tempfile
from unittest import mock

import numpy as np

from dropvar_tf import heads
from dropvar_tf import layers as layers_lib
from dropvar_tf import metrics
from dropvar_tf import targets
from dropvar_tf import training
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testing_models as tm

_PREFIX = "Invalid value received for argument "
_ERR_LENGTH = (_PREFIX + "`targets`. Expected shape (40,) (one target per "
               "example of `x`). Received: targets='array of shape (39,)'")
_ERR_SHAPE = (_PREFIX + "`targets`. Expected shape (40,) (one target per "
              "example of `x`). Received: targets='array of shape (40, 2)'")
_ERR_PER_CLASS_SHAPE = (
    _PREFIX + "`targets`. Expected shape (40, 3) (one target per example of "
    "`x`). Received: targets='array of shape (40,)'")
_ERR_NAN = (_PREFIX + "`targets`. Expected finite values (no NaN or Inf). "
            "Received: targets='array with 1 non-finite values'")
_ERR_INF = (_PREFIX + "`targets`. Expected finite values (no NaN or Inf). "
            "Received: targets='array with 2 non-finite values'")
_ERR_NEGATIVE = (_PREFIX + "`targets`. Expected non-negative standard "
                 "deviations. Received: targets='array with minimum -0.5'")
_ERR_TARGETS_NONE = (_PREFIX + "`targets`. Expected an array of MC-dropout "
                     "DPV targets. Received: targets=None")
_ERR_SPLIT_RANGE = (_PREFIX + "`validation_split`. Expected a float in "
                    "[0, 1). Received: validation_split={}")
_ERR_SPLIT_EMPTY = (_PREFIX + "`validation_split`. Expected a fraction "
                    "holding out at least 1 of the 40 calibration inputs for "
                    "validation (or 0: no validation; more calibration "
                    "inputs are better). Received: validation_split=0.01")
_ERR_SPLITS_TOO_BIG = (
    _PREFIX + "`report_split`. Expected fractions leaving calibration inputs "
    "to train on: of 40, validation_split=0.1 holds out 4 and "
    "report_split=0.95 38. Received: report_split=0.95")
_ERR_EPOCHS = (_PREFIX + "`epochs`. Expected an integer >= 1. Received: "
               "epochs=0")
_ERR_NO_HEAD = (_PREFIX + "`dual`. Expected a dual model made by "
                "`add_variation_head`. Received: dual=\"model 'regression' "
                "without a variation head\"")
_ERR_X_LENGTHS = (_PREFIX + "`x`. Expected arrays of one common length. "
                  "Received: x={'user_id': 40, 'movie_id': 39}")
_ERR_NUM_PERTURBED = (_PREFIX + "`num_perturbed`. Expected an integer >= 0. "
                      "Received: num_perturbed=-1")

_ERR_X_NON_FINITE = (_PREFIX + "`x`. Expected finite values (no NaN or "
                     "Inf). Received: x='2 of 40 rows with NaN or Inf "
                     "values'")
_ERR_X_EMPTY = (_PREFIX + "`x`. Expected at least one example. Received: "
                "x='float32 array of shape (0, 6)'")
_ERR_X_WIDTH = (_PREFIX + "`x`. Expected input matching the model's input "
                "spec (features: float32, shape (None, 6)). Received: "
                "x='float32 array of shape (40, 5)'")
_ERR_NUM_SAMPLES = (_PREFIX + "`num_samples`. Expected an integer >= 2. "
                    "Received: num_samples=-5")

_ERR_ALL_ZERO = (
    _PREFIX + "`targets`. Expected some positive DPV (all are 0; likely "
    "causes: dropout was not sampled (rate 0, or targets of another model), "
    "or the predictions are saturated on these inputs, e.g. probabilities of "
    "exactly 0 or 1 on inputs far from the training data). Received: "
    "targets='array of 40 zeros'")
_LOG_NO_REPORT = ("No fit report: report_split=0.02 of 40 calibration "
                  "inputs holds out 1; a report needs at least 2.")
_WARN_FAR_BELOW = ("The variation head fits its held-out calibration inputs "
                   "far below what targets of this noise allow: ")

_SMALL_HEAD = dict(hidden_units=(8,))
_N = 40

# Fidelity of a fitted head on held-out examples of the tiny regression model
# (1,500 fitting inputs, T=30, head 32x32, 30 epochs). Measured Spearman
# against held-out MC targets: 0.861, 0.865, 0.862, 0.888 for model seeds
# 0..3 (a second MC run of T=30 agrees with the first at about 0.81), so the
# threshold leaves a margin of > 0.1.
_MIN_SPEARMAN = 0.75


def _targets(n=_N, seed=0, shape=None):
  return np.abs(np.random.default_rng(seed).normal(
      0.1, 0.05, (n,) if shape is None else shape))


def _softmax_calibration(n=300, num_samples=30, seed=2):
  """The softmax MLP, n inputs and their MC targets (float64)."""
  model = tm.mlp_softmax()
  x = tm.sample_inputs("softmax", n)
  t = np.asarray(targets.mc_dropout_targets(model, x, num_samples=num_samples,
                                            seed=seed), "float64")
  return model, x, t


def _eager(model, x):
  return tf.nest.map_structure(np.asarray, model(x, training=False))


def _head_weights(dual):
  return [np.array(v.numpy()) for v in heads.variation_head(dual).weights]


class FitErrorsTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = tm.regression()
    cls.dual = heads.add_variation_head(cls.model, **_SMALL_HEAD)
    cls.x = tm.sample_inputs("regression", _N)

  def _assert_error(self, message, *args, **kwargs):
    with self.assertRaises(ValueError) as cm:
      training.fit_variation_head(*args, **kwargs)
    self.assertEqual(str(cm.exception), message)

  def test_targets_errors(self):
    t = _targets()
    nan, inf, negative = t.copy(), t.copy(), t.copy()
    nan[3] = np.nan
    inf[[0, 5]] = [np.inf, -np.inf]
    negative[7] = -0.5
    cases = [
        ("length", _ERR_LENGTH, t[:-1]),
        ("shape", _ERR_SHAPE, np.stack([t, t], axis=1)),
        ("nan", _ERR_NAN, nan),
        ("inf", _ERR_INF, inf),
        ("negative", _ERR_NEGATIVE, negative),
        ("none", _ERR_TARGETS_NONE, None),
    ]
    for label, message, bad in cases:
      with self.subTest(label):
        self._assert_error(message, self.dual, self.x, bad, epochs=1)

  def test_validation_split_errors(self):
    for split in (1.0, -0.1):
      with self.subTest(split=split):
        self._assert_error(_ERR_SPLIT_RANGE.format(split), self.dual, self.x,
                           _targets(), validation_split=split, epochs=1)
    # 1% of 40 examples rounds to none held out.
    self._assert_error(_ERR_SPLIT_EMPTY, self.dual, self.x, _targets(),
                       validation_split=0.01, epochs=1)

  def test_other_argument_errors(self):
    self._assert_error(_ERR_EPOCHS, self.dual, self.x, _targets(), epochs=0)
    for kwargs, message in [
        (dict(learning_rate=0), "`learning_rate`. Expected a number > 0. "
         "Received: learning_rate=0"),
        (dict(learning_rate=-1.0), "`learning_rate`. Expected a number > 0. "
         "Received: learning_rate=-1.0"),
        (dict(learning_rate=float("nan")), "`learning_rate`. Expected a "
         "number > 0. Received: learning_rate=nan"),
        (dict(patience=-1), "`patience`. Expected an integer >= 0. "
         "Received: patience=-1"),
        (dict(seed=-1), "`seed`. Expected an integer >= 0. Received: "
         "seed=-1")]:
      with self.subTest(**kwargs):
        self._assert_error(_PREFIX + message, self.dual, self.x, _targets(),
                           epochs=1, **kwargs)
    # A dict of targets is for a multi-output dual.
    self._assert_error(
        _PREFIX + "`targets`. Expected an array of MC-dropout DPV targets (a "
        "dict is for a dual of a model with several outputs). Received: "
        "targets=\"a dict with keys ['out']\"", self.dual, self.x,
        {"out": _targets()}, epochs=1)
    self._assert_error(_ERR_NO_HEAD, self.model, self.x, _targets(), epochs=1)

  def test_bad_inputs(self):
    bad = self.x.copy()
    bad[3, 0] = np.nan
    bad[9] = -np.inf
    before = _head_weights(self.dual)
    for label, message, x, kwargs in [
        ("nan", _ERR_X_NON_FINITE, bad, {}),
        ("nan dataset", _ERR_X_NON_FINITE,
         tf.data.Dataset.from_tensor_slices(bad).batch(16), {}),
        ("empty", _ERR_X_EMPTY, self.x[:0], {}),
        ("width", _ERR_X_WIDTH, self.x[:, :5], {}),
        ("num_samples", _ERR_NUM_SAMPLES, self.x, dict(num_samples=-5)),
    ]:
      with self.subTest(label):
        self._assert_error(message, self.dual, x, _targets(), epochs=1,
                           **kwargs)
    for a, b in zip(before, _head_weights(self.dual)):
      self.assertAllEqual(a, b)

  def test_all_zero_targets_are_refused_with_the_likely_cause(self):
    self._assert_error(_ERR_ALL_ZERO, self.dual, self.x, np.zeros(_N),
                       epochs=1)

  def test_report_split_errors(self):
    self._assert_error(_ERR_SPLIT_RANGE.replace("validation_split",
                                                "report_split").format(1.0),
                       self.dual, self.x, _targets(), report_split=1.0,
                       epochs=1)
    # The split that holds out more is named.
    self._assert_error(_ERR_SPLITS_TOO_BIG, self.dual, self.x, _targets(),
                       report_split=0.95, epochs=1)

  def test_dict_inputs_of_different_lengths(self):
    dual = heads.add_variation_head(tm.recommender(), **_SMALL_HEAD)
    x = tm.sample_inputs("recommender", _N)
    x["movie_id"] = x["movie_id"][:-1]
    self._assert_error(_ERR_X_LENGTHS, dual, x, _targets(), epochs=1)

  def test_dataset_with_wrong_number_of_targets(self):
    ds = tf.data.Dataset.from_tensor_slices(self.x).batch(16)
    self._assert_error(_ERR_LENGTH, self.dual, ds, _targets()[:-1], epochs=1)

  def test_per_class_targets_need_per_class_shape(self):
    dual = heads.add_variation_head(tm.mlp_softmax(), statistic="per_class_std",
                                    **_SMALL_HEAD)
    self._assert_error(_ERR_PER_CLASS_SHAPE, dual,
                       tm.sample_inputs("softmax", _N), _targets(), epochs=1)

  def test_refused_fit_leaves_head_unchanged(self):
    before = _head_weights(self.dual)
    t = _targets()
    t[0] = np.nan
    with self.assertRaises(ValueError):
      training.fit_variation_head(self.dual, self.x, t, epochs=1)
    for a, b in zip(before, _head_weights(self.dual)):
      self.assertAllEqual(a, b)


class FitTest(tf.test.TestCase):

  def test_same_seed_same_head_other_seed_differs(self):
    model = tm.regression()
    x = tm.sample_inputs("regression", 64)
    t = _targets(64)
    outs = []
    for seed in (0, 0, 1):
      dual = heads.add_variation_head(model, **_SMALL_HEAD)
      training.fit_variation_head(dual, x, t, epochs=3, batch_size=16,
                                  seed=seed)
      outs.append((_head_weights(dual), _eager(dual, x)["variation"]))
    for a, b in zip(outs[0][0], outs[1][0]):
      self.assertAllEqual(a, b)
    self.assertAllEqual(outs[0][1], outs[1][1])
    self.assertNotAllClose(outs[0][1], outs[2][1])

  def test_refit_starts_afresh(self):
    model = tm.regression()
    x = tm.sample_inputs("regression", 48)
    fresh = heads.add_variation_head(model, **_SMALL_HEAD)
    training.fit_variation_head(fresh, x, _targets(48), epochs=2, seed=3)
    refitted = heads.add_variation_head(model, **_SMALL_HEAD)
    training.fit_variation_head(refitted, x, _targets(48, seed=9), epochs=2,
                                seed=0)
    training.fit_variation_head(refitted, x, _targets(48), epochs=2, seed=3)
    for a, b in zip(_head_weights(fresh), _head_weights(refitted)):
      self.assertAllEqual(a, b)

  def test_refit_with_head_dropout_is_identical(self):
    # The head's Dropout draws new masks every step: a refit with the same
    # seed must restart its mask stream, not continue it.
    model = tm.regression()
    x = tm.sample_inputs("regression", 48)
    dual = heads.add_variation_head(model, head_dropout=0.3, **_SMALL_HEAD)
    runs = []
    for seed in (3, 3, 4):
      training.fit_variation_head(dual, x, _targets(48), epochs=2,
                                  batch_size=16, seed=seed)
      runs.append(_head_weights(dual))
    for a, b in zip(runs[0], runs[1]):
      self.assertAllEqual(a, b)
    self.assertFalse(all(np.array_equal(a, b)
                         for a, b in zip(runs[0], runs[2])))

  def test_fit_a_dual_loaded_from_keras_file(self):
    model = tm.binary_bn()
    x = tm.sample_inputs("binary_bn", 48)
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    path = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()),
                        "dual.keras")
    dual.save(path)
    loaded = keras.saving.load_model(path)
    training.fit_variation_head(loaded, x, _targets(48), epochs=2, seed=1,
                                num_samples=3)
    training.fit_variation_head(dual, x, _targets(48), epochs=2, seed=1,
                                num_samples=3)
    self.assertAllClose(_eager(loaded, x)["variation"],
                        _eager(dual, x)["variation"], rtol=1e-5, atol=1e-7)
    self.assertEqual(heads.variation_head_metadata(loaded)["num_samples"], 3)

  def test_metadata_records_fit(self):
    dual = heads.add_variation_head(tm.regression(), **_SMALL_HEAD)
    history = training.fit_variation_head(
        dual, tm.sample_inputs("regression", 50), _targets(50), epochs=2,
        validation_split=0.2, seed=5, num_samples=17)
    meta = heads.variation_head_metadata(dual)
    self.assertEqual(meta["num_samples"], 17)
    self.assertEqual(meta["seed"], 5)
    # 50 examples: 10 validation, 5 for the fit report, 35 to train on.
    self.assertEqual(meta["num_train_examples"], 35)
    out_layer = heads.variation_output_layer(dual)
    self.assertEqual(meta["output_scale"], float(out_layer.scale.numpy()))
    self.assertEqual(meta["output_eps"], float(out_layer.eps.numpy()))
    self.assertGreater(meta["output_eps"], 0.0)
    self.assertIn("val_loss", history.history)

  def test_no_validation_split_and_no_calibration(self):
    dual = heads.add_variation_head(tm.regression(), **_SMALL_HEAD)
    history = training.fit_variation_head(
        dual, tm.sample_inputs("regression", 30), _targets(30), epochs=2,
        validation_split=0.0, calibrate=False)
    self.assertEqual(len(history.history["loss"]), 2)
    self.assertNotIn("val_loss", history.history)
    self.assertEqual(heads.variation_head_metadata(dual)["num_train_examples"],
                     27)
    self.assertEqual(float(heads.variation_output_layer(dual).scale.numpy()),
                     1.0)

  def test_calibrated_scale_is_least_squares_on_held_out(self):
    model = tm.regression()
    x = tm.sample_inputs("regression", 120)
    t = targets.mc_dropout_targets(model, x, num_samples=8, seed=0,
                                   progress=False)
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    training.fit_variation_head(dual, x, t, epochs=3, validation_split=0.25,
                                seed=2)
    # The split fit_variation_head documents: a permutation drawn by `seed`,
    # its first round(n * split) indices held out.
    val_idx = np.random.default_rng(2).permutation(120)[:30]
    v = _eager(dual, tm.take(x, val_idx))["variation"].astype("float64")
    self.assertTrue(np.all(v > 0))
    # No served estimate is capped: the scale alone maps e to v.
    cap = float(heads.variation_output_layer(dual).max_value.numpy())
    self.assertTrue(np.all(v < cap))
    # A least-squares scale s of estimates e = v / s solves the normal
    # equation sum(e * (s * e - t)) = 0, i.e. sum(v * (v - t)) = 0.
    self.assertAllClose(np.sum(v * (v - t[val_idx])), 0.0,
                        atol=1e-5 * np.sum(v * v))

  def test_targets_with_trailing_unit_axis_accepted(self):
    dual = heads.add_variation_head(tm.regression(), **_SMALL_HEAD)
    training.fit_variation_head(dual, tm.sample_inputs("regression", _N),
                                _targets()[:, None], epochs=1)
    self.assertEqual(heads.variation_head_metadata(dual)["num_train_examples"],
                     32)

  def test_dict_inputs(self):
    model = tm.recommender()
    x = tm.sample_inputs("recommender", 64)
    t = targets.mc_dropout_targets(model, x, num_samples=8, seed=0,
                                   progress=False)
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    training.fit_variation_head(dual, x, t, epochs=2, num_samples=8)
    out = _eager(dual, x)
    self.assertEqual(out["variation"].shape, (64,))
    self.assertTrue(np.all(np.isfinite(out["variation"])))
    self.assertAllEqual(out["prediction"], _eager(model, x))
    self.assertEqual(heads.variation_head_metadata(dual)["num_samples"], 8)

  def test_dataset_gives_the_same_head_as_arrays(self):
    model = tm.regression()
    x = tm.sample_inputs("regression", 48)
    t = _targets(48)
    fitted = []
    for data in (x, tf.data.Dataset.from_tensor_slices(x).batch(7)):
      dual = heads.add_variation_head(model, **_SMALL_HEAD)
      training.fit_variation_head(dual, data, t, epochs=2, seed=1)
      fitted.append(_eager(dual, x)["variation"])
    self.assertAllClose(fitted[0], fitted[1], rtol=1e-5, atol=1e-7)

  def test_per_class_targets(self):
    model = tm.mlp_softmax()
    x = tm.sample_inputs("softmax", 48)
    t = targets.mc_dropout_targets(model, x, num_samples=6, seed=0,
                                   statistic="per_class_std", progress=False)
    dual = heads.add_variation_head(model, statistic="per_class_std",
                                    **_SMALL_HEAD)
    training.fit_variation_head(dual, x, t, epochs=2)
    variation = _eager(dual, x)["variation"]
    self.assertEqual(variation.shape, (48, tm.NUM_CLASSES))
    self.assertTrue(np.all(variation >= 0))

  def test_head_features(self):
    dual = heads.add_variation_head(tm.mlp_softmax(), features="neurons",
                                    **_SMALL_HEAD)
    x = tm.sample_inputs("softmax", 10)
    feats = training.head_features(dual, x, batch_size=4)
    # Probes of dense_a (16) and dense_b (12), then the prediction's
    # features: max probability and sum(p log p).
    self.assertEqual([f.shape for f in feats][:3],
                     [(10, 16), (10, 12), (10, 2)])
    self.assertTrue(all(f.dtype == np.float32 for f in feats))
    hidden = keras.Model(dual.input, dual.get_layer("dense_a").output)
    self.assertAllClose(feats[0], _eager(hidden, x), atol=1e-6)

  def test_fitted_head_tracks_held_out_mc_targets(self):
    model = tm.regression(seed=0)
    x = tm.sample_inputs("regression", 1800, seed=0)
    x_fit, x_test = x[:1500], x[1500:]
    t_fit = targets.mc_dropout_targets(model, x_fit, num_samples=30, seed=0,
                                       progress=False)
    t_test = targets.mc_dropout_targets(model, x_test, num_samples=30,
                                        seed=1, progress=False)
    dual = heads.add_variation_head(model, hidden_units=(32, 32), seed=0)
    training.fit_variation_head(dual, x_fit, t_fit, epochs=30, seed=0,
                                num_samples=30)
    scores = metrics.fidelity(_eager(dual, x_test)["variation"], t_test)
    self.assertGreater(scores["spearman"], _MIN_SPEARMAN)
    self.assertGreater(scores["r2"], 0.0)


class TrainVariationHeadTest(tf.test.TestCase):

  def test_train_on_perturbed_inputs(self):
    model = tm.binary_bn()
    x = tm.sample_inputs("binary_bn", 40)
    weights = tm.weights_snapshot(model)
    dual = training.train_variation_head(
        model, x, num_samples=5, num_perturbed=120, epochs=2,
        hidden_units=(8,), layers="last")
    meta = heads.variation_head_metadata(dual)
    self.assertEqual(meta["num_samples"], 5)
    self.assertEqual(meta["layers"], ["dense_b"])
    # 10% of the 120 perturbed inputs held out for validation, 10% for the
    # fit report.
    self.assertEqual(meta["num_train_examples"], 96)
    self.assertEqual(meta["fit_report"]["num_examples"], 12)
    self.assertEqual(meta["fit_report"]["noise_bound"]["num_samples"], 5)
    for path, value in tm.weights_snapshot(model).items():
      self.assertAllEqual(value, weights[path], msg=path)
    self.assertAllEqual(_eager(dual, x)["prediction"], _eager(model, x))

  def test_num_perturbed_zero_fits_on_x(self):
    dual = training.train_variation_head(
        tm.regression(), tm.sample_inputs("regression", 30), num_samples=4,
        num_perturbed=0, epochs=1, hidden_units=(8,))
    self.assertEqual(heads.variation_head_metadata(dual)["num_train_examples"],
                     24)

  def test_negative_num_perturbed_raises(self):
    with self.assertRaises(ValueError) as cm:
      training.train_variation_head(tm.regression(),
                                    tm.sample_inputs("regression", 10),
                                    num_perturbed=-1)
    self.assertEqual(str(cm.exception), _ERR_NUM_PERTURBED)


class FitReportTest(tf.test.TestCase):

  def test_report_is_stored_and_measured_on_held_out_inputs(self):
    model = tm.regression()
    x = tm.sample_inputs("regression", 200)
    t = targets.mc_dropout_targets(model, x, num_samples=8)
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    training.fit_variation_head(dual, x, t, epochs=3, seed=4, num_samples=8)
    report = heads.variation_head_metadata(dual)["fit_report"]
    # The report's part is the last 10% of the seeded permutation.
    held_out = np.random.default_rng(4).permutation(200)[180:]
    estimate = _eager(dual, tm.take(x, held_out))["variation"]
    expected = metrics.fit_report(estimate, t[held_out], num_samples=8)
    self.assertEqual(report["num_examples"], 20)
    for key in ("spearman", "r2", "mean_ratio"):
      self.assertAllClose(report[key], expected[key], rtol=1e-4)
    self.assertEqual(report["noise_bound"], expected["noise_bound"])

  def test_a_head_far_below_the_bound_warns(self):
    dual = heads.add_variation_head(tm.regression(), **_SMALL_HEAD)
    x = tm.sample_inputs("regression", _N)
    # Targets unrelated to the inputs: no head can fit held-out ones.
    with self.assertWarnsRegex(UserWarning, _WARN_FAR_BELOW):
      training.fit_variation_head(dual, x, _targets(), epochs=1,
                                  num_samples=1000)
    self.assertNotEmpty(heads.variation_head_metadata(dual)["fit_report"][
        "far_below_bound"])

  def test_too_few_inputs_for_a_report_fit_without_one(self):
    # The default report_split=0.1 of 12 inputs holds out 1.
    dual = heads.add_variation_head(tm.regression(), **_SMALL_HEAD)
    with self.assertLogs("dropvar_tf.training", "WARNING") as logs:
      training.fit_variation_head(dual, tm.sample_inputs("regression", 12),
                                  _targets(12), epochs=1)
    self.assertIn("No fit report: report_split=0.1 of 12 calibration inputs "
                  "holds out 1; a report needs at least 2.", logs.output[0])
    meta = heads.variation_head_metadata(dual)
    self.assertIsNone(meta["fit_report"])
    self.assertEqual(meta["num_train_examples"], 11)
    with self.assertLogs("dropvar_tf.training", "WARNING") as logs:
      training.fit_variation_head(dual, tm.sample_inputs("regression", _N),
                                  _targets(), epochs=1, report_split=0.02)
    self.assertIn(_LOG_NO_REPORT, logs.output[0])

  def test_cap_comes_from_the_training_rows_only(self):
    dual = heads.add_variation_head(tm.regression(), **_SMALL_HEAD)
    t = _targets()
    # The split fit_variation_head documents: validation rows first, the
    # report's last, in a permutation drawn by `seed`.
    order = np.random.default_rng(0).permutation(_N)
    train_idx, report_idx = order[4:36], order[36:]
    t[report_idx[0]] = 100.0
    training.fit_variation_head(dual, tm.sample_inputs("regression", _N), t,
                                epochs=1)
    cap = float(heads.variation_output_layer(dual).max_value.numpy())
    self.assertAllClose(cap, 1.5 * t[train_idx].max() + 1e-12, rtol=1e-6)

  def test_cap_of_a_smoothed_prior_is_the_largest_probability_std(self):
    # A softmax model's smoothed prior is the std of a probability: its cap
    # is 0.5, the largest such std, not a multiple of the calibration
    # targets, which far off them it would clip.
    model = tm.mlp_softmax()
    x = tm.sample_inputs("softmax", 60)
    t = np.asarray(targets.mc_dropout_targets(model, x, num_samples=10,
                                              seed=0), "float64")
    self.assertLess(1.5 * t.max(), 0.5)
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    training.fit_variation_head(dual, x, t, epochs=1, num_samples=10)
    self.assertAllClose(
        float(heads.variation_output_layer(dual).max_value.numpy()), 0.5)
    dual = heads.add_variation_head(model, prior=None, **_SMALL_HEAD)
    training.fit_variation_head(dual, x, t, epochs=1, num_samples=10)
    self.assertLess(
        float(heads.variation_output_layer(dual).max_value.numpy()), 0.5)

  def test_no_report_with_report_split_zero(self):
    dual = heads.add_variation_head(tm.regression(), **_SMALL_HEAD)
    training.fit_variation_head(dual, tm.sample_inputs("regression", _N),
                                _targets(), epochs=1, report_split=0.0)
    meta = heads.variation_head_metadata(dual)
    self.assertIsNone(meta["fit_report"])
    self.assertEqual(meta["num_train_examples"], 36)


class PriorTest(tf.test.TestCase):

  def test_correction_bounds_are_the_needed_range(self):
    model = tm.mlp_softmax()
    x = tm.sample_inputs("softmax", 200)
    t = targets.mc_dropout_targets(model, x, num_samples=8)
    dual = heads.add_variation_head(model, prior="moments", **_SMALL_HEAD)
    training.fit_variation_head(dual, x, t, epochs=2, seed=1, num_samples=8)
    output = heads.variation_output_layer(dual)
    low, high = heads.variation_head_metadata(dual)["prior_correction"]
    self.assertEqual(low, float(output.correction_low.numpy()))
    self.assertEqual(high, float(output.correction_high.numpy()))
    self.assertLessEqual(high, output.prior_bound)
    self.assertGreaterEqual(low, -output.prior_bound)
    # However far off the inputs, the estimate stays within the bounds of
    # the prior (times the calibrated scale).
    far = 1e3 * x[:20]
    feats = training.head_features(dual, far)
    # The head's last inputs: the prior, then the out-of-range signal its
    # correction shrinks with.
    self.assertTrue(output.shrink)
    prior = feats[-2][:, 0].astype("float64")
    eps = float(output.eps.numpy())
    scale = float(output.scale.numpy())
    v = _eager(dual, far)["variation"].astype("float64")
    ceiling = scale * (prior + eps) * np.exp(high)
    floor = scale * np.maximum((prior + eps) * np.exp(low) - eps,
                               output.MIN_SHARE * (prior + eps) * np.exp(low))
    self.assertTrue(np.all(v <= ceiling * (1 + 1e-5)), (v, ceiling))
    self.assertTrue(np.all(v >= floor * (1 - 1e-5)), (v, floor))
    self.assertTrue(np.all(v > 0))


  def test_prior_explained_share(self):
    rng = np.random.default_rng(0)
    t = rng.lognormal(-3.0, 1.0, 500)
    eps = 1e-3
    # A prior equal to the targets leaves nothing to learn; one
    # proportional to them leaves only a constant.
    self.assertAllClose(training._prior_explained(t, t, eps), 1.0)
    self.assertAllClose(training._prior_explained(t, 3.0 * t + 2 * eps, eps),
                        1.0)
    # A constant prior neither aligns nor scatters; an unrelated one
    # scatters (its own log variance adds to the targets').
    self.assertAllClose(training._prior_explained(t, np.full(500, 0.1), eps),
                        0.0, atol=1e-12)
    unrelated = rng.lognormal(-3.0, 1.0, 500)
    self.assertLess(training._prior_explained(t, unrelated, eps), -0.5)
    # Several units: the least explained one counts.
    both = np.stack([t, t], axis=1)
    self.assertAllClose(training._prior_explained(
        both, np.stack([t, unrelated], axis=1), eps),
        training._prior_explained(t, unrelated, eps))

  def test_a_prior_that_explains_nothing_is_silenced(self):
    # Targets that fall as a head input rises, the input whose log the
    # prior follows least: the delta prior ranks them backwards. The fit
    # silences it (0 for every input), the head learns the whole log DPV
    # from its inputs, and the correction window is the needed range, not
    # capped at the prior's bound.
    model, x, t = _softmax_calibration()
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    training.fit_variation_head(dual, x, t, epochs=2, seed=1, num_samples=30)
    meta = heads.variation_head_metadata(dual)
    self.assertFalse(meta["prior_silenced"])
    self.assertGreater(meta["prior_explained"], 0.0)
    fitted = _eager(dual, x)["variation"]
    feats = training.head_features(dual, x)
    prior = feats[-2].ravel().astype("float64")
    log_prior = np.log(prior + 1e-4)
    inputs = np.concatenate([f.reshape(len(f), -1) for f in feats[:-2]],
                            axis=1).astype("float64")
    inputs = inputs[:, inputs.std(axis=0) > 0]
    column = inputs[:, np.argmin([abs(np.corrcoef(c, log_prior)[0, 1])
                                  for c in inputs.T])]
    anti = 1e-3 * np.exp(-3.0 * (column - column.mean()) / column.std())
    weights = {id(v): np.array(v.numpy()) for v in dual.weights}
    training.fit_variation_head(dual, x, anti, epochs=40, seed=0,
                                num_samples=30)
    meta = heads.variation_head_metadata(dual)
    self.assertTrue(meta["prior_silenced"])
    self.assertLess(meta["prior_explained"], 0.0)
    # Only the head's and the prior's weights changed, not the base's.
    changed = {id(v) for v in dual.weights
               if not np.array_equal(weights[id(v)], v.numpy())}
    self.assertFalse(changed & {id(v) for v in model.weights})
    self.assertIn(id(heads.prior_layer(dual).kernel), changed)
    output = heads.variation_output_layer(dual)
    feats = training.head_features(dual, x)
    self.assertAllEqual(feats[-2], np.zeros_like(feats[-2]))
    low, high = meta["prior_correction"]
    eps = float(output.eps.numpy())
    # With a prior of 0 the correction is log(t + eps) - log(eps).
    needed = np.log(anti + eps) - np.log(eps)
    self.assertGreater(high, output.prior_bound)
    self.assertBetween(high, np.quantile(needed, 0.9), needed.max())
    v = _eager(dual, x)["variation"]
    self.assertTrue(np.all(np.isfinite(v)) and np.all(v > 0))
    # The head alone ranks the targets it learnt from its inputs; the
    # prior ranked them backwards.
    self.assertLess(metrics.fidelity(prior, anti)["spearman"], -0.2)
    self.assertGreater(metrics.fidelity(v, anti)["spearman"], 0.3)
    # A fit that fails leaves the silenced head as it was: refused (after
    # the prior's kernel is put back), or interrupted in training (after
    # the out-of-range range and its metadata are set).
    silenced_meta = heads.variation_head_metadata(dual)
    with self.assertRaisesRegex(ValueError, "validation_split"):
      training.fit_variation_head(dual, x, t, epochs=2, seed=1,
                                  validation_split=0.001)
    self.assertAllEqual(_eager(dual, x)["variation"], v)
    self.assertEqual(heads.variation_head_metadata(dual), silenced_meta)
    far = heads.out_of_range_layer(dual)
    ranges = far.ranges()
    with mock.patch.object(training, "_train_head",
                           side_effect=KeyboardInterrupt), \
        self.assertRaises(KeyboardInterrupt):
      training.fit_variation_head(dual, tm.take(x, np.arange(100)),
                                  t[:100], epochs=2, seed=3)
    self.assertAllEqual(_eager(dual, x)["variation"], v)
    self.assertAllEqual(far.ranges(), ranges)
    self.assertEqual(heads.variation_head_metadata(dual), silenced_meta)
    json.dumps(output.get_config())  # the metadata still serialises
    # A refit starts from the prior again (the output layer's kernel).
    training.fit_variation_head(dual, x, t, epochs=2, seed=1, num_samples=30)
    self.assertFalse(heads.variation_head_metadata(dual)["prior_silenced"])
    self.assertAllClose(_eager(dual, x)["variation"], fitted, rtol=1e-6)

  def test_scale_is_calibrated_on_capped_estimates(self):
    # Targets far above 0.5 (the cap of a smoothed prior's estimates): many
    # estimates are capped, and the least-squares scale is fitted on the
    # capped estimates.
    model = tm.mlp_softmax()
    x = tm.sample_inputs("softmax", 200)
    t = 40.0 * np.asarray(targets.mc_dropout_targets(
        model, x, num_samples=10, seed=0), "float64")
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    training.fit_variation_head(dual, x, t, epochs=3, seed=2,
                                validation_split=0.25, num_samples=10)
    output = heads.variation_output_layer(dual)
    scale = float(output.scale.numpy())
    val_idx = np.random.default_rng(2).permutation(200)[:50]
    output.scale.assign(1.0)
    e = _eager(dual, tm.take(x, val_idx))["variation"].astype("float64")
    cap = float(output.max_value.numpy())
    self.assertEqual(cap, 0.5)
    self.assertGreater(np.mean(e >= cap), 0.2)
    self.assertAllClose(scale, np.sum(e * t[val_idx]) / np.sum(e * e),
                        rtol=1e-5)

  def test_fit_sets_the_smoothed_delta_noise_scale(self):
    # The default prior of a Dropout -> Dense(softmax) model is the smoothed
    # output delta; its noise scale is the one of `training._NOISE_SCALES`
    # that leaves the head the least to correct, and the prior values the
    # head was fitted on are the dual's own.
    model, x, t = _softmax_calibration()
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    layer = heads.smoothed_prior_layer(dual)
    self.assertEqual(heads.variation_head_metadata(dual)["prior"], "delta")
    training.fit_variation_head(dual, x, t, epochs=2, seed=1,
                                num_samples=30, validation_split=0.0,
                                report_split=0.0)
    fitted = float(layer.noise_scale.numpy())
    self.assertEqual(
        heads.variation_head_metadata(dual)["prior_noise_scale"], fitted)
    eps = float(heads.variation_output_layer(dual).eps.numpy())

    def gap_variance(scale):
      layer.noise_scale.assign(scale)
      prior = training.head_features(dual, x)[-2].astype("float64")[:, 0]
      return np.var(np.log(t + eps) - np.log(prior + eps))

    at_fit = gap_variance(fitted)
    self.assertNotEqual(fitted, 1.0)
    self.assertLess(at_fit, gap_variance(1.0))
    self.assertLessEqual(at_fit, gap_variance(fitted * 1.5) + 1e-9)
    self.assertLessEqual(at_fit, gap_variance(fitted / 1.5) + 1e-9)


  def test_fit_sets_the_earlier_dropout_sensitivities(self):
    # mlp_softmax: dense_a -> drop_a -> dense_b -> drop_b -> probs. The prior
    # sees drop_a through a per-unit sensitivity: sqrt(p / (1 - p)) times the
    # h-weighted root mean square of the predicted class's log-odds gradient
    # with respect to drop_a's input, computed here by hand.
    model = tm.mlp_softmax()
    x = tm.sample_inputs("softmax", 200)
    t = targets.mc_dropout_targets(model, x, num_samples=20, seed=2)
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    layer = heads.smoothed_prior_layer(dual)
    self.assertEqual(layer.earlier_dims, (16,))
    training.fit_variation_head(dual, x, t, epochs=1, seed=1, num_samples=20,
                                validation_split=0.0, report_split=0.0)
    h_a = np.asarray(model.get_layer("dense_a")(x), "float64")
    h_b = np.asarray(model.get_layer("dense_b")(h_a), "float64")
    w_b = model.get_layer("dense_b").kernel.numpy().astype("float64")
    w_out = model.get_layer("probs").kernel.numpy().astype("float64")
    z = h_b @ w_out + model.get_layer("probs").bias.numpy()
    top = np.argmax(z, axis=-1)
    others = np.exp(z - z.max(axis=-1, keepdims=True))
    others[np.arange(len(z)), top] = 0.0
    dz = -others / others.sum(axis=-1, keepdims=True)
    dz[np.arange(len(z)), top] = 1.0           # d log-odds / d z
    g = ((dz @ w_out.T) * (h_b > 0)) @ w_b.T     # d log-odds / d h_a
    want = np.sqrt(np.sum(g ** 2 * h_a ** 2, axis=0) /
                   np.sum(h_a ** 2, axis=0)) * (0.3 / 0.7) ** 0.5
    self.assertAllClose(layer.sensitivities[0].numpy(), want, rtol=1e-4,
                        atol=1e-7)
    self.assertGreater(float(np.min(want)), 0.0)

  def test_smoothing_falls_back_above_the_largest_noise_scale(self):
    model = tm.mlp_softmax()
    x = tm.sample_inputs("softmax", 300)
    t = targets.mc_dropout_targets(model, x, num_samples=30, seed=2)
    h_x = None
    for limit, smoothed in ((100.0, True), (0.01, False)):
      with self.subTest(limit=limit), mock.patch.object(
          training, "MAX_NOISE_SCALE", limit):
        dual = heads.add_variation_head(model, **_SMALL_HEAD)
        training.fit_variation_head(dual, x, t, epochs=2, seed=1,
                                    num_samples=30)
        meta = heads.variation_head_metadata(dual)
        self.assertIs(meta["prior_smoothed"], smoothed)
        layer = heads.smoothed_prior_layer(dual)
        # h, y and the input of the earlier Dropout ("drop_a").
        self.assertEqual(layer.earlier_dims, (16,))
        if h_x is None:
          h_x = [np.asarray(v) for v in keras.Model(
              dual.input, heads.layer_input_tensors(dual, layer))(x[:20])]
        y = np.asarray(model(x[:20]))
        linear = layers_lib.OutputDropoutDelta(
            rate=layer.rate, activation="softmax",
            statistic="predicted_class_std", input_dim=layer.input_dim,
            units=tm.NUM_CLASSES)
        linear.build([(None, layer.input_dim), (None, tm.NUM_CLASSES)])
        linear.kernel.assign(layer.kernel)
        got = np.asarray(layer([h_x[0], y, h_x[2]]))
        last = np.asarray(linear([h_x[0], y])).astype("float64")
        # The linearised delta of both dropouts: the earlier one's logit
        # variance, times the slope p_c (1 - p_c) squared, adds to the last's.
        slope = np.max(y, axis=-1, keepdims=True).astype("float64")
        slope = slope * (1.0 - slope)
        earlier = np.sum(np.square(
            h_x[2] * layer.sensitivities[0].numpy()), axis=-1, keepdims=True)
        self.assertGreater(float(np.max(earlier)), 0.0)
        want = np.sqrt(np.square(last) + np.square(slope) * earlier)
        if smoothed:
          self.assertGreater(np.max(np.abs(got - want)), 1e-4)
        else:
          self.assertAllClose(got, want, rtol=1e-4, atol=1e-7)
        # The prior the head was fitted on is the dual's own.
        feats = training.head_features(dual, x[:20])
        self.assertAllClose(feats[-2][:, 0], got[:, 0], rtol=1e-5,
                            atol=1e-8)


class ExtremeInputsTest(tf.test.TestCase):

  def test_variation_is_finite_and_non_negative_at_extremes(self):
    for kind in ("softmax", "regression", "binary_bn", "cnn"):
      model = tm.build(kind)
      x = tm.sample_inputs(kind, 48)
      dual = heads.add_variation_head(model, **_SMALL_HEAD)
      training.fit_variation_head(
          dual, x, targets.mc_dropout_targets(model, x, num_samples=8),
          epochs=2, num_samples=8)
      for value in (1e19, -1e19, 1e38, -1e38, 3.4e38):
        with self.subTest(kind=kind, value=value):
          variation = np.asarray(dual(np.full_like(x[:3], value))[
              "variation"])
          self.assertTrue(np.all(np.isfinite(variation)), variation)
          self.assertTrue(np.all(variation >= 0), variation)


if __name__ == "__main__":
  tf.test.main()
