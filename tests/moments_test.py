"""Tests for dropvar_tf.moments (analytic DPV by moment propagation)."""

import os
import re

import numpy as np
from scipy import stats

from dropvar_tf import contract
from dropvar_tf import moment_layers
from dropvar_tf import moments
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

L = keras.layers

# Expected error-message fragments, stored once.
UNSUPPORTED_MSG = "layer 'norm' of class LayerNormalization"
SUPPORTED_LIST_MSG = "moment propagation supports: InputLayer, Dropout"
BAD_STATISTIC_MSG = re.escape(
    "Invalid value received for argument `statistic`. Expected one of "
    "('auto', 'std', 'predicted_class_std', 'per_class_std'). Received: "
    "statistic='variance'")
BAD_BATCH_MSG = re.escape(
    "Invalid value received for argument `batch_size`. Expected an integer "
    ">= 1. Received: batch_size=0")


def _mlp(units=1, activation="linear", batch_norm=False, seed=0, hidden=32,
         input_dim=8, rate=0.3):
  """A small MLP: [Dense(relu) (BN) Dropout] x 2, Dense(units, activation)."""
  keras.utils.set_random_seed(seed)
  layers = [keras.Input((input_dim,), name="x")]
  for _ in range(2):
    layers.append(L.Dense(hidden, "relu"))
    if batch_norm:
      layers.append(L.BatchNormalization())
    layers.append(L.Dropout(rate))
  layers.append(L.Dense(units, activation))
  model = keras.Sequential(layers, name="mlp")
  _randomise_batch_norm(model)
  return model


def _randomise_batch_norm(model, seed=0):
  """Gives BN layers non-trivial moving statistics, as training does."""
  rng = np.random.RandomState(seed)
  for layer in model.layers:
    if isinstance(layer, L.BatchNormalization):
      dim = layer.moving_mean.shape[0]
      layer.moving_mean.assign(rng.normal(0.0, 0.3, dim).astype("float32"))
      layer.moving_variance.assign(rng.uniform(0.5, 2.0, dim).astype("float32"))
      layer.gamma.assign(rng.uniform(0.5, 1.5, dim).astype("float32"))


def _mc_samples(model, x, num_samples, seed=0):
  """(num_samples, N, k) MC-dropout outputs; BatchNorm stays in inference.

  Runs a clone with frozen BatchNorm layers (a frozen BN ignores
  training=True), so only dropout is random, as the DPV definition wants.
  """
  clone = keras.models.clone_model(model)
  clone.set_weights(model.get_weights())
  for layer in clone.layers:
    if isinstance(layer, L.BatchNormalization):
      layer.trainable = False
  keras.utils.set_random_seed(seed)
  tiled = keras.tree.map_structure(
      lambda a: np.concatenate([a] * num_samples, axis=0), x)
  out = np.asarray(clone(tiled, training=True))
  return out.reshape((num_samples, -1) + out.shape[1:])


def _mc_statistic(model, x, statistic, num_samples=1000):
  std = _mc_samples(model, x, num_samples).std(axis=0)
  if statistic == contract.STAT_PREDICTED_CLASS_STD:
    index = np.asarray(model(x)).argmax(axis=-1)
    return std[np.arange(len(index)), index]
  if statistic == contract.STAT_STD and std.shape[-1] == 1:
    return std[:, 0]
  return std


def _r2(estimate, reference):
  estimate, reference = np.ravel(estimate), np.ravel(reference)
  residual = np.sum(np.square(estimate - reference))
  return 1.0 - residual / np.sum(np.square(reference - reference.mean()))


def _inputs(n=300, d=8, seed=0):
  return np.random.RandomState(seed).normal(size=(n, d)).astype("float32")


def _images(n, shape, seed=0):
  """Images with per-example contrast in [0.1, 3]: DPV differs between them."""
  rng = np.random.RandomState(seed)
  x = rng.uniform(size=(n,) + shape) * rng.uniform(
      0.1, 3.0, size=(n,) + (1,) * len(shape))
  return x.astype("float32")


