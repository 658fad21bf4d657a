"""Tests for dropvar_tf.inputs.check_inputs: the errors naming `x`."""

import os
import sys

import numpy as np

from dropvar_tf import inputs
from dropvar_tf._keras import tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testing_models as tm

# Expected error messages, stored once.
_PREFIX = "Invalid value received for argument `x`. Expected "
_SPEC = (_PREFIX + "input matching the model's input spec (features: "
         "float32, shape (None, 6)). Received: x='{}'")
_DICT_SPEC = (_PREFIX + "inputs matching the model's input spec (movie_id: "
              "int64, shape (None,); user_id: int64, shape (None,)). "
              "Received: x={}")
_ERR_WIDTH = _SPEC.format("float32 array of shape (12, 5)")
_ERR_RANK = _SPEC.format("float32 array of shape (12,)")
_ERR_STRINGS = _SPEC.format("<U1 array of shape (12, 6)")
_ERR_KEYS = _DICT_SPEC.format("\"a dict with keys ['movie', 'user_id']\"")
_ERR_DICT_DTYPE = _DICT_SPEC.format(
    "'int64 array of shape (12,); <U21 array of shape (12,)'")
_ERR_DATASET = (
    _PREFIX + "input matching the model's input spec (features: float32, "
    "shape (None, 6)) (a Dataset of examples or of batches). Received: "
    "x='a Dataset with element_spec TensorSpec(shape=(None, 5), "
    "dtype=tf.float32, name=None)'")
_ERR_EMPTY = (_PREFIX + "at least one example. Received: x='float32 array "
              "of shape (0, 6)'")
_ERR_EMPTY_DATASET = (_PREFIX + "at least one example. Received: x='an "
                      "empty Dataset'")
_ERR_NON_FINITE = (_PREFIX + "finite values (no NaN or Inf). Received: "
                   "x='3 of 12 rows with NaN or Inf values'")

_ERR_INEXACT = (_PREFIX + "integers up to 2**24 in magnitude for a float32 "
                "input (features): larger ones are rounded. For integer ids, "
                "wrap the model in a Functional model with an integer "
                "`keras.Input`. Received: x='integers up to 16777217'")


def _bad_rows(x):
  x = x.copy()
  x[1, 0] = np.nan
  x[4] = np.inf
  x[7, 5] = -np.inf
  return x


class CheckInputsTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.model = tm.regression()
    self.x = tm.sample_inputs("regression", 12)

  def _assert_error(self, message, x, model=None):
    with self.assertRaises(ValueError) as cm:
      inputs.check_inputs(model or self.model, x)
    self.assertEqual(str(cm.exception), message)

  def test_valid_inputs_give_their_row_count(self):
    ds = tf.data.Dataset.from_tensor_slices(self.x)
    self.assertEqual(inputs.check_inputs(self.model, self.x), 12)
    self.assertEqual(inputs.check_inputs(self.model, ds), 12)
    self.assertEqual(inputs.check_inputs(self.model, ds.batch(5)), 12)
    # Ids are integers: nothing to check for NaN.
    self.assertEqual(inputs.check_inputs(
        tm.recommender(), tm.sample_inputs("recommender", 12)), 12)

  def test_integers_a_float32_input_would_round_are_refused(self):
    ids = np.zeros((12, 6), "int64")
    self.assertEqual(inputs.check_inputs(self.model, ids + 2**24), 12)
    ids[3, 2] = 2**24 + 1  # float32(2**24 + 1) == 2**24
    self._assert_error(_ERR_INEXACT, ids)

  def test_wrong_width_rank_or_dtype(self):
    self._assert_error(_ERR_WIDTH, self.x[:, :5])
    self._assert_error(_ERR_RANK, self.x[:, 0])
    self._assert_error(_ERR_STRINGS, np.full((12, 6), "a"))
    narrow = tf.data.Dataset.from_tensor_slices(self.x[:, :5]).batch(4)
    self._assert_error(_ERR_DATASET, narrow)

  def test_dict_inputs(self):
    model = tm.recommender()
    x = tm.sample_inputs("recommender", 12)
    self._assert_error(_ERR_KEYS, {"user_id": x["user_id"],
                                   "movie": x["movie_id"]}, model)
    x["user_id"] = x["user_id"].astype(str)
    self._assert_error(_ERR_DICT_DTYPE, x, model)

  def test_empty(self):
    self._assert_error(_ERR_EMPTY, self.x[:0])
    self._assert_error(_ERR_EMPTY_DATASET,
                       tf.data.Dataset.from_tensor_slices(self.x[:0]).batch(4))

  def test_non_finite_rows_are_counted(self):
    bad = _bad_rows(self.x)
    self._assert_error(_ERR_NON_FINITE, bad)
    ds = tf.data.Dataset.from_tensor_slices(bad)
    self._assert_error(_ERR_NON_FINITE, ds)
    self._assert_error(_ERR_NON_FINITE, ds.batch(5))

  def test_large_finite_values_are_accepted(self):
    self.assertEqual(inputs.check_inputs(
        self.model, np.full((2, 6), 3e38, "float32")), 2)


if __name__ == "__main__":
  tf.test.main()
