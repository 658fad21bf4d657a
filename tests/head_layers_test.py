"""Tests for dropvar_tf.head_layers (the layers of a variation head)."""

import numpy as np

from dropvar_tf import head_layers
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

_PREFIX = "Invalid value received for argument "
_ERR_TRANSFORM = (_PREFIX + "`transform`. Expected one of ('log', "
                  "'identity'). Received: transform='sqrt'")
_ERR_OLD_FORMAT = (
    _PREFIX + "`metadata`. Expected a head made by dropvar_tf >= 0.2.0 "
    "(earlier heads computed their input features differently; refit the "
    "head, e.g. with `train_variation_head`, on this version). Received: "
    "metadata=\"dropvar_tf_version='{}'\"")
_ERR_PRIOR_BOUND = (_PREFIX + "`prior_bound`. Expected None or a number "
                    "> 0 (with transform='log'). Received: prior_bound={}")
_ERR_BAD_VERSION = (
    _PREFIX + "`metadata`. Expected a `dropvar_tf_version` that is a PEP 440 "
    "version string such as '0.2.0'. Received: "
    "metadata=\"dropvar_tf_version='unknown'\"")


class HeadLayersTest(tf.test.TestCase):

  def test_prediction_features_one_unit(self):
    y = np.array([[0.2], [0.9]], "float32")
    out = head_layers.PredictionFeatures()(y)
    self.assertAllClose(out, [[0.2, 0.04], [0.9, 0.81]], atol=1e-6)
    self.assertAllClose(head_layers.PredictionFeatures()(y[:, 0]), out)

  def test_prediction_features_several_units(self):
    y = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25], [0.0, 1.0, 0.0]],
                 "float32")
    out = np.asarray(head_layers.PredictionFeatures(probabilities=True)(y))
    with np.errstate(divide="ignore", invalid="ignore"):
      neg_entropy = np.nansum(y * np.log(y), axis=-1)  # 0 log 0 = 0
    self.assertEqual(out.shape, (3, 2))
    self.assertAllClose(out[:, 0], [0.7, 0.5, 1.0])
    self.assertAllClose(out[:, 1], neg_entropy, atol=1e-6)
    self.assertEqual(out[2, 1], 0.0)  # saturated: finite, exactly 0
    self.assertEqual(head_layers.PredictionFeatures().compute_output_shape(
        (None, 3)), (None, 2))

  def test_prediction_features_of_other_outputs_stay_finite(self):
    y = np.array([[-0.5, 1.2], [3.0, -2.0]], "float32")
    layer = head_layers.PredictionFeatures()   # not probabilities: no log
    self.assertAllClose(layer(y), [[1.2, 0.25 + 1.44], [3.0, 13.0]])
    clone = head_layers.PredictionFeatures.from_config(
        head_layers.PredictionFeatures(probabilities=True).get_config())
    self.assertTrue(clone.probabilities)

  def test_head_input_dense_equals_dense_on_concatenated_inputs(self):
    rng = np.random.default_rng(0)
    widths = [40, 3, 64, 2]   # two wide inputs split off, two narrow joined
    xs = [rng.normal(size=(5, d)).astype("float32") for d in widths]
    layer = head_layers.HeadInputDense(
        6, kernel_initializer=keras.initializers.GlorotUniform(seed=1))
    out = np.asarray(layer(xs))
    self.assertEqual([tuple(k.shape) for k in layer.kernels],
                     [(40, 6), (64, 6), (5, 6)])
    bias = rng.normal(size=6).astype("float32")
    layer.bias.assign(bias)
    full = layer.full_kernel()
    self.assertEqual(full.shape, (109, 6))
    expected = np.maximum(np.concatenate(xs, axis=1) @ full + bias, 0.0)
    self.assertAllClose(layer(xs), expected, rtol=1e-5, atol=1e-5)
    self.assertGreater(float(np.mean(out > 0)), 0.2)  # the relu is not all 0
    # set_full_kernel puts every row back where full_kernel found it.
    layer.set_full_kernel(full[::-1])
    self.assertAllEqual(layer.full_kernel(), full[::-1])
    with self.assertRaisesRegex(ValueError, "a list of 4 feature tensors"):
      layer(xs[:3])

  def test_head_input_dense_config_round_trips(self):
    layer = head_layers.HeadInputDense(3, activation="linear", split_width=8,
                                 kernel_regularizer=keras.regularizers.L2(0.1))
    xs = [np.ones((2, 9), "float32"), np.ones((2, 2), "float32")]
    layer(xs)
    clone = head_layers.HeadInputDense.from_config(layer.get_config())
    clone(xs)
    clone.set_full_kernel(layer.full_kernel())
    self.assertAllClose(clone(xs), layer(xs))
    self.assertEqual(clone.split_width, 8)
    self.assertEqual(len(clone.losses), 2)  # one L2 term per kernel block
    with self.assertRaisesRegex(ValueError, "activation"):
      head_layers.HeadInputDense(3, activation="tanh")

  def test_head_from_an_older_feature_format_is_refused(self):
    for version in ("0.1.0", "0.1.9", "0.1.0.dev3"):
      with self.subTest(version=version):
        with self.assertRaises(ValueError) as cm:
          head_layers.VariationOutput(
              metadata={"dropvar_tf_version": version})
        self.assertEqual(str(cm.exception), _ERR_OLD_FORMAT.format(version))
    for version in (head_layers.HEAD_FORMAT_VERSION, "0.10.0", "1.0.0",
                    "0.2.0.dev1", "0.2.0rc1", "0.2.0+local", "0.2.0.1"):
      with self.subTest(version=version):
        layer = head_layers.VariationOutput(
            metadata={"dropvar_tf_version": version})
        self.assertEqual(layer.metadata["dropvar_tf_version"], version)

  def test_head_with_an_invalid_version_is_refused(self):
    with self.assertRaises(ValueError) as cm:
      head_layers.VariationOutput(metadata={"dropvar_tf_version": "unknown"})
    self.assertEqual(str(cm.exception), _ERR_BAD_VERSION)

  def test_log_feature(self):
    layer = head_layers.LogFeature(offset=0.5)
    out = layer(np.array([0.0, 1.5, -2.0], "float32"))
    self.assertAllClose(out, np.log([[0.5], [2.0], [0.5]]), atol=1e-6)
    config = layer.get_config()
    self.assertEqual(config, {**keras.layers.Layer.get_config(layer),
                              "offset": 0.5, "nonnegative": False})
    self.assertEqual(head_layers.LogFeature.from_config(config).offset, 0.5)
    # A config saved before the flag existed keeps the relu.
    del config["nonnegative"]
    self.assertFalse(head_layers.LogFeature.from_config(config).nonnegative)
    trusting = head_layers.LogFeature(offset=0.5, nonnegative=True)
    self.assertAllClose(trusting(np.array([0.0, 1.5], "float32")),
                        np.log([[0.5], [2.0]]), atol=1e-6)
    self.assertTrue(head_layers.LogFeature.from_config(
        trusting.get_config()).nonnegative)

  def test_variation_output_log_and_identity(self):
    z = np.array([[np.log(0.3)], [np.log(0.001)], [1.0]], "float32")
    log_layer = head_layers.VariationOutput(transform="log")
    log_layer.eps.assign(0.01)
    log_layer.scale.assign(2.0)
    out = np.asarray(log_layer(z))
    self.assertEqual(out.shape, (3,))
    expected = 2.0 * np.maximum(np.exp(z[:, 0]) - 0.01, 0.0)
    self.assertAllClose(out, expected, rtol=1e-6)
    self.assertEqual(out[1], 0.0)  # exp(z) < eps clips to zero.
    identity = head_layers.VariationOutput(transform="identity")
    self.assertAllClose(identity(np.array([[-1.0], [0.25]], "float32")),
                        [0.0, 0.25])

  def test_head_input_dense_keeps_overflowed_features_finite(self):
    layer = head_layers.HeadInputDense(2, activation="linear")
    layer.build([(None, 2)])
    layer.set_full_kernel(np.array([[1.0, -2.0], [-1.0, 3.0]], "float32"))
    x = np.array([[np.inf, np.inf], [-np.inf, 1.0], [1.0, 2.0]], "float32")
    out = np.asarray(layer([x]))
    self.assertTrue(np.all(np.isfinite(out)))
    self.assertAllEqual(out[2], [-1.0, 4.0])  # within bounds: unchanged
    bound = head_layers.FEATURE_BOUND
    self.assertAllClose(out[1], [-bound - 1.0, 2 * bound + 3.0])

  def test_variation_output_says_most_uncertain_on_nan(self):
    layer = head_layers.VariationOutput(transform="log")
    layer.max_value.assign(0.7)
    z = np.array([[np.nan], [np.inf], [-np.inf], [np.log(0.5)]], "float32")
    out = np.asarray(layer(z))
    self.assertAllClose(out, [0.7, 0.7, 0.0, 0.5 - 1e-3])

  def test_variation_output_corrects_its_prior_within_bounds(self):
    layer = head_layers.VariationOutput(units=1, prior_bound=2.0)
    self.assertEqual(float(layer.correction_low.numpy()), -2.0)
    layer.eps.assign(0.01)
    layer.correction_low.assign(-0.5)
    layer.correction_high.assign(1.0)
    z = np.array([[0.2], [30.0], [-30.0], [-0.5]], "float32")
    prior = np.array([0.1, 0.1, 0.1, 0.002], "float32")
    out = np.asarray(layer([z, prior]))
    e = 0.11 * np.exp([0.2, 1.0, -0.5])
    self.assertAllClose(out[:3], e - 0.01, rtol=1e-5)
    # exp(...) - eps <= 0: a small share of exp(...), not 0.
    small = 0.012 * np.exp(-0.5)
    self.assertAllClose(out[3], max(small - 0.01, layer.MIN_SHARE * small),
                        rtol=1e-5)
    self.assertGreater(out[3], 0.0)
    raw = layer.to_raw(out[:3], prior[:3])
    self.assertAllClose(raw, [0.2, 1.0, -0.5], rtol=1e-4)
    config = layer.get_config()
    self.assertEqual(config["prior_bound"], 2.0)
    self.assertEqual(
        head_layers.VariationOutput.from_config(config).prior_bound, 2.0)

  def test_variation_output_caps_its_prior_before_correcting_it(self):
    # A prior far above max_value (an input far off the calibration data)
    # counts as max_value: a correction below 0 then keeps the estimate
    # below the cap, where an uncapped prior would reach it.
    layer = head_layers.VariationOutput(units=1, prior_bound=2.0)
    layer.eps.assign(0.0)
    layer.max_value.assign(0.5)
    layer.correction_low.assign(-1.0)
    layer.correction_high.assign(-1.0)
    z = np.zeros((3, 1), "float32")
    prior = np.array([5.0, np.inf, 0.2], "float32")
    out = np.asarray(layer([z, prior]))
    self.assertAllClose(out, [0.5 * np.exp(-1.0), 0.5 * np.exp(-1.0),
                              0.2 * np.exp(-1.0)], rtol=1e-5)

  def test_variation_output_prior_bound_errors(self):
    for bound, transform in ((0.0, "log"), ("1", "log"), (1.0, "identity")):
      with self.subTest(bound=bound, transform=transform):
        with self.assertRaises(ValueError) as cm:
          head_layers.VariationOutput(prior_bound=bound, transform=transform)
        self.assertEqual(str(cm.exception), _ERR_PRIOR_BOUND.format(
            repr(bound)))

  def test_variation_output_to_raw_inverts_call(self):
    layer = head_layers.VariationOutput(units=2, transform="log")
    layer.eps.assign(0.02)
    layer.scale.assign(0.5)
    v = np.array([[0.1, 0.3], [0.05, 1.0]])
    raw = layer.to_raw(v).astype("float32")
    self.assertAllClose(layer(raw), v, rtol=1e-5)
    self.assertEqual(tuple(layer(raw).shape), (2, 2))

  def test_variation_output_config_and_errors(self):
    layer = head_layers.VariationOutput(units=2, transform="identity",
                                  metadata={"statistic": "std"}, name="vo")
    config = layer.get_config()
    self.assertEqual(config, {**keras.layers.Layer.get_config(layer),
                              "units": 2, "transform": "identity",
                              "metadata": {"statistic": "std"},
                              "prior_bound": None, "shrink": False})
    clone = head_layers.VariationOutput.from_config(config)
    self.assertEqual(clone.metadata, {"statistic": "std"})
    with self.assertRaises(ValueError) as cm:
      head_layers.VariationOutput(transform="sqrt")
    self.assertEqual(str(cm.exception), _ERR_TRANSFORM)
    with self.assertRaises(ValueError) as cm:
      head_layers.VariationOutput(units=0)
    self.assertEqual(str(cm.exception), _PREFIX + "`units`. Expected an "
                     "integer >= 1. Received: units=0")

  def test_shrink_moves_the_correction_toward_its_center(self):
    layer = head_layers.VariationOutput(units=1, prior_bound=2.0, shrink=True)
    layer.eps.assign(0.0)
    layer.correction_center.assign(0.5)
    z = np.array([[1.5], [1.5], [1.5], [9.0]], "float32")
    prior = np.array([0.1, 0.1, 0.1, 0.1], "float32")
    far = np.array([0.0, 1.0, 1e30, 0.0], "float32")
    v = np.asarray(layer([z, prior, far]))
    # Inside the range the clipped correction; 1 half-width out, half way
    # to the center; far out, the center.
    self.assertAllClose(v, 0.1 * np.exp([1.5, 1.0, 0.5, 2.0]), rtol=1e-5)
    self.assertTrue(layer.get_config()["shrink"])
    with self.assertRaisesRegex(ValueError, "`shrink`"):
      head_layers.VariationOutput(units=1, shrink=True)

  def test_head_layers_are_registered(self):
    for cls in (head_layers.PredictionFeatures, head_layers.LogFeature,
                head_layers.HeadInputDense, head_layers.VariationOutput):
      with self.subTest(cls=cls.__name__):
        self.assertEqual(keras.saving.get_registered_name(cls),
                         "dropvar_tf>" + cls.__name__)


if __name__ == "__main__":
  tf.test.main()
