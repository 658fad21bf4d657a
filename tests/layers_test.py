"""Tests for dropvar_tf.layers (ActivationStrength, ActivationProbe)."""

import os

import numpy as np

from dropvar_tf import layers
from dropvar_tf import targets
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

_ERR_ACTIVATION = ("Invalid value received for argument `activation`. "
                   "Expected one of ('linear', 'sigmoid', 'softmax'). "
                   "Received: activation='relu'")
_ERR_FEATURES = ("Invalid value received for argument `features`. Expected "
                 "one of ('neurons', 'summary'). Received: features='mean'")


def _summary(x):
  """Numpy reference: mean, L2 norm, fraction > 0 over non-batch axes."""
  flat = x.reshape(len(x), -1).astype("float64")
  return np.stack([flat.mean(-1), np.sqrt(np.sum(flat**2, -1)),
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
    # mean 1, L2 norm sqrt(9 + 1 + 0 + 4), two of four units > 0.
    self.assertAllClose(out, [[1.0, np.sqrt(14.0), 0.5]], atol=1e-6)

  def test_summary_rank1_gives_one_row_per_example(self):
    out = layers.ActivationStrength(features="summary")(self.x2[:, 0])
    self.assertAllClose(out, _summary(self.x2[:, :1]), atol=1e-6)

  def test_l2_norm_is_one_op_in_graphs_and_xla_safe_under_xla(self):
    spec = tf.TensorSpec((None, 3, 4, 6), tf.float32)
    probe = layers.ActivationStrength(features="summary")

    def op_types(jit_compile):
      fn = tf.function(probe, jit_compile=jit_compile)
      return {op.type
              for op in fn.get_concrete_function(spec).graph.get_operations()}
    self.assertIn("EuclideanNorm", op_types(False))
    xla_ops = op_types(True)
    self.assertNotIn("EuclideanNorm", xla_ops)  # XLA has no kernel for it
    self.assertIn("Sqrt", xla_ops)
    graph = tf.function(probe)(self.x4)
    xla = tf.function(probe, jit_compile=True)(self.x4)
    self.assertAllClose(graph, xla, rtol=1e-5)
    self.assertAllClose(graph, _summary(self.x4), atol=1e-5)

  def test_nonnegative_summary_matches_general_on_relu_outputs(self):
    relu = np.maximum(self.x4, 0.0)
    fast = layers.ActivationStrength(features="summary", nonnegative=True)
    self.assertAllClose(fast(relu), _summary(relu), atol=1e-6)
    # The promise matters: on negative inputs only the general form counts
    # positives (sign() there gives -1 for negatives).
    general = layers.ActivationStrength(features="summary")
    self.assertAllClose(general(self.x4), _summary(self.x4), atol=1e-6)
    self.assertLess(float(np.max(np.asarray(fast(self.x4))[:, 2] -
                                 _summary(self.x4)[:, 2])), -0.05)

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
    layer = layers.ActivationStrength(features="summary", nonnegative=True,
                                      name="strength")
    config = layer.get_config()
    parent = keras.layers.Layer.get_config(layer)
    self.assertEqual(config, {**parent, "features": "summary",
                              "nonnegative": True})
    clone = layers.ActivationStrength.from_config(config)
    self.assertEqual(clone.features, "summary")
    self.assertTrue(clone.nonnegative)
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
                              "features": "summary", "nonnegative": False})
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


def _delta_reference(h, y, w, rate, activation, statistic):
  """Numpy delta-method std of the output layer's dropout (float64)."""
  h, y, w = (np.asarray(a, "float64") for a in (h, y, w))
  noise = h**2 * rate / (1.0 - rate)
  if activation in ("linear", "sigmoid"):
    var = noise @ w**2
    if activation == "sigmoid":
      var *= (y * (1.0 - y))**2
    return np.sqrt(var)
  k = y.shape[1]
  jac = y[:, :, None] * (np.eye(k)[None] - y[:, None, :])  # d y_c / d z_k
  wg = np.einsum("nck,dk->ncd", jac, w)
  per_class = np.sqrt(np.einsum("ncd,nd->nc", wg**2, noise))
  if statistic == "per_class_std":
    return per_class
  c = y.argmax(-1)
  return per_class[np.arange(len(y)), c][:, None]


