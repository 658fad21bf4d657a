"""Tests for dropvar_tf.study.estimators (the heads and baselines compared)."""

import dataclasses
import os
import sys

import numpy as np

from dropvar_tf._keras import keras
from dropvar_tf._keras import tf
from dropvar_tf.study import config as config_lib
from dropvar_tf.study import estimators
from dropvar_tf.study.data import common

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testing_models as tm

_CONFIG = dataclasses.replace(config_lib.small_config(), head_epochs=2)


def _constant_model(units, activation):
  """A model whose output ignores its input: zero kernel and bias."""
  inputs = keras.Input((4,))
  out = keras.layers.Dense(units, activation=activation,
                           kernel_initializer="zeros")(inputs)
  return keras.Model(inputs, out)


class HeadSpecsTest(tf.test.TestCase):

  def test_recommended_only_without_sweep(self):
    self.assertEqual(estimators.head_specs(tm.mlp_softmax(), sweep=False),
                     [(estimators.RECOMMENDED, {})])

  def test_sweep_names(self):
    names = [n for n, _ in estimators.head_specs(tm.mlp_softmax(), True)]
    self.assertEqual(names, [
        estimators.RECOMMENDED, estimators.ALL_LAYERS, "head: dense_a",
        "head: dense_b", estimators.SUMMARY, estimators.NEURONS_RECIPE])


class ClosedFormTest(tf.test.TestCase):

  def test_known_values(self):
    x = np.ones((3, 4), "float32")
    self.assertAllClose(estimators.closed_form_estimate(
        common.BINARY, _constant_model(1, "sigmoid"), x), [0.25] * 3)
    self.assertAllClose(estimators.closed_form_estimate(
        common.MULTICLASS, _constant_model(3, "softmax"), x), [2 / 3] * 3)
    self.assertIsNone(estimators.closed_form_estimate(
        common.REGRESSION, _constant_model(1, None), x))


class BaselineTest(tf.test.TestCase):

  def test_prediction_head(self):
    model = tm.mlp_softmax()
    x_fit = tm.sample_inputs("softmax", 80)
    x_test = tm.sample_inputs("softmax", 9, seed=1)
    t_fit = np.random.default_rng(0).gamma(2.0, 0.05, 80)
    est, params = estimators.prediction_head_estimate(model, x_fit, t_fit,
                                                      x_test, _CONFIG)
    self.assertEqual(est.shape, (9,))
    self.assertTrue(np.all(est >= 0.0))
    self.assertGreater(params, 64 * 64)

  def test_input_only_reads_unseen_ids_as_zero(self):
    x_fit = tm.sample_inputs("recommender", 80)
    x_test = {k: v[:5].copy() for k, v in x_fit.items()}
    t_fit = np.random.default_rng(0).gamma(2.0, 0.05, 80)
    unseen = dict(x_test, user_id=np.full(5, 10_000, "int64"))
    zero = dict(x_test, user_id=np.zeros(5, "int64"))
    est_unseen, _ = estimators.input_only_estimate(x_fit, t_fit, unseen,
                                                   _CONFIG)
    est_zero, _ = estimators.input_only_estimate(x_fit, t_fit, zero, _CONFIG)
    self.assertEqual(est_unseen.shape, (5,))
    self.assertAllClose(est_unseen, est_zero)


if __name__ == "__main__":
  tf.test.main()
