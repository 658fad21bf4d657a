"""The model zoo through the whole flow: targets, fit, predict, export, serve.

Each kind of model users have (issue 11: Transformer, LSTM/GRU, a nested CNN
backbone, EfficientNet, wide & deep, several outputs, subclassed, noise
layers, string inputs, mixed precision) gets the default head, MC targets,
a fitted head, an export, and answers over gRPC equal to the dual in
process. One server serves every export, as one `tensorflow_model_server`
with a model config list would.
"""

import os

import numpy as np

import dropvar_tf as dv
from dropvar_tf import contract
from dropvar_tf import heads
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf
from dropvar_tf.serving import client as client_lib
from dropvar_tf.serving import server as server_lib
import testing_models as tm

_NUM_SAMPLES = 8
_FIT_ROWS = 48
_NEW_ROWS = 5


def _efficientnet(seed):
  """keras.applications' EfficientNetB0 (weights=None) on 32x32 RGB images.

  It holds its own dropout: drop-connect in every block and a top Dropout
  before its classifier.
  """
  keras.utils.set_random_seed(seed)
  return keras.applications.EfficientNetB0(
      weights=None, input_shape=(32, 32, 3), classes=3)


def _nested_backbone(seed):
  """A CNN backbone (a nested Functional model) under Dropout -> softmax."""
  keras.utils.set_random_seed(seed)
  image = keras.Input((32, 32, 3))
  h = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(image)
  h = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(h)
  backbone = keras.Model(
      image, keras.layers.GlobalAveragePooling2D()(h), name="backbone")
  inputs = keras.Input((32, 32, 3), name="image")
  h = keras.layers.Dropout(0.3, name="top_drop")(backbone(inputs))
  outputs = keras.layers.Dense(3, activation="softmax", name="klass")(h)
  return keras.Model(inputs, outputs, name="nested_backbone")