def _dict_model(seed=0):
  """Named dict inputs, Embedding, Concatenate, nested Sequential, Add."""
  keras.utils.set_random_seed(seed)
  inputs = {"user_id": keras.Input((1,), dtype="int64", name="user_id"),
            "features": keras.Input((4,), name="features")}
  emb = L.Flatten()(L.Embedding(20, 6)(inputs["user_id"]))
  h = L.Concatenate()([emb, inputs["features"]])
  h = L.Dense(24, "relu")(h)
  block = keras.Sequential(
      [keras.Input((24,)), L.Dropout(0.25), L.Dense(16, "gelu")], name="block")
  h = block(h)
  h = L.Add()([h, L.Dense(16)(h)])
  out = L.Dense(3, "softmax")(L.Dropout(0.3)(h))
  return keras.Model(inputs, out, name="recommender")


def _dict_inputs(n=200, seed=0):
  rng = np.random.RandomState(seed)
  return {"user_id": rng.randint(0, 20, size=(n, 1)).astype("int64"),
          "features": rng.normal(size=(n, 4)).astype("float32")}


def _cnn(seed=0):
  keras.utils.set_random_seed(seed)
  model = keras.Sequential([
      keras.Input((12, 12, 1)),
      L.Conv2D(8, 3, activation="relu", padding="same"),
      L.BatchNormalization(),
      L.MaxPooling2D(2),
      L.Dropout(0.2),
      L.Conv2D(8, 3, activation="relu"),
      L.MaxPooling2D(3, strides=2, padding="same"),
      L.AveragePooling2D(2, padding="same"),
      L.Dropout(0.1),
      L.Flatten(),
      L.Dense(32, "relu"),
      L.Dropout(0.3),
      L.Dense(4, "softmax"),
  ], name="cnn")
  _randomise_batch_norm(model)
  return model


