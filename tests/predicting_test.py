"""Tests for dropvar_tf.predicting.predict: every input form, one result."""

import os
import sys

import numpy as np

import dropvar_tf as dv
from dropvar_tf import heads
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testing_models as tm

VOCAB = ["red", "green", "blue", "cyan", "plum"]
N = 11

# Expected error messages, stored once.
_ERR_MODEL = ("Invalid value received for argument `model`. Expected a built "
              "Functional or Sequential `keras.Model`. Received: model=None")
_ERR_BATCH = ("Invalid value received for argument `batch_size`. Expected an "
              "integer >= 1. Received: batch_size=0")
_ERR_X = ("Invalid value received for argument `x`. Expected input matching "
          "the model's input spec (color: string, shape (None,)). Received: "
          "x='float32 array of shape (3,)'")


def _string_model():
  """A scalar string input (StringLookup) with dropout, softmax over 3."""
  keras.utils.set_random_seed(0)
  color = keras.Input((), dtype="string", name="color")
  h = keras.layers.StringLookup(vocabulary=VOCAB, output_mode="one_hot")(color)
  h = keras.layers.Dense(8, activation="relu")(h)
  h = keras.layers.Dropout(0.3)(h)
  return keras.Model(color, keras.layers.Dense(3, activation="softmax")(h),
                     name="colors")


def _colors(n=N):
  return np.random.default_rng(0).choice(VOCAB, size=n)


def _string_forms(colors):
  """The same strings as numpy `<U`, `S`, object of str and of bytes."""
  return {"unicode": colors, "bytes": colors.astype("S"),
          "object_str": colors.astype(object),
          "object_bytes": colors.astype("S").astype(object)}


class PredictTest(tf.test.TestCase):

  def test_numpy_strings_give_the_tensor_results(self):
    base = _string_model()
    dual = heads.add_variation_head(base, seed=0)
    colors = _colors()
    for model in (base, dual):
      want = model.predict(tf.constant(colors), batch_size=4, verbose=0)
      for name, x in _string_forms(colors).items():
        with self.subTest(model=model.name, form=name):
          got = dv.predict(model, x, batch_size=4)
          for w, g in zip(tf.nest.flatten(want), tf.nest.flatten(got)):
            self.assertEqual(g.dtype, w.dtype)
            self.assertEqual(g.tobytes(), w.tobytes())

  def test_keras_refuses_the_numpy_strings_it_reads(self):
    # Why `predict` exists: Keras' own refuses `<U` and `S` arrays.
    base = _string_model()
    for dtype in ("U", "S"):
      with self.subTest(dtype=dtype):
        with self.assertRaisesRegex(ValueError, "Invalid dtype"):
          base.predict(_colors().astype(dtype), verbose=0)

  def test_dual_keys_and_row_order(self):
    dual = heads.add_variation_head(_string_model(), seed=0)
    colors = _colors()
    out = dv.predict(dual, colors, batch_size=3)
    self.assertEqual(sorted(out), ["prediction", "variation"])
    self.assertAllEqual(out["prediction"].shape, (N, 3))
    self.assertAllEqual(out["variation"].shape, (N,))
    direct = dual(tf.constant(colors))
    self.assertAllClose(out["prediction"], direct["prediction"], atol=1e-6)
    self.assertAllClose(out["variation"], np.reshape(direct["variation"], -1),
                        atol=1e-6)

  def test_datasets_dicts_and_ragged_match_keras(self):
    colors = _colors()
    model = _string_model()
    want = model.predict(tf.constant(colors), verbose=0)
    pairs = tf.data.Dataset.from_tensor_slices((colors, np.zeros(N)))
    for name, x in (("dict", {"color": colors}), ("list", [colors]),
                    ("examples", tf.data.Dataset.from_tensor_slices(colors)),
                    ("labelled_batches", pairs.batch(4))):
      with self.subTest(form=name):
        self.assertAllClose(dv.predict(model, x, batch_size=5), want,
                            atol=1e-6)
    ids = keras.Input((None,), dtype="int64", ragged=True, name="ids")
    pooled = keras.layers.GlobalAveragePooling1D()(
        keras.layers.Embedding(7, 4)(ids))
    rmodel = keras.Model(ids, keras.layers.Dense(1)(pooled))
    rt = tf.ragged.constant([[1, 2], [3], [4, 5, 6], [0]], dtype=tf.int64)
    self.assertAllClose(dv.predict(rmodel, rt, batch_size=3),
                        rmodel.predict(rt, batch_size=3, verbose=0),
                        atol=1e-6)

  def test_subclassed_model(self):
    model = tm.subclassed()
    x = np.random.default_rng(0).normal(size=(7, 6)).astype("float32")
    self.assertAllClose(dv.predict(model, x),
                        model.predict(x, verbose=0), atol=1e-6)

  def test_errors_name_the_argument(self):
    model = _string_model()
    for call, message in (
        (lambda: dv.predict(None, _colors()), _ERR_MODEL),
        (lambda: dv.predict(model, _colors(), batch_size=0), _ERR_BATCH),
        (lambda: dv.predict(model, np.ones(3, "float32")), _ERR_X)):
      with self.subTest(message=message[:50]):
        with self.assertRaises(ValueError) as ctx:
          call()
        self.assertEqual(str(ctx.exception), message)


if __name__ == "__main__":
  tf.test.main()
