"""Tests for dropvar_tf.moment_layers (the registered moment layers)."""

import numpy as np

from dropvar_tf import moment_layers
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

L = keras.layers


class MomentLayersTest(tf.test.TestCase):

  def test_layer_configs_round_trip(self):
    layers = [
        moment_layers.MomentDropout(0.25),
        moment_layers.MomentActivation("gelu"),
        moment_layers.MomentDense(4, "sigmoid", use_bias=False),
        moment_layers.MomentConv(2, 3, (3, 3), (1, 1), "same",
                                 "channels_last", (1, 1), 1, "relu", True),
        moment_layers.MomentBatchNormalization(axis=1, epsilon=1e-5),
        moment_layers.MomentEmbedding(7, 2),
        moment_layers.MomentMerge("average"),
        moment_layers.MomentRearrange(L.Reshape((2, 3))),
        moment_layers.MomentPooling(L.MaxPooling2D(3, padding="same")),
        moment_layers.MomentElementwise(L.LeakyReLU(0.2)),
        moment_layers.MomentStatistic("per_class_std"),
        moment_layers.MomentInput(),
    ]
    for layer in layers:
      config = layer.get_config()
      clone = type(layer).from_config(config)
      self.assertEqual(clone.get_config(), config)
      self.assertEqual(keras.saving.get_registered_name(type(layer)),
                       "dropvar_tf>" + type(layer).__name__)

  def test_shared_variables_are_reused_not_copied(self):
    base = L.Dense(3, activation="relu")
    base.build((None, 4))
    base.bias.assign(np.arange(3, dtype="float32"))
    layer = moment_layers.MomentDense(3, "relu").share_from(
        {"kernel": base.kernel, "bias": base.bias})
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    det, mean, var = layer([x, x, np.zeros_like(x)])
    self.assertIs(layer.kernel, base.kernel)
    self.assertIs(layer.bias, base.bias)
    self.assertEqual([id(w) for w in layer.weights],
                     [id(base.kernel), id(base.bias)])
    self.assertEmpty(layer.trainable_weights)
    self.assertTrue(base.kernel.trainable)
    self.assertAllClose(det, base(x))
    self.assertAllClose(mean, base(x))   # no variance in: relu of the mean
    self.assertAllClose(var, np.zeros((5, 3)), atol=1e-12)


if __name__ == "__main__":
  tf.test.main()
