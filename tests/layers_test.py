"""Tests for dropvar_tf.layers (ActivationStrength, ActivationProbe)."""

import os

import numpy as np

from dropvar_tf import layers
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

_ERR_FEATURES = ("Invalid value received for argument `features`. Expected "
                 "one of ('neurons', 'summary'). Received: features='mean'")


def _summary(x):
  """Numpy reference: mean, RMS, fraction > 0 over all non-batch axes."""
  flat = x.reshape(len(x), -1).astype("float64")
  return np.stack([flat.mean(-1), np.sqrt(np.mean(flat**2, -1)),
                   np.mean(flat > 0, -1)], axis=-1)


class ActivationStrengthTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.x2 = rng.normal(size=(5, 7)).astype("float32")
    self.x4 = rng.normal(size=(5, 3, 4, 6)).astype("float32")

  def test_neurons_rank2_is_identity(self):
    out = layers.ActivationStrength()(self.x2)
    self.assertEqual(tuple(out.shape), (5, 7))
    self.assertAllEqual(out, self.x2)

  def test_neurons_rank4_averages_spatial_axes_per_channel(self):
    out = layers.ActivationStrength(features="neurons")(self.x4)
    self.assertEqual(tuple(out.shape), (5, 6))
    self.assertAllClose(out, self.x4.mean(axis=(1, 2)), atol=1e-6)

  def test_neurons_rank1_gets_one_feature(self):
    out = layers.ActivationStrength()(self.x2[:, 0])
    self.assertEqual(tuple(out.shape), (5, 1))
    self.assertAllEqual(out[:, 0], self.x2[:, 0])

  def test_summary_rank2(self):
    out = layers.ActivationStrength(features="summary")(self.x2)
    self.assertEqual(tuple(out.shape), (5, 3))
    self.assertAllClose(out, _summary(self.x2), atol=1e-6)

  def test_summary_rank4(self):
    out = layers.ActivationStrength(features="summary")(self.x4)
    self.assertEqual(tuple(out.shape), (5, 3))
    self.assertAllClose(out, _summary(self.x4), atol=1e-6)

  def test_summary_known_values(self):
    x = np.array([[3.0, -1.0, 0.0, 2.0]], "float32")
    out = layers.ActivationStrength(features="summary")(x)
    # mean 1, rms sqrt((9 + 1 + 0 + 4) / 4), two of four units > 0.
    self.assertAllClose(out, [[1.0, np.sqrt(14.0 / 4.0), 0.5]], atol=1e-6)

  def test_output_is_compute_dtype(self):
    out = layers.ActivationStrength()(self.x2.astype("float64"))
    self.assertEqual(out.dtype, tf.float32)

  def test_symbolic_shapes_match_call(self):
    for features, shape, expected in [
        ("neurons", (7,), (None, 7)), ("neurons", (3, 4, 6), (None, 6)),
        ("summary", (7,), (None, 3)), ("summary", (3, 4, 6), (None, 3))]:
      with self.subTest(features=features, shape=shape):
        layer = layers.ActivationStrength(features=features)
        symbolic = layer(keras.Input(shape))
        self.assertEqual(tuple(symbolic.shape), expected)
        self.assertEqual(layer.compute_output_shape((None,) + shape),
                         expected)

  def test_bad_features_raises(self):
    with self.assertRaises(ValueError) as cm:
      layers.ActivationStrength(features="mean")
    self.assertEqual(str(cm.exception), _ERR_FEATURES)

  def test_config_has_exactly_init_args_and_round_trips(self):
    layer = layers.ActivationStrength(features="summary", name="strength")
    config = layer.get_config()
    parent = keras.layers.Layer.get_config(layer)
    self.assertEqual(config, {**parent, "features": "summary"})
    self.assertEqual(config["features"], "summary")
    clone = layers.ActivationStrength.from_config(config)
    self.assertEqual(clone.features, "summary")
    self.assertEqual(clone.name, "strength")
    self.assertAllClose(clone(self.x4), layer(self.x4))

  def test_registered_and_deserialized_by_name(self):
    self.assertEqual(
        keras.saving.get_registered_name(layers.ActivationStrength),
        "dropvar_tf>ActivationStrength")
    serialized = keras.layers.serialize(
        layers.ActivationStrength(features="summary"))
    restored = keras.layers.deserialize(serialized)
    self.assertIsInstance(restored, layers.ActivationStrength)
    self.assertEqual(restored.features, "summary")
    self.assertIs(
        keras.saving.get_registered_object("dropvar_tf>ActivationStrength"),
        layers.ActivationStrength)


class ActivationProbeTest(tf.test.TestCase):

  def _probed_model(self, features="neurons"):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), name="x")
    h = keras.layers.Dense(8, activation="relu", name="dense")(inputs)
    h, strength = layers.ActivationProbe(features=features,
                                         name="probe_1")(h)
    out = keras.layers.Dense(2, name="out")(h)
    return keras.Model(inputs, {"out": out, "strength": strength})

  def test_identity_on_main_path(self):
    x = np.random.default_rng(1).normal(size=(6, 3, 4, 5)).astype("float32")
    passed, strength = layers.ActivationProbe()(x)
    self.assertAllEqual(passed, x)
    self.assertAllClose(strength, x.mean(axis=(1, 2)), atol=1e-6)

  def test_model_with_probe_matches_model_without(self):
    model = self._probed_model()
    plain = keras.Model(
        model.inputs,
        model.get_layer("out")(model.get_layer("dense").output))
    x = np.random.default_rng(2).normal(size=(9, 4)).astype("float32")
    out = model.predict(x, verbose=0)
    self.assertAllEqual(out["out"], plain.predict(x, verbose=0))
    hidden = keras.Model(model.inputs, model.get_layer("dense").output)
    self.assertAllEqual(out["strength"], hidden.predict(x, verbose=0))

  def test_summary_side_output_shape(self):
    model = self._probed_model(features="summary")
    self.assertEqual(tuple(model.output["strength"].shape), (None, 3))
    self.assertEqual(tuple(model.output["out"].shape), (None, 2))

  def test_config_round_trip_and_registration(self):
    probe = layers.ActivationProbe(features="summary", name="p")
    config = probe.get_config()
    self.assertEqual(config, {**keras.layers.Layer.get_config(probe),
                              "features": "summary"})
    clone = layers.ActivationProbe.from_config(config)
    self.assertEqual(clone.features, "summary")
    self.assertEqual(keras.saving.get_registered_name(layers.ActivationProbe),
                     "dropvar_tf>ActivationProbe")
    restored = keras.layers.deserialize(keras.layers.serialize(probe))
    self.assertIsInstance(restored, layers.ActivationProbe)

  def test_bad_features_raises(self):
    with self.assertRaises(ValueError) as cm:
      layers.ActivationProbe(features="mean")
    self.assertEqual(str(cm.exception), _ERR_FEATURES)

  def test_keras_file_round_trip(self):
    model = self._probed_model(features="summary")
    path = os.path.join(self.get_temp_dir(), "probed.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    self.assertIsInstance(loaded.get_layer("probe_1"), layers.ActivationProbe)
    x = np.random.default_rng(3).normal(size=(4, 4)).astype("float32")
    before, after = model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    for key in ("out", "strength"):
      self.assertAllEqual(after[key], before[key])


if __name__ == "__main__":
  tf.test.main()