def _string_model(seed):
  """Token strings -> StringLookup -> Embedding -> Dropout -> softmax."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((3,), dtype="string", name="tokens")
  ids = keras.layers.StringLookup(vocabulary=["a", "b", "c", "d", "e"],
                                  name="lookup")(inputs)
  h = keras.layers.Embedding(6, 8, name="embed")(ids)
  h = keras.layers.Flatten(name="flat")(h)
  h = keras.layers.Dense(16, activation="relu", name="dense")(h)
  h = keras.layers.Dropout(0.3, name="drop")(h)
  return keras.Model(
      inputs, keras.layers.Dense(3, activation="softmax", name="klass")(h),
      name="strings")


def _mixed_precision_model(seed):
  """A mixed_float16 model (float16 compute, float32 variables)."""
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((tm.NUM_FEATURES,), name="features")
    h = keras.layers.Dense(16, activation="relu", name="dense_a")(inputs)
    h = keras.layers.Dropout(0.3, name="drop")(h)
    outputs = keras.layers.Dense(1, dtype="float32", name="value")(h)
    return keras.Model(inputs, outputs, name="mixed_precision")
  finally:
    keras.mixed_precision.set_global_policy("float32")


def _images(n, seed):
  rng = np.random.default_rng(seed)
  return rng.uniform(0.0, 1.0, (n, 32, 32, 3)).astype("float32")


def _strings(n, seed):
  rng = np.random.default_rng(seed)
  return rng.choice(np.array(["a", "b", "c", "d", "e", "zz"]), (n, 3))


def _features(n, seed):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, tm.NUM_FEATURES)).astype("float32")


# name -> (model builder, input builder(n, seed)).
_ZOO = {
    "transformer": (lambda: tm.source_model("transformer"),
                    lambda n, s: tm.source_inputs("transformer", n, s)),
    "lstm": (lambda: tm.source_model("lstm"),
             lambda n, s: tm.source_inputs("lstm", n, s)),
    "gru": (lambda: tm.source_model("gru"),
            lambda n, s: tm.source_inputs("gru", n, s)),
    "nested_backbone": (lambda: _nested_backbone(0), _images),
    "efficientnet": (lambda: _efficientnet(0), _images),
    "wide_and_deep": (lambda: tm.build("recommender"),
                      lambda n, s: tm.sample_inputs("recommender", n, s)),
    "multi_output": (lambda: tm.multi_output("dict"), _features),
    "subclassed": (tm.subclassed_regressor, _features),
    "gaussian_dropout": (lambda: tm.source_model("gaussian"),
                         lambda n, s: tm.source_inputs("gaussian", n, s)),
    "alpha_dropout": (lambda: tm.source_model("alpha"),
                      lambda n, s: tm.source_inputs("alpha", n, s)),
    "strings": (lambda: _string_model(0), _strings),
    "mixed_precision": (lambda: _mixed_precision_model(0), _features),
}


class ZooTest(tf.test.TestCase):
  """Every kind goes through the flow; one server answers for all."""

  def _fit_and_export(self, name, export_root):
    build, inputs = _ZOO[name]
    model = build()
    x_fit, x_new = inputs(_FIT_ROWS, 0), inputs(_NEW_ROWS, 1)
    base_before = [np.asarray(w) for w in model.weights]
    dual = dv.add_variation_head(model, seed=0)
    names = heads.dual_output_names(dual)
    statistic = (None if names else
                 dv.variation_head_metadata(dual)["statistic"])
    kwargs = {} if statistic is None else {"statistic": statistic}
    t = dv.mc_dropout_targets(model, x_fit, num_samples=_NUM_SAMPLES, seed=0,
                              progress=False, **kwargs)
    leaves = list(t.values()) if names else [t]
    self.assertTrue(all(np.all(np.isfinite(v)) and np.any(v > 0)
                        for v in leaves), msg=f"{name}: targets")
    dv.fit_variation_head(dual, x_fit, t, epochs=2, batch_size=16,
                          num_samples=_NUM_SAMPLES)
    # Keras' own `predict` refuses numpy strings (the base model's too):
    # they go in as a tensor.
    out = dual.predict(tf.constant(x_new) if name == "strings" else x_new,
                       verbose=0)
    self.assertEqual(sorted(out), list(contract.output_keys(names)))
    for key, value in out.items():
      self.assertTrue(np.all(np.isfinite(value)), msg=f"{name}: {key}")
      if key.startswith(contract.VARIATION_KEY):
        self.assertTrue(np.all(value >= 0), msg=f"{name}: {key}")
    for before, after in zip(base_before, model.weights):
      self.assertAllEqual(before, np.asarray(after), msg=f"{name}: weights")
    path = dv.export_saved_model(dual, os.path.join(export_root, name))
    self.assertEqual(os.path.basename(path), "1")
    return x_new, out

  def test_every_kind_through_the_flow_and_served_equal(self):
    export_root = self.get_temp_dir()
    configs, expected = [], {}
    for name in _ZOO:
      with self.subTest(model=name):
        expected[name] = self._fit_and_export(name, export_root)
        configs.append(server_lib.model_config(
            name, os.path.join(export_root, name)))
    server = server_lib.ModelServer(configs, port=0, poll_seconds=0)
    with server:
      for name, (x_new, out) in expected.items():
        with self.subTest(served=name):
          with client_lib.VariationClient(server.target, name) as client:
            served = client.predict(x_new)
          if served.predictions:  # several outputs
            got = {contract.prediction_key(n): v
                   for n, v in served.predictions.items()}
            got.update({contract.variation_key(n): v
                        for n, v in served.variations.items()})
          else:
            got = {contract.PREDICTION_KEY: served.prediction,
                   contract.VARIATION_KEY: served.variation}
          self.assertEqual(sorted(got), sorted(out))
          for key, value in out.items():
            self.assertAllClose(got[key], value, rtol=1e-5, atol=1e-6,
                                msg=f"{name}: {key}")


if __name__ == "__main__":
  tf.test.main()
