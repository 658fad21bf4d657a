"""Tests for dropvar_tf.inputs: every input form through every step.

Four small models (dense, named dict inputs, string inputs with StringLookup,
ragged token ids) each get their inputs in every form they take; each form
must give the same rows to every step: bitwise equal MC targets, the same
perturbed rows, the same fitted head, and an export that serves them.
"""

import os
import sys
import tempfile

import numpy as np

from dropvar_tf import augment
from dropvar_tf import heads
from dropvar_tf import inputs
from dropvar_tf import predicting
from dropvar_tf import saved_model
from dropvar_tf import targets
from dropvar_tf import training
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testing_models as tm

N = 24
VOCAB = ["red", "green", "blue", "cyan", "plum"]
_MC = dict(num_samples=6, seed=3, batch_size=8)
_PREFIX = "Invalid value received for argument `x`. Expected "


class MeanPool(keras.layers.Layer):
  """Mean over the tokens of each (ragged) row."""

  def call(self, x):
    return tf.reduce_mean(x, axis=1)


def two_inputs_model():
  """A list-input model: float `a` (4) and `b` (2)."""
  keras.utils.set_random_seed(0)
  a = keras.Input((4,), name="a")
  b = keras.Input((2,), name="b")
  h = keras.layers.Dense(8, activation="relu")(
      keras.layers.Concatenate()([a, b]))
  h = keras.layers.Dropout(0.3)(h)
  return keras.Model([a, b], keras.layers.Dense(1)(h), name="two_inputs")


def strings_model():
  """Named inputs: a string `color` (StringLookup) and a float `size`."""
  keras.utils.set_random_seed(0)
  color = keras.Input((1,), dtype="string", name="color")
  size = keras.Input((1,), name="size")
  h = keras.layers.StringLookup(vocabulary=VOCAB, output_mode="one_hot",
                                name="lookup")(color)
  h = keras.layers.Dense(8, activation="relu")(
      keras.layers.Concatenate()([h, size]))
  h = keras.layers.Dropout(0.3)(h)
  return keras.Model({"color": color, "size": size},
                     keras.layers.Dense(1)(h), name="strings")


def ragged_model():
  """Variable-length token ids: `keras.Input(ragged=True)` into Embedding."""
  keras.utils.set_random_seed(0)
  ids = keras.Input((None,), dtype="int64", ragged=True, name="ids")
  h = MeanPool()(keras.layers.Embedding(12, 4)(ids))
  h = keras.layers.Dense(8, activation="relu")(h)
  h = keras.layers.Dropout(0.3)(h)
  return keras.Model(ids, keras.layers.Dense(1)(h), name="ragged")