class MomentModelTest(tf.test.TestCase):

  def test_dropout_dense_closed_form(self):
    # y = sum_i w_i x_i b_i / (1 - p): Var[y] = sum_i w_i^2 x_i^2 p / (1 - p).
    keras.utils.set_random_seed(0)
    p = 0.3
    model = keras.Sequential([keras.Input((6,)), L.Dropout(p), L.Dense(3)])
    x = _inputs(50, 6)
    kernel = model.layers[-1].kernel.numpy()
    want = np.sqrt((x**2) @ (kernel**2) * p / (1 - p))
    got = moments.moment_propagation_variation(model, x, statistic="std")
    self.assertEqual(got.shape, (50, 3))
    self.assertAllClose(got, want, rtol=1e-5, atol=1e-6)
    per_class = moments.moment_propagation_variation(model, x, "per_class_std")
    self.assertAllClose(per_class, want, rtol=1e-5, atol=1e-6)
    index = np.asarray(model(x)).argmax(-1)
    predicted = moments.moment_propagation_variation(model, x,
                                                     "predicted_class_std")
    self.assertAllClose(predicted, want[np.arange(50), index], rtol=1e-5)
    # The closed form is also what MC dropout converges to.
    mc = _mc_statistic(model, x, "std", num_samples=4000)
    self.assertAllClose(got, mc, rtol=0.1, atol=1e-3)

  def test_statistic_shapes(self):
    x = _inputs(10)
    one = _mlp(units=1)
    three = _mlp(units=3, activation="softmax")
    self.assertEqual(moments.moment_propagation_variation(one, x).shape, (10,))
    self.assertEqual(
        moments.moment_propagation_variation(one, x, "per_class_std").shape,
        (10, 1))
    self.assertEqual(moments.moment_propagation_variation(three, x).shape,
                     (10,))
    self.assertEqual(
        moments.moment_propagation_variation(three, x, "std").shape, (10, 3))
    self.assertEqual(
        moments.moment_propagation_variation(three, x, "per_class_std").shape,
        (10, 3))

  def _check_against_mc(self, model, x, statistic, min_spearman, min_r2):
    got = moments.moment_propagation_variation(model, x, statistic)
    want = _mc_statistic(model, x, statistic)
    self.assertAllEqual(got.shape, want.shape)
    rho = stats.spearmanr(np.ravel(got), np.ravel(want))[0]
    r2 = _r2(got, want)
    print(f"{model.name} {statistic}: spearman={rho:.3f} r2={r2:.3f}")
    self.assertGreater(rho, min_spearman)
    self.assertGreater(r2, min_r2)

  def test_mlp_regression_matches_mc(self):
    self._check_against_mc(_mlp(units=1), _inputs(), "std", 0.95, 0.8)

  def test_mlp_sigmoid_matches_mc(self):
    self._check_against_mc(_mlp(units=1, activation="sigmoid"), _inputs(),
                           "std", 0.95, 0.8)

  def test_mlp_softmax_matches_mc(self):
    model = _mlp(units=4, activation="softmax")
    x = _inputs()
    self._check_against_mc(model, x, "predicted_class_std", 0.9, 0.7)
    self._check_against_mc(model, x, "per_class_std", 0.9, 0.7)

  def test_mlp_with_batch_norm_matches_mc(self):
    self._check_against_mc(_mlp(units=1, batch_norm=True), _inputs(), "std",
                           0.95, 0.8)

  def test_cnn_matches_mc(self):
    self._check_against_mc(_cnn(), _images(150, (12, 12, 1)),
                           "predicted_class_std", 0.9, 0.6)

  def test_dict_inputs_embedding_nested_model_matches_mc(self):
    model = _dict_model()
    mp = moments.moment_model(model)
    self.assertEqual(sorted(mp.input), ["features", "user_id"])
    self._check_against_mc(model, _dict_inputs(), "predicted_class_std", 0.85,
                           0.6)

  def test_embedding_only_path_has_no_variation(self):
    keras.utils.set_random_seed(0)
    ids = keras.Input((2,), dtype="int32", name="ids")
    emb = L.Flatten()(L.Embedding(10, 3)(ids))
    out = L.Dense(2)(emb)
    side = L.Dense(2)(L.Dropout(0.5)(emb))
    model = keras.Model(ids, L.Concatenate()([out, side]))
    got = moments.moment_propagation_variation(
        model, np.array([[1, 2], [3, 4]], "int32"), "std")
    self.assertAllEqual(got[:, :2], np.zeros((2, 2)))
    self.assertTrue(np.all(got[:, 2:] > 0))

  def test_pooling_variants_match_mc(self):
    # Non-overlapping windows: overlapping ones share inputs, and the
    # correlation that independence drops makes a later average
    # underestimate (std ratio 0.6-0.8 measured with stride 1).
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((10, 10, 2)), L.Dropout(0.3),
        L.Conv2D(4, 2, activation="elu"),
        L.MaxPooling2D(2),
        L.AveragePooling2D(2, padding="same"),
        L.Dropout(0.2), L.GlobalAveragePooling2D(), L.Dense(1)
    ], name="pooling")
    self._check_against_mc(model, _images(150, (10, 10, 2)), "std", 0.9, 0.6)

  def test_channels_first_pooling_equals_channels_last(self):
    keras.utils.set_random_seed(0)
    x = np.random.RandomState(0).normal(size=(5, 6, 6, 2)).astype("float32")
    results = []
    for data_format in ("channels_last", "channels_first"):
      layers = [keras.Input((6, 6, 2))]
      if data_format == "channels_first":
        layers.append(L.Permute((3, 1, 2)))
      layers += [L.Dropout(0.4), L.Activation("relu"),
                 L.MaxPooling2D(2, padding="same", data_format=data_format),
                 L.AveragePooling2D(2, padding="same", data_format=data_format),
                 L.GlobalAveragePooling2D(data_format=data_format),
                 L.Dense(1, kernel_initializer="ones")]
      results.append(moments.moment_propagation_variation(
          keras.Sequential(layers), x))
    self.assertAllClose(results[0], results[1], rtol=1e-5)
    self.assertTrue(np.all(results[0] > 0))

  def test_shared_layer_gives_one_moment_layer(self):
    keras.utils.set_random_seed(0)
    x_in = keras.Input((4,))
    shared = L.Dense(4, "tanh")
    h = L.Dropout(0.2)(shared(x_in))
    out = L.Dense(1)(shared(h))
    model = keras.Model(x_in, out)
    mp = moments.moment_model(model)
    dense_moments = [l for l in mp.layers
                     if isinstance(l, moment_layers.MomentDense)]
    self.assertLen(dense_moments, 2)
    self._check_against_mc(model, _inputs(200, 4), "std", 0.9, 0.4)

  def test_variance_is_finite_and_non_negative(self):
    keras.utils.set_random_seed(0)
    x_in = keras.Input((8,))
    h = x_in
    for activation in ("gelu", "sigmoid", "elu", "softplus", "relu", "tanh"):
      h = L.Dropout(0.5)(L.Dense(16, activation)(h))
    out = L.Dense(5, "softmax")(L.LeakyReLU(0.1)(h))
    model = keras.Model(x_in, out)
    x = np.concatenate([_inputs(20) * 100.0, np.zeros((5, 8), "float32"),
                        _inputs(20) * 1e-4])
    for statistic in ("per_class_std", "predicted_class_std"):
      got = moments.moment_propagation_variation(model, x, statistic)
      self.assertTrue(np.all(np.isfinite(got)))
      self.assertTrue(np.all(got >= 0.0))

  def test_batch_size_does_not_change_result(self):
    model = _mlp(units=2, activation="softmax")
    x = _inputs(50)
    self.assertAllClose(
        moments.moment_propagation_variation(model, x, batch_size=7),
        moments.moment_propagation_variation(model, x, batch_size=1024),
        rtol=1e-6)

  def test_shares_variables_and_leaves_model_unchanged(self):
    model = _mlp(units=1, batch_norm=True)
    x = _inputs(20)
    weights = [w.copy() for w in model.get_weights()]
    trainable_flags = [v.trainable for v in model.weights]
    prediction = np.asarray(model(x))
    mp = moments.moment_model(model)
    mp.predict(x, verbose=0)
    mp.trainable = True
    mp.trainable = False
    base_ids = {id(v) for v in model.weights}
    self.assertTrue(mp.weights)
    self.assertTrue(all(id(v) in base_ids for v in mp.weights))
    self.assertEqual(mp.trainable_weights, [])
    for want, got in zip(weights, model.get_weights()):
      self.assertAllEqual(want, got)
    self.assertEqual(trainable_flags, [v.trainable for v in model.weights])
    self.assertAllEqual(prediction, np.asarray(model(x)))

  def test_moment_path_has_no_gradient_into_base(self):
    model = _mlp(units=1)
    mp = moments.moment_model(model)
    x = tf.constant(_inputs(8))
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(mp(x))
    grads = tape.gradient(loss, model.trainable_variables)
    self.assertTrue(all(g is None for g in grads))