class OutputDropoutDeltaTest(tf.test.TestCase):

  def _layer(self, activation, statistic, units, w):
    layer = layers.OutputDropoutDelta(rate=0.25, activation=activation,
                                      statistic=statistic,
                                      input_dim=w.shape[0], units=units)
    layer.build([(None, w.shape[0]), (None, units)])
    layer.kernel.assign(w)
    return layer

  def test_matches_numpy_reference(self):
    rng = np.random.default_rng(0)
    h = np.abs(rng.normal(size=(6, 5))).astype("float32")
    for activation, statistic, units in [
        ("linear", "std", 1), ("sigmoid", "std", 1), ("linear", "std", 2),
        ("softmax", "predicted_class_std", 3),
        ("softmax", "per_class_std", 3)]:
      with self.subTest(activation=activation, statistic=statistic):
        w = rng.normal(size=(5, units)).astype("float32")
        z = h @ w
        y = {"linear": z, "sigmoid": 1 / (1 + np.exp(-z)),
             "softmax": np.exp(z) / np.exp(z).sum(-1, keepdims=True)}[
                 activation].astype("float32")
        layer = self._layer(activation, statistic, units, w)
        out = layer([h, y])
        expected = _delta_reference(h, y, w, 0.25, activation, statistic)
        self.assertEqual(tuple(out.shape), expected.shape)
        self.assertAllClose(out, expected, rtol=1e-4, atol=1e-7)

  def test_exact_for_linear_output_with_one_dropout(self):
    # With dropout only before a linear output the output is linear in the
    # masks, so the delta method is the exact DPV: compare with MC dropout.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    dropped = keras.layers.Dropout(0.25)(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(dropped))
    x = np.random.default_rng(1).normal(size=(16, 4)).astype("float32")
    hidden = keras.Model(inputs, h)(x)
    layer = self._layer("linear", "std", 1,
                        model.get_layer("out").kernel.numpy())
    delta = np.asarray(layer([hidden, model(x)]))[:, 0]
    mc = targets.mc_dropout_targets(model, x, num_samples=4000, seed=0,
                                    progress=False)
    # The std of a 4000-sample std estimate is about 1.1% of its value.
    self.assertAllClose(mc, delta, rtol=0.06)

  def test_config_and_errors(self):
    layer = layers.OutputDropoutDelta(0.3, "sigmoid", "std", 4, 1, name="d")
    config = layer.get_config()
    self.assertEqual(config, {**keras.layers.Layer.get_config(layer),
                              "rate": 0.3, "activation": "sigmoid",
                              "statistic": "std", "input_dim": 4,
                              "units": 1, "smoothed": False,
                              "earlier_dims": []})
    clone = layers.OutputDropoutDelta.from_config(config)
    self.assertEqual(clone.input_dim, 4)
    self.assertEqual(keras.saving.get_registered_name(
        layers.OutputDropoutDelta), "dropvar_tf>OutputDropoutDelta")
    with self.assertRaises(ValueError) as cm:
      layers.OutputDropoutDelta(0.3, "relu", "std", 4, 1)
    self.assertEqual(str(cm.exception), _ERR_ACTIVATION)


class SmoothedSigmoidStdTest(tf.test.TestCase):

  def test_matches_sampled_std_from_centre_to_far_tail(self):
    rng = np.random.default_rng(0)
    eps = rng.normal(size=2_000_000)
    # (logit, spread, rtol): a spread of tens of logits makes the sigmoid a
    # step between quadrature nodes.
    cases = [(0.0, 0.5, 1e-3), (2.0, 1.0, 1e-3), (-3.0, 0.3, 1e-3),
             (8.0, 2.0, 0.01), (5.0, 0.01, 1e-3), (30.0, 10.0, 0.05),
             (60.0, 40.0, 0.06), (3.0, 100.0, 0.03)]
    logit = np.array([c[0] for c in cases], "float32")
    spread = np.array([c[1] for c in cases], "float32")
    out = np.asarray(layers.smoothed_sigmoid_std(logit, spread))
    # (batch, 1), the shape the layer passes, broadcasts another way.
    column = np.asarray(layers.smoothed_sigmoid_std(logit[:, None],
                                                    spread[:, None]))
    self.assertEqual(column.shape, (len(cases), 1))
    self.assertAllClose(column[:, 0], out, rtol=1e-6)
    for i, (m, s, rtol) in enumerate(cases):
      with self.subTest(logit=m, spread=s):
        # Sampled on the far side, as the quadrature, for precision.
        sampled = (1 / (1 + np.exp(np.abs(m) - s * eps))).std()
        self.assertAllClose(out[i], sampled, rtol=rtol)

  def test_finite_and_nonnegative_on_extremes(self):
    logit = np.array([np.inf, -np.inf, np.nan, 1e38, 0.0, 3.0], "float32")
    spread = np.array([1.0, 1.0, 1.0, 1e38, np.inf, 0.0], "float32")
    for shape in ((-1,), (-1, 1)):
      out = np.asarray(layers.smoothed_sigmoid_std(
          logit.reshape(shape), spread.reshape(shape))).ravel()
      with self.subTest(shape=shape):
        self.assertTrue(np.all(np.isfinite(out)))
        # An infinite logit with a finite spread: certain, 0. NaN or an
        # infinite spread: as uncertain as a probability gets, 0.5 (up to
        # the rounding of the weights' sum). Huge but finite: the chance of
        # a flip still counts (a logit one spread from 0 flips with
        # probability 0.16). No spread: 0.
        self.assertAllEqual(out[[0, 1, 5]], [0.0, 0.0, 0.0])
        self.assertAllClose(out[[2, 4]], [0.5, 0.5], atol=1e-6)
        self.assertBetween(out[3], 0.2, 0.5)


