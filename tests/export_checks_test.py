"""Tests for dropvar_tf.export_checks (what an export passes to publish)."""

import os
import re
import tempfile
from unittest import mock

import numpy as np
from tensorflow.core.protobuf import saved_model_pb2

from dropvar_tf import contract
from dropvar_tf import export_checks
from dropvar_tf import saved_model
from dropvar_tf._keras import keras, tf

# Expected error messages, stored once.
NOT_LOADED = ("The export does not load the way TF Serving loads it (the "
              "\"serve\" MetaGraph into a tf.compat.v1.Session, warm-up "
              "records replayed): ")
DIFFERS = ("Output 'variation' of signature 'serving_default', run as TF "
           "Serving runs it (a tf.compat.v1.Session), differs from the "
           "in-process model by up to ")


def make_dual(seed=0):
  """A tiny dual model: input "features" (N, 4), softplus variation."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input(shape=(4,), name="features")
  h = keras.layers.Dense(8, activation="relu")(inputs)
  h = keras.layers.Dropout(0.3)(h)
  prediction = keras.layers.Dense(1, name="out")(h)
  variation = keras.layers.Dense(1, activation="softplus", name="var")(
      keras.layers.Concatenate()([h, prediction]))
  return keras.Model(inputs, {contract.PREDICTION_KEY: prediction,
                              contract.VARIATION_KEY: variation})


def make_id_dual():
  """A dual model with dict int64 inputs "user_id" and "movie_id", (N,)."""
  keras.utils.set_random_seed(0)
  user = keras.Input(shape=(), dtype="int64", name="user_id")
  movie = keras.Input(shape=(), dtype="int64", name="movie_id")
  h = keras.layers.Concatenate()([keras.layers.Embedding(20, 4)(user),
                                  keras.layers.Embedding(30, 4)(movie)])
  prediction = keras.layers.Dense(1)(h)
  variation = keras.layers.Dense(1, activation="softplus")(h)
  return keras.Model({"user_id": user, "movie_id": movie},
                     {contract.PREDICTION_KEY: prediction,
                      contract.VARIATION_KEY: variation})


def examples(n, seed=0):
  return np.random.RandomState(seed).randn(n, 4).astype("float32")


def rename_ops(saved_model_dir, old, new):
  """Renames op `old` to `new` in the export's function library."""
  filename = os.path.join(saved_model_dir, "saved_model.pb")
  proto = saved_model_pb2.SavedModel()
  with open(filename, "rb") as f:
    proto.ParseFromString(f.read())
  renamed = 0
  for function in proto.meta_graphs[0].graph_def.library.function:
    for node in function.node_def:
      if node.op == old:
        node.op = new
        renamed += 1
  with open(filename, "wb") as f:
    f.write(proto.SerializeToString())
  return renamed


def rebuild(named):
  return named["features"]


class CheckServingOpsTest(tf.test.TestCase):

  def test_unregistered_op_is_named(self):
    base = tempfile.mkdtemp(dir=self.get_temp_dir())
    path = saved_model.export_saved_model(make_dual(), base)
    self.assertIn("MatMul", export_checks.check_serving_ops(path))
    self.assertGreater(rename_ops(path, "MatMul", "ZzCustomMatMul"), 0)
    with self.assertRaisesRegex(
        ValueError, re.escape("ops not registered in TensorFlow "
                              f"{tf.__version__}: ['ZzCustomMatMul']")):
      export_checks.check_serving_ops(path)


class ExampleInputsTest(tf.test.TestCase):

  def test_one_row_of_each_dtype_with_variable_dims_of_one(self):
    specs = {"x": tf.TensorSpec((None, 3, None), tf.float32),
             "ids": tf.TensorSpec((None,), tf.int64),
             "text": tf.TensorSpec((None, 2), tf.string)}
    arrays = export_checks.example_inputs(specs)
    self.assertEqual(arrays["x"].shape, (1, 3, 1))
    self.assertEqual(arrays["x"].dtype, np.float32)
    self.assertEqual(arrays["ids"].shape, (1,))
    self.assertEqual(arrays["ids"].dtype, np.int64)
    self.assertEqual(arrays["text"].tolist(), [[b"", b""]])


class VerifyServingLoadTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.base = tempfile.mkdtemp(dir=self.get_temp_dir())

  def test_a_good_export_passes_on_warmup_rows_and_on_one_row(self):
    dual = make_dual()
    path = saved_model.export_saved_model(dual, self.base,
                                          warmup_examples=examples(5))
    export_checks.verify_serving_load(path, dual, rebuild,
                                      {"features": examples(7, seed=1)})
    export_checks.verify_serving_load(
        path, dual, rebuild, export_checks.example_inputs(
            {"features": tf.TensorSpec((None, 4), tf.float32)}))

  def test_dict_int_inputs_pass(self):
    dual = make_id_dual()
    ids = {"user_id": np.array([1, 5, 19]), "movie_id": np.array([0, 2, 29])}
    path = saved_model.export_saved_model(dual, self.base,
                                          warmup_examples=ids)
    export_checks.verify_serving_load(
        path, dual, lambda named: {k: named[k] for k in ids}, ids)

  def test_a_graph_that_answers_otherwise_is_refused(self):
    dual = make_dual()
    path = saved_model.export_saved_model(dual, self.base)
    # relu(x) < softplus(x) = log(1 + exp(x)) everywhere: a wrong variation
    # from an op with the same argument names.
    self.assertGreater(rename_ops(path, "Softplus", "Relu"), 0)
    with self.assertRaisesRegex(ValueError, re.escape(DIFFERS)):
      export_checks.verify_serving_load(path, dual, rebuild,
                                        {"features": examples(3)})

  def test_a_folder_that_does_not_load_is_refused(self):
    dual = make_dual()
    path = saved_model.export_saved_model(dual, self.base)
    variables = os.path.join(path, "variables")
    for name in os.listdir(variables):
      if name.startswith("variables.data"):
        with open(os.path.join(variables, name), "wb") as f:
          f.write(b"\x00truncated")
    with self.assertRaisesRegex(ValueError, re.escape(NOT_LOADED)):
      export_checks.verify_serving_load(path, dual, rebuild,
                                        {"features": examples(2)})

  def test_export_whose_session_answers_differ_publishes_nothing(self):
    dual = make_dual()
    real_check = export_checks.check_serving_ops

    def check_then_corrupt(tmp):
      ops = real_check(tmp)
      rename_ops(tmp, "Softplus", "Relu")
      return ops

    with mock.patch.object(export_checks, "check_serving_ops",
                           side_effect=check_then_corrupt):
      with self.assertRaisesRegex(ValueError, re.escape(DIFFERS)):
        saved_model.export_saved_model(dual, self.base,
                                       warmup_examples=examples(4))
    self.assertEqual(os.listdir(self.base), [])

  def test_export_with_a_failing_warmup_record_publishes_nothing(self):
    dual = make_dual()
    real_check = export_checks.check_serving_ops

    def check_then_break_warmup(tmp):
      ops = real_check(tmp)
      with open(os.path.join(tmp, "assets.extra",
                             "tf_serving_warmup_requests"), "wb") as f:
        f.write(b"not a TFRecord")
      return ops

    with mock.patch.object(export_checks, "check_serving_ops",
                           side_effect=check_then_break_warmup):
      with self.assertRaisesRegex(ValueError, re.escape(NOT_LOADED)):
        saved_model.export_saved_model(dual, self.base,
                                       warmup_examples=examples(4))
    self.assertEqual(os.listdir(self.base), [])


if __name__ == "__main__":
  tf.test.main()