def _dual(model, mp):
  return keras.Model(model.inputs if len(model.inputs) > 1 else model.input,
                     {"prediction": model.output, "mp": mp(model.input)},
                     name="dual")


class SavingTest(tf.test.TestCase):

  def test_keras_round_trip_of_dual_model(self):
    model = _dict_model()
    dual = keras.Model(model.input, {
        "prediction": model.output,
        "mp": moments.moment_model(model)(model.input)})
    x = _dict_inputs(30)
    want = dual.predict(x, verbose=0)
    path = os.path.join(self.get_temp_dir(), "dual.keras")
    dual.save(path)
    loaded = keras.models.load_model(path)
    got = loaded.predict(x, verbose=0)
    self.assertAllClose(got["prediction"], want["prediction"], rtol=1e-6)
    self.assertAllClose(got["mp"], want["mp"], rtol=1e-6)
    self.assertTrue(np.all(want["mp"] > 0))

  def test_keras_round_trip_of_cnn_moment_model(self):
    model = _cnn()
    mp = moments.moment_model(model, "per_class_std")
    x = np.random.RandomState(0).uniform(size=(6, 12, 12, 1)).astype("float32")
    path = os.path.join(self.get_temp_dir(), "mp.keras")
    mp.save(path)
    loaded = keras.models.load_model(path)
    self.assertAllClose(loaded.predict(x, verbose=0), mp.predict(x, verbose=0),
                        rtol=1e-6)

  def test_export_archive_of_dual_model(self):
    model = _dict_model()
    dual = keras.Model(model.input, {
        "prediction": model.output,
        "mp": moments.moment_model(model)(model.input)})
    archive = keras.export.ExportArchive()
    archive.track(dual)
    archive.add_endpoint(
        contract.SERVING_SIGNATURE, lambda inputs: dual(inputs, training=False),
        input_signature=[{
            "user_id": tf.TensorSpec((None, 1), tf.int64, name="user_id"),
            "features": tf.TensorSpec((None, 4), tf.float32, name="features")
        }])
    path = os.path.join(self.get_temp_dir(), "saved_model")
    archive.write_out(path, verbose=False)
    loaded = tf.saved_model.load(path)
    for n in (3, 17):
      x = _dict_inputs(n, seed=n)
      want = dual.predict(x, batch_size=n, verbose=0)
      got = getattr(loaded, contract.SERVING_SIGNATURE)(
          {k: tf.constant(v) for k, v in x.items()})
      self.assertAllClose(got["prediction"], want["prediction"], rtol=1e-5)
      self.assertAllClose(got["mp"], want["mp"], rtol=1e-5)