def _strings(n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.choice(VOCAB, size=(n, 1))


def _ragged(n, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 6, n)
  return tf.RaggedTensor.from_row_lengths(
      rng.integers(0, 12, int(lengths.sum())), lengths)


def _labels(n):
  return np.arange(n, dtype="float32")


def _forms(kind):
  """(model, {form name: x}) with every form holding the same rows."""
  slices = tf.data.Dataset.from_tensor_slices
  if kind == "dense":
    x = tm.target_features(N)
    # "trailing_axis": Keras squeezes an extra trailing axis of size 1; the
    # steps read it at the model's rank, so that a step's tf.function
    # traced on one rank is never retraced on the other.
    forms = {"array": x, "float64": x.astype("float64"),
             "tensor": tf.constant(x), "list": [x],
             "named": {"features": x}, "trailing_axis": x[..., None],
             "trailing_axis_dataset": slices(x[..., None]).batch(5)}
    model = tm.target_model("regression")
    base = slices(x)
  elif kind == "list":
    rng = np.random.default_rng(1)
    a = rng.normal(size=(N, 4)).astype("float32")
    b = rng.normal(size=(N, 2)).astype("float32")
    forms = {"list": [a, b], "tuple": (a, b), "named": {"a": a, "b": b}}
    model = two_inputs_model()
    base = slices((a, b))
  elif kind == "strings":
    color = _strings(N)
    size = np.random.default_rng(2).uniform(size=(N, 1)).astype("float32")
    forms = {"unicode": {"color": color, "size": size},
             "bytes": {"color": color.astype("S"), "size": size},
             "object_str": {"color": color.astype(object), "size": size},
             "object_bytes": {"color": color.astype("S").astype(object),
                              "size": size},
             "tensor": {"color": tf.constant(color), "size": size},
             # Keras adds a missing trailing axis of size 1.
             "flat": {"color": color[:, 0], "size": size[:, 0]}}
    model = strings_model()
    base = slices({"color": color, "size": size})
  else:
    rt = _ragged(N)
    forms = {"ragged": rt, "rows": np.array(
        [np.array(r) for r in rt.to_list()], dtype=object)}
    model = ragged_model()
    base = slices(rt)
  forms["dataset_examples"] = base
  forms["dataset_batches"] = base.batch(5)
  forms["dataset_labelled"] = tf.data.Dataset.zip(
      (base, slices(_labels(N)))).batch(7)
  return model, forms


KINDS = ("dense", "list", "strings", "ragged")


def _as_numpy(x):
  """Normalised inputs as comparable numpy leaves."""
  return [inputs.hashable(v) for v in tf.nest.flatten(x)]


class FormsTest(tf.test.TestCase):
  """Every form of each model's inputs through every step."""

  def assertSameRows(self, a, b):
    for u, v in zip(tf.nest.flatten(_as_numpy(a)), tf.nest.flatten(
        _as_numpy(b))):
      self.assertAllEqual(u, v)

  def test_every_form_gives_bitwise_equal_targets(self):
    for kind in KINDS:
      model, forms = _forms(kind)
      want = targets.mc_dropout_targets(model, forms[next(iter(forms))],
                                        **_MC)
      self.assertGreater(np.count_nonzero(want), N // 2)
      for name, x in forms.items():
        with self.subTest(kind=kind, form=name):
          self.assertEqual(inputs.check_inputs(model, x), N)
          got = targets.mc_dropout_targets(model, x, **_MC)
          self.assertEqual(got.tobytes(), want.tobytes())
          _, _, full = targets.split_half_targets(model, x, **_MC)
          self.assertEqual(full.tobytes(), want.tobytes())

  def test_every_form_normalises_to_the_same_rows(self):
    for kind in KINDS:
      model, forms = _forms(kind)
      want = inputs.normalize(model, forms[next(iter(forms))]).materialize()
      for name, x in forms.items():
        with self.subTest(kind=kind, form=name):
          got = inputs.normalize(model, x)
          self.assertEqual(got.num_examples, N)
          self.assertSameRows(got.materialize(), want)

  def test_perturbed_rows_are_the_same_for_every_form(self):
    for kind in KINDS:
      model, forms = _forms(kind)
      want = augment.perturb_inputs(
          inputs.normalize(model, forms[next(iter(forms))]).materialize(),
          40, seed=5)
      self.assertEqual(inputs.check_inputs(model, want), 40)
      for name, x in forms.items():
        if name == "float64":
          continue  # Perturbed in float64: other values, by design.
        with self.subTest(kind=kind, form=name):
          got = augment.perturb_inputs(x, 40, seed=5, model=model)
          self.assertSameRows(got, want)

  def test_fit_predict_and_export_for_every_model(self):
    for kind in KINDS:
      model, forms = _forms(kind)
      first = next(iter(forms))
      t = targets.mc_dropout_targets(model, forms[first], **_MC)
      # The (x, targets) Dataset form: targets=None takes its labels.
      pairs = tf.data.Dataset.zip((
          forms["dataset_examples"],
          tf.data.Dataset.from_tensor_slices(t))).batch(6)
      variations = []
      for name, x, fit_t in ((first, forms[first], t),
                             ("pairs", pairs, None)):
        with self.subTest(kind=kind, form=name):
          dual = heads.add_variation_head(model, seed=0)
          training.fit_variation_head(dual, x, fit_t, epochs=2,
                                      num_samples=6)
          # Keras' own `predict` refuses numpy strings.
          out = predicting.predict(dual, forms[first], batch_size=8)
          self.assertAllEqual(out["variation"].shape, (N,))
          self.assertTrue(np.all(out["variation"] >= 0))
          variations.append(out["variation"])
      self.assertEqual(variations[1].tobytes(), variations[0].tobytes())
      with self.subTest(kind=kind, step="export"):
        self._check_export(dual, forms, variations[0])

  def _check_export(self, dual, forms, want):
    """Exports with a Dataset as warm-up; serves the warm-up's rows."""
    base = tempfile.mkdtemp(dir=self.get_temp_dir())
    path = saved_model.export_saved_model(
        dual, base, warmup_examples=forms["dataset_labelled"])
    served = tf.saved_model.load(path).signatures["serving_default"]
    records = tf.data.TFRecordDataset(os.path.join(
        path, saved_model.WARMUP_DIRNAME, saved_model.WARMUP_FILENAME))
    self.assertLen(list(records), 4)
    x = inputs.normalize(dual, forms["dataset_labelled"]).materialize()
    entries, _ = saved_model._input_entries(dual)
    leaves = ([x[k] for k, _ in entries] if isinstance(x, dict)
              else tf.nest.flatten(x))
    request = {}
    for (key, _), leaf in zip(entries, leaves):
      if isinstance(leaf, tf.RaggedTensor):
        request.update(inputs.ragged_to_serving(key, leaf, "x"))
      else:
        request[key] = leaf
    specs = served.structured_input_signature[1]
    self.assertEqual(sorted(specs), sorted(request))
    got = served(**{k: tf.constant(v, specs[k].dtype)
                    for k, v in request.items()})
    self.assertAllClose(np.reshape(got["variation"], [-1]), want,
                        rtol=1e-5, atol=1e-7)

  def test_train_variation_head_reads_a_labelled_dataset(self):
    for kind in ("strings", "ragged"):
      model, forms = _forms(kind)
      with self.subTest(kind=kind):
        dual = training.train_variation_head(
            model, forms["dataset_labelled"], num_samples=4,
            num_perturbed=30, epochs=1)
        self.assertTrue(heads.has_variation_head(dual))


class RaggedTest(tf.test.TestCase):

  def test_serving_form_round_trip(self):
    rt = _ragged(6)
    dense = inputs.ragged_to_serving("ids", rt, "x")
    self.assertEqual(sorted(dense), ["ids", "ids_row_lengths"])
    self.assertAllEqual(dense["ids_row_lengths"], rt.row_lengths())
    back = inputs.ragged_from_serving(dense["ids"], dense["ids_row_lengths"])
    self.assertAllEqual(back.to_list(), rt.to_list())
    nested = tf.RaggedTensor.from_row_lengths(rt, [4, 2])
    with self.assertRaisesRegex(ValueError, "argument `x`.*ragged_rank 1"):
      inputs.ragged_to_serving("ids", nested, "x")

  def test_rows_of_ragged_and_dense_leaves(self):
    x = {"ids": _ragged(5), "f": np.arange(5)}
    self.assertEqual(inputs.num_rows(x), 5)
    taken = inputs.take_rows(x, [4, 0, 0])
    self.assertAllEqual(taken["f"], [4, 0, 0])
    self.assertAllEqual(taken["ids"].to_list(),
                        [x["ids"][4].numpy().tolist()] +
                        [x["ids"][0].numpy().tolist()] * 2)
    tiled = inputs.tile_rows(inputs.to_tensors(x), 2)
    self.assertEqual(int(tiled["ids"].nrows()), 10)
    self.assertAllEqual(tiled["f"], np.tile(np.arange(5), 2))


class ErrorsTest(tf.test.TestCase):
  """Bad inputs of every form are refused, naming `x` and the spec."""

  def assertInvalid(self, model, x, message):
    with self.assertRaises(ValueError) as cm:
      inputs.normalize(model, x)
    self.assertEqual(str(cm.exception), _PREFIX + message)

  def test_ragged_inputs(self):
    model = ragged_model()
    spec = ("input matching the model's input spec (ids: int64, shape "
            "(None, None), ragged). Received: x={}")
    self.assertInvalid(model, np.arange(4), spec.format(
        "'int64 array of shape (4,)'"))
    self.assertInvalid(model, tf.ragged.constant([["a"], ["b", "c"]]),
                       spec.format("'ragged string array of shape (2, "
                                   "None)'"))
    self.assertInvalid(model, _ragged(4)[:0], "at least one example. "
                       "Received: x='ragged int64 array of shape (0, None)'")
    dense = tm.target_model("regression")
    self.assertInvalid(
        dense, tf.RaggedTensor.from_tensor(tm.target_features(3)),
        "input matching the model's input spec (features: float32, shape "
        "(None, 6)). Received: x='ragged float32 array of shape (3, 6)'")

  def test_non_finite_ragged_rows_are_counted(self):
    keras.utils.set_random_seed(0)
    values = keras.Input((None, 1), ragged=True, name="values")
    h = keras.layers.Dense(4)(MeanPool()(values))
    model = keras.Model(values, keras.layers.Dropout(0.2)(h))
    x = tf.ragged.constant([[[1.0], [np.nan]], [[2.0]],
                            [[np.inf], [1.0], [0.0]]], ragged_rank=1)
    self.assertInvalid(model, x, "finite values (no NaN or Inf). Received: "
                       "x='2 of 3 rows with NaN or Inf values'")
    self.assertInvalid(model, tf.data.Dataset.from_tensor_slices(x).batch(2),
                       "finite values (no NaN or Inf). Received: x='2 of 3 "
                       "rows with NaN or Inf values'")

  def test_structure_and_strings(self):
    model = strings_model()
    spec = ("inputs matching the model's input spec (color: string, shape "
            "(None, 1); size: float32, shape (None, 1)). Received: x={}")
    color, size = _strings(4), np.ones((4, 1), "float32")
    self.assertInvalid(model, [color, size], spec.format("'2 arrays'"))
    self.assertInvalid(model, {"color": color}, spec.format(
        "\"a dict with keys ['color']\""))
    self.assertInvalid(model, {"color": size, "size": size}, spec.format(
        "'float32 array of shape (4, 1); float32 array of shape (4, 1)'"))
    self.assertInvalid(
        model, {"color": np.array([[1], [2]], object), "size": size[:2]},
        "strings (str or bytes) in a string array. Received: x='an object "
        "array of int'")
    self.assertInvalid(
        two_inputs_model(), [np.ones((3, 4)), np.ones((2, 2))],
        "arrays of one common length. Received: x=[3, 2]")

  def test_datasets(self):
    model = tm.target_model("regression")
    x = tm.target_features(6)
    labelled = tf.data.Dataset.from_tensor_slices((x[:, :5], x[:, 0]))
    self.assertInvalid(
        model, labelled.batch(2),
        "input matching the model's input spec (features: float32, shape "
        "(None, 6)) (a Dataset of examples or of batches). Received: x='a "
        "Dataset with element_spec (TensorSpec(shape=(None, 5), "
        "dtype=tf.float32, name=None), TensorSpec(shape=(None,), "
        "dtype=tf.float32, name=None))'")
    self.assertInvalid(model, tf.data.Dataset.from_tensor_slices(x).repeat(),
                       "a finite Dataset. Received: x='an infinite Dataset'")
    data = inputs.normalize(
        model, tf.data.Dataset.from_tensor_slices((x, x[:, 0])).batch(4))
    self.assertAllEqual(data.labels(), x[:, 0])
    self.assertIsNone(inputs.normalize(model, x).labels())

  def test_perturb_inputs_needs_the_model_for_a_dataset(self):
    with self.assertRaisesRegex(
        ValueError, "argument `model`. Expected the model a Dataset `x` "
        "feeds"):
      augment.perturb_inputs(
          tf.data.Dataset.from_tensor_slices(tm.target_features(4)), 3)


if __name__ == "__main__":
  tf.test.main()