class SmoothedOutputDeltaTest(tf.test.TestCase):
  """`OutputDropoutDelta(smoothed=True)` against MC dropout of its layer."""

  def _model(self, activation, units, noise=keras.layers.Dropout):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(64, activation="relu", use_bias=False,
                           name="hidden")(inputs)
    dropped = noise(0.3)(h)
    out = keras.layers.Dense(units, activation=activation, use_bias=False,
                             kernel_initializer=keras.initializers.RandomNormal(
                                 stddev=0.6, seed=1), name="out")(dropped)
    model = keras.Model(inputs, out)
    layer = layers.OutputDropoutDelta(
        rate=0.3, activation=activation,
        statistic="std" if activation == "sigmoid" else "predicted_class_std",
        input_dim=64, units=units, smoothed=True)
    layer.build([(None, 64), (None, units)])
    layer.kernel.assign(model.get_layer("out").kernel.numpy())
    return model, keras.Model(inputs, h), layer

  def test_follows_mc_dropout_as_inputs_scale_up(self):
    # With dropout only before the output layer, the smoothed delta is MC
    # dropout up to the Gaussian approximation of the logits; scaling the
    # inputs up (a ReLU network without biases scales its logits and their
    # spread together) keeps it there.
    # GaussianDropout of rate p has dropout's variance: the same delta.
    x = np.random.default_rng(2).normal(size=(64, 6)).astype("float32")
    for activation, units, noise in (
        ("sigmoid", 1, keras.layers.Dropout),
        ("softmax", 4, keras.layers.Dropout),
        ("sigmoid", 1, keras.layers.GaussianDropout)):
      model, hidden, layer = self._model(activation, units, noise)
      for scale in (1.0, 16.0):
        with self.subTest(activation=activation, scale=scale,
                          noise=noise.__name__):
          xs = x * scale
          mc = np.asarray(targets.mc_dropout_targets(
              model, xs, num_samples=2000, seed=0, progress=False)).ravel()
          smooth = np.asarray(layer([hidden(xs), model(xs)])).ravel()
          self.assertAllClose(smooth.mean() / mc.mean(), 1.0, atol=0.1)
          self.assertGreater(np.corrcoef(smooth, mc)[0, 1], 0.9)

  def test_noise_scale_widens_the_spread_and_refusals(self):
    model, hidden, layer = self._model("sigmoid", 1)
    x = np.random.default_rng(2).normal(size=(8, 6)).astype("float32")
    h, y = hidden(x), model(x)
    before = np.asarray(layer([h, y]))
    layer.noise_scale.assign(2.0)
    logit, spread = layer.logit_and_spread(h)
    expected = layers.smoothed_sigmoid_std(
        logit, spread * 2.0 * (0.3 / 0.7) ** 0.5)
    self.assertAllClose(layer([h, y]), expected)
    self.assertTrue(np.all(np.asarray(layer([h, y])) >= before))
    config = layer.get_config()
    self.assertTrue(config["smoothed"])
    self.assertTrue(layers.OutputDropoutDelta.from_config(config).smoothed)
    for activation, statistic in (("linear", "std"),
                                  ("softmax", "per_class_std")):
      with self.assertRaisesRegex(ValueError, "`smoothed`"):
        layers.OutputDropoutDelta(0.3, activation, statistic, 4, 3,
                                  smoothed=True)

  def test_earlier_dropouts_add_their_variance(self):
    rng = np.random.default_rng(3)
    h = rng.normal(size=(6, 4)).astype("float32")
    y = rng.uniform(size=(6, 1)).astype("float32")
    earlier = [rng.normal(size=(6, 5)).astype("float32"),
               rng.normal(size=(6, 3)).astype("float32")]
    layer = layers.OutputDropoutDelta(0.2, "sigmoid", "std", 4, 1,
                                      smoothed=True, earlier_dims=(5, 3))
    plain = layers.OutputDropoutDelta(0.2, "sigmoid", "std", 4, 1,
                                      smoothed=True)
    kernel = rng.normal(size=(4, 1)).astype("float32")
    for l in (layer, plain):
      l.build([(None, 4), (None, 1)])
      l.kernel.assign(kernel)
    # Sensitivities of 0 (before a fit) leave the last dropout's delta.
    self.assertAllClose(layer([h, y] + earlier), plain([h, y]))
    a = [rng.uniform(size=5).astype("float32"),
         rng.uniform(size=3).astype("float32")]
    for weight, value in zip(layer.sensitivities, a):
      weight.assign(value)
    logit, std = layer.logit_and_std(h, earlier)
    last = np.linalg.norm(h * kernel[:, 0], axis=-1) * (0.2 / 0.8) ** 0.5
    want = np.sqrt(last ** 2 + sum(np.sum((e * w) ** 2, axis=-1)
                                   for e, w in zip(earlier, a)))
    self.assertAllClose(np.asarray(std)[:, 0], want, rtol=1e-5)
    self.assertAllClose(np.asarray(logit)[:, 0], h @ kernel[:, 0], rtol=1e-5)
    self.assertAllClose(layer([h, y] + earlier),
                        layers.smoothed_sigmoid_std(logit, std))
    # Saved with the model: the config keeps the widths, the weights follow.
    config = layer.get_config()
    self.assertEqual(config["earlier_dims"], [5, 3])
    restored = layers.OutputDropoutDelta.from_config(config)
    restored.build([(None, 4), (None, 1), (None, 5), (None, 3)])
    restored.set_weights(layer.get_weights())
    self.assertAllClose(restored([h, y] + earlier), layer([h, y] + earlier))
    with self.assertRaisesRegex(ValueError, "`earlier`"):
      layer.logit_and_std(h, earlier[:1])
    for bad in ((0,), (2.5,), "ab", (True,)):
      with self.subTest(bad=bad), self.assertRaisesRegex(ValueError,
                                                         "`earlier_dims`"):
        layers.OutputDropoutDelta(0.2, "sigmoid", "std", 4, 1, smoothed=True,
                                  earlier_dims=bad)
    for args in (("linear", "std", 4, 1), ("sigmoid", "std", 4, 3)):
      with self.subTest(args=args), self.assertRaisesRegex(
          ValueError, "`earlier_dims`"):
        layers.OutputDropoutDelta(0.2, *args, smoothed=args[0] != "linear",
                                  earlier_dims=(5,))


class IsReluOutputTest(tf.test.TestCase):

  def test_only_layers_that_end_in_relu_count_as_nonnegative(self):

    class Residual(keras.layers.Layer):
      """Has an `activation` but adds its input after it."""

      def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.activation = keras.activations.relu
        self.dense = keras.layers.Dense(4)

      def call(self, x):
        return x + self.activation(self.dense(x))

    cases = [(keras.layers.Dense(4, activation="relu"), True),
             (keras.layers.Conv2D(2, 3, activation="relu6"), True),
             (keras.layers.Activation("relu"), True),
             (keras.layers.ReLU(max_value=6.0), True),
             (keras.layers.ReLU(negative_slope=0.1), False),
             (keras.layers.LeakyReLU(), False),
             (keras.layers.Dense(4, activation="tanh"), False),
             (Residual(), False)]
    for layer, expected in cases:
      with self.subTest(layer=type(layer).__name__):
        self.assertEqual(layers.is_relu_output(layer), expected)


if __name__ == "__main__":
  tf.test.main()