class ErrorsTest(tf.test.TestCase):

  def test_unsupported_layer_is_named(self):
    model = keras.Sequential([keras.Input((4,)), L.Dense(4),
                              L.LayerNormalization(name="norm"),
                              L.Dropout(0.1), L.Dense(1)])
    with self.assertRaisesRegex(ValueError, UNSUPPORTED_MSG) as error:
      moments.moment_model(model)
    self.assertIn(SUPPORTED_LIST_MSG, str(error.exception))
    self.assertIn("Conv2D", str(error.exception))

  def test_other_dropout_sources_are_refused_by_name(self):
    for layer, kind in [(L.GaussianDropout(0.2, name="noise"),
                         "gaussian_dropout"),
                        (L.AlphaDropout(0.2, name="noise"), "alpha_dropout"),
                        (L.MultiHeadAttention(1, 2, dropout=0.1,
                                              name="noise"),
                         "attention_dropout")]:
      inputs = keras.Input((3, 4))
      h = (layer(inputs, inputs) if kind == "attention_dropout"
           else layer(inputs))
      h = L.Dense(1)(L.Flatten()(L.Dropout(0.1)(h)))
      with self.assertRaisesRegex(
          ValueError, f"layer 'noise' of class {type(layer).__name__}") as e:
        moments.moment_model(keras.Model(inputs, h))
      self.assertIn(f"this layer is or holds {kind}", str(e.exception))

  def test_shared_dropout_masks_are_refused(self):
    for layer in (L.SpatialDropout2D(0.2, name="drop"),
                  L.Dropout(0.2, noise_shape=(None, 1, 1, 2), name="drop")):
      model = keras.Sequential([keras.Input((4, 4, 2)), layer, L.Flatten(),
                                L.Dense(1)])
      with self.assertRaisesRegex(
          ValueError, f"layer 'drop' of class {type(layer).__name__}"):
        moments.moment_model(model)

  def test_one_random_tensor_twice_in_a_merge_is_refused(self):
    x_in = keras.Input((4,))
    d = L.Dropout(0.3)(L.Dense(4, "relu")(x_in))
    twice = keras.Model(x_in, L.Dense(1)(L.Subtract(name="sub")([d, d])))
    with self.assertRaisesRegex(
        ValueError, r"no merge that takes one tensor varying under dropout "
        r"twice.*"
        r"Received: model=\"layer 'sub' of class Subtract\""):
      moments.moment_model(twice)
    # A deterministic tensor twice (a square, also next to a random one)
    # and a residual are accepted.
    h = L.Dense(4, "relu")(x_in)
    square = L.Add()([L.Multiply()([h, h]), d, h, h])
    residual = L.Add()([square, L.Dropout(0.3)(L.Dense(4)(square))])
    model = keras.Model(x_in, L.Dense(1)(residual))
    got = moments.moment_propagation_variation(model, _inputs(8, 4))
    self.assertAllGreaterEqual(got, 0.0)
    self.assertGreater(float(np.mean(got)), 0.0)

  def test_an_op_on_keras_tensors_is_not_called_a_layer(self):
    x_in = keras.Input((4,))
    h = L.Dropout(0.3)(L.Dense(4, "relu")(x_in)) + 1.0
    with self.assertRaisesRegex(
        ValueError, r"of class Add \(the op of an expression on Keras "
        r"tensors, in keras\.src\.ops\.numpy; write it as a layer\)"):
      moments.moment_model(keras.Model(x_in, L.Dense(1)(h)))

  def test_inputs_are_read_as_every_step_reads_them(self):
    model = _mlp()
    x = _inputs(6)
    nan = x.copy()
    nan[2, 1] = np.nan
    for bad, message in [(nan, "Expected finite values"),
                         (x[:, :5], "Received: x=")]:
      with self.assertRaisesRegex(ValueError, message) as cm:
        moments.moment_propagation_variation(model, bad)
      self.assertStartsWith(str(cm.exception),
                            "Invalid value received for argument `x`")
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(4)
    self.assertAllClose(moments.moment_propagation_variation(model, dataset),
                        moments.moment_propagation_variation(model, x))

  def test_non_elementwise_activation_is_refused(self):
    model = keras.Sequential([keras.Input((4,)), L.Dropout(0.1),
                              L.Dense(4, "log_softmax", name="head")])
    with self.assertRaisesRegex(ValueError, "'log_softmax' in head"):
      moments.moment_model(model)

  def test_bad_statistic(self):
    with self.assertRaisesRegex(ValueError, BAD_STATISTIC_MSG):
      moments.moment_model(_mlp(), statistic="variance")

  def test_bad_batch_size(self):
    with self.assertRaisesRegex(ValueError, BAD_BATCH_MSG):
      moments.moment_propagation_variation(_mlp(), _inputs(2), batch_size=0)

  def test_bad_models(self):
    with self.assertRaisesRegex(ValueError, "Received: model=None"):
      moments.moment_model(None)
    no_dropout = keras.Sequential([keras.Input((3,)), L.Dense(1)])
    with self.assertRaisesRegex(ValueError, "without dropout sources"):
      moments.moment_model(no_dropout)
    x_in = keras.Input((3,))
    h = L.Dropout(0.1)(x_in)
    two_outputs = keras.Model(x_in, [L.Dense(1)(h), L.Dense(2)(h)])
    with self.assertRaisesRegex(ValueError, "one output of shape"):
      moments.moment_model(two_outputs)

    class Subclassed(keras.Model):

      def __init__(self):
        super().__init__()
        self.drop = L.Dropout(0.1)
        self.dense = L.Dense(1)

      def call(self, x):
        return self.dense(self.drop(x))

    subclassed = Subclassed()
    subclassed(np.zeros((1, 3), "float32"))
    with self.assertRaisesRegex(ValueError, "subclassed"):
      moments.moment_model(subclassed)


if __name__ == "__main__":
  tf.test.main()
