"""A variation head on subclassed models, bare and wrapped in a Functional one.

The whole flow per kind: MC targets, fit, predict, strip, export, and the
export served over gRPC by the in-process server equal to in-process.
"""

import os

import numpy as np

from dropvar_tf import contract
from dropvar_tf import heads
from dropvar_tf import saved_model
from dropvar_tf import targets
from dropvar_tf import training
from dropvar_tf._keras import keras, tf
from dropvar_tf.serving import client as client_lib
from dropvar_tf.serving import server as server_lib
import testing_models as tm


def _bare(seed=0):
  return tm.subclassed_regressor(seed)


def _wrapped(seed=0):
  keras.utils.set_random_seed(seed)
  return tm.source_model("wrapped_subclassed", seed)


class _TfOpModel(keras.Model):
  """A subclassed model whose `call` uses a raw TF op (no symbolic run)."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.dense = keras.layers.Dense(8, activation="relu", name="dense")
    self.drop = keras.layers.Dropout(0.3, name="drop")
    self.out = keras.layers.Dense(1, name="value")

  def call(self, inputs, training=None):
    h = self.drop(self.dense(inputs), training=training)
    return self.out(tf.math.cumsum(h, axis=-1))


class SubclassedHeadTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.x = tm.source_inputs("dropout", 96, seed=1)

  def _flow(self, model, layer_paths):
    before = tm.weights_snapshot(model)
    t = targets.mc_dropout_targets(model, self.x, num_samples=40, seed=0)
    self.assertEqual(t.shape, (96,))
    # Keras' own MC dropout is the reference for the targets.
    ref = np.std(np.stack([model(self.x, training=True).numpy()[:, 0]
                           for _ in range(200)]), axis=0)
    self.assertAllClose(t.mean() / ref.mean(), 1.0, atol=0.1)
    self.assertGreater(np.corrcoef(t, ref)[0, 1], 0.9)

    dual = heads.add_variation_head(model, seed=0)
    meta = heads.variation_head_metadata(dual)
    self.assertEqual(meta["layers"], layer_paths)
    self.assertEqual(meta["base_model"], model.name)
    training.fit_variation_head(dual, self.x, t, epochs=3, seed=0)
    out = dual.predict(self.x, verbose=0)
    self.assertEqual(set(out), set(contract.OUTPUT_KEYS))
    self.assertAllClose(out[contract.PREDICTION_KEY], model(self.x),
                        atol=1e-6)
    self.assertTrue(np.all(out[contract.VARIATION_KEY] >= 0))
    # The dual is a Functional graph of the subclassed model's own layers:
    # the `.keras` format needs no config of the subclassed class itself.
    path = os.path.join(self.get_temp_dir(), "dual.keras")
    dual.save(path)
    loaded = keras.models.load_model(path)
    for key, value in loaded.predict(self.x, verbose=0).items():
      self.assertAllClose(value, out[key], rtol=1e-6, atol=1e-7)
    self.assertEqual(heads.variation_head_metadata(loaded),
                     heads.variation_head_metadata(dual))
    plain = heads.strip_variation_head(dual)
    self.assertAllClose(plain(self.x), model(self.x), atol=1e-6)
    after = tm.weights_snapshot(model)
    self.assertEqual(sorted(after), sorted(before))
    for path, value in before.items():
      self.assertAllEqual(after[path], value)
    return dual, out

  def _served_equals_in_process(self, dual):
    base = os.path.join(self.get_temp_dir(), "sub")
    path = saved_model.export_saved_model(dual, base, version=1)
    loaded = tf.saved_model.load(path).signatures[contract.SERVING_SIGNATURE]
    (name,) = loaded.structured_input_signature[1]
    x = self.x[:5]
    expected = dual(x, training=False)
    reloaded = loaded(**{name: tf.constant(x)})
    server = server_lib.ModelServer(
        [server_lib.model_config("sub", base)], port=0, poll_seconds=0)
    with server:
      with client_lib.VariationClient(server.target, "sub") as client:
        served = client.predict(x)
    for key in contract.OUTPUT_KEYS:
      self.assertAllClose(reloaded[key], expected[key], rtol=1e-6, atol=1e-6)
      self.assertAllClose(served.outputs[key], expected[key], rtol=1e-6,
                          atol=1e-6)

  def test_bare_subclassed_model_full_flow(self):
    model = _bare()
    dual, _ = self._flow(model, ["dense_a", "dense_b"])
    self._served_equals_in_process(dual)

  def test_wrapped_subclassed_model_full_flow(self):
    model = _wrapped()
    dual, _ = self._flow(model, ["inner/dense_a", "inner/dense_b"])
    self._served_equals_in_process(dual)

  def test_candidates_are_the_subclassed_models_own_layers(self):
    self.assertEqual([l.name for l in heads.candidate_layers(_bare())],
                     ["dense_a", "dense_b"])
    self.assertEqual([l.name for l in heads.candidate_layers(_wrapped())],
                     ["dense_a", "dense_b"])

  def test_layers_by_path_or_name(self):
    model = _wrapped()
    dual = heads.add_variation_head(model, layers=["inner/dense_b"])
    self.assertEqual(heads.variation_head_metadata(dual)["layers"],
                     ["inner/dense_b"])
    dual = heads.add_variation_head(model, layers=["dense_a"])
    self.assertEqual(heads.variation_head_metadata(dual)["layers"],
                     ["inner/dense_a"])

  def test_unknown_layer_is_named(self):
    with self.assertRaisesRegex(
        ValueError, r"Invalid value received for argument `layers`.*"
        r"\['inner/nope'\]"):
      heads.add_variation_head(_wrapped(), layers=["inner/nope"])

  def test_call_keras_cannot_run_symbolically_is_refused_by_name(self):
    model = _TfOpModel(name="tf_op_model")
    model(np.zeros((1, tm.NUM_FEATURES), "float32"))
    with self.assertRaisesRegex(
        ValueError, r"Invalid value received for argument `model`\. "
        r"Expected a model whose subclassed parts call only Keras layers.*"
        r"Received: model=\"model 'tf_op_model': A KerasTensor cannot"):
      heads.add_variation_head(model)
    # Its MC targets need no symbolic run: they work.
    t = targets.mc_dropout_targets(model, self.x[:8], num_samples=10)
    self.assertEqual(t.shape, (8,))
    self.assertTrue(np.all(t > 0))

  def test_dropout_gated_on_training_is_refused_by_name(self):

    class Gated(keras.Model):
      """Runs its Dropout only when `training` is true."""

      def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(8, activation="relu", name="dense")
        self.drop = keras.layers.Dropout(0.3, name="drop")
        self.out = keras.layers.Dense(1, name="value")

      def call(self, inputs, training=None):
        h = self.dense(inputs)
        if training:
          h = self.drop(h, training=training)
        return self.out(h)

    model = Gated(name="gated")
    model(np.zeros((1, tm.NUM_FEATURES), "float32"))
    message = (r"Invalid value received for argument `model`\. Expected a "
               r"model whose `call` runs every dropout layer with training "
               r"off too.*Received: model=\"model 'gated', whose call with "
               r"training off skips \['drop'\]\"")
    with self.assertRaisesRegex(ValueError, message):
      heads.add_variation_head(model)
    # Its MC targets would be all zero: refused too.
    with self.assertRaisesRegex(ValueError, message):
      targets.mc_dropout_targets(model, self.x[:8], num_samples=4)

  def test_layer_names_used_twice_are_refused_by_name(self):

    class Block(keras.Model):

      def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fc = keras.layers.Dense(4, activation="relu", name="fc")

      def call(self, inputs):
        return self.fc(inputs)

    class TwoBlocks(keras.Model):

      def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.a, self.b = Block(name="a"), Block(name="b")
        self.drop = keras.layers.Dropout(0.3, name="drop")
        self.out = keras.layers.Dense(1, name="value")

      def call(self, inputs, training=None):
        return self.out(self.drop(self.b(self.a(inputs)), training=training))

    model = TwoBlocks(name="two_blocks")
    model(np.zeros((1, tm.NUM_FEATURES), "float32"))
    with self.assertRaisesRegex(
        ValueError, r"Expected a model whose layers have unique names .*"
        r"The name \"fc\" is used 2 times"):
      heads.add_variation_head(model)

  def test_unbuilt_subclassed_model_is_refused(self):
    with self.assertRaisesRegex(ValueError, "argument `model`.*unbuilt"):
      heads.add_variation_head(tm.SubclassedRegressor(name="fresh"))


if __name__ == "__main__":
  tf.test.main()
