"""Tests for dropvar_tf.heads (add/strip_variation_head)."""

import os
import sys
import tempfile

import numpy as np

from dropvar_tf import contract
from dropvar_tf import heads
from dropvar_tf import sources
from dropvar_tf import targets
from dropvar_tf import training
from dropvar_tf import validation
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testing_models as tm

_PREFIX = "Invalid value received for argument "
_ERR_MODEL_NONE = (_PREFIX + "`model`. Expected a built Functional or "
                   "Sequential `keras.Model`. Received: model=None")
_ERR_MODEL_STR = (_PREFIX + "`model`. Expected a built Functional or "
                  "Sequential `keras.Model`. Received: model='str'")
_ERR_UNBUILT = (
    _PREFIX + "`model`. Expected a built model with defined inputs (start a "
    "Sequential model with `keras.Input(shape)` or call "
    "`model.build(input_shape)`). Received: model=\"unbuilt model "
    "'unbuilt'\"")
_ERR_NO_DROPOUT = (
    _PREFIX + "`model`. Expected a model with at least one dropout source "
    f"(dropout prediction variation needs dropout): {sources.SUPPORTED}. "
    "Received: model=\"model 'no_dropout' without dropout sources\"")
_ERR_HAS_HEAD = (
    _PREFIX + "`model`. Expected a model without a variation head (call "
    "`strip_variation_head` first to replace its head). Received: "
    "model=\"dual model 'mlp_softmax_dual'\"")
_ERR_FEATURES = (_PREFIX + "`features`. Expected one of ('auto', "
                 "'neurons', 'summary'). Received: features='mean'")
_ERR_TRANSFORM = (_PREFIX + "`transform`. Expected one of ('log', "
                  "'identity'). Received: transform='sqrt'")
_ERR_STATISTIC = (_PREFIX + "`statistic`. Expected one of ('auto', 'std', "
                  "'predicted_class_std', 'per_class_std'). Received: "
                  "statistic='var'")
_ERR_HIDDEN_ZERO = (_PREFIX + "`hidden_units`. Expected an integer >= 1. "
                    "Received: hidden_units=0")
_ERR_HIDDEN_TYPE = (_PREFIX + "`hidden_units`. Expected a list or tuple of "
                    "positive integers. Received: hidden_units={}")
_ERR_LAYERS_UNKNOWN = (
    _PREFIX + "`layers`. Expected names of layers of the model; candidates "
    "are ['dense_a', 'dense_b']. Received: layers=['nope']")
_ERR_LAYERS_EMPTY = (_PREFIX + "`layers`. Expected \"auto\", \"all\", "
                     "\"last\", or a non-empty list of layer names. "
                     "Received: layers=[]")
_ERR_LAYERS_INT = (_PREFIX + "`layers`. Expected \"auto\", \"all\", \"last\", "
                   "or a non-empty list of layer names. Received: layers=3")
_ERR_SHARED = (
    _PREFIX + "`layers`. Expected layers called exactly once in the model, "
    "with one output tensor (a shared layer has no single output to tap). "
    "Received: layers='shared'")
_ERR_STRIP_BASE = (_PREFIX + "`dual`. Expected a dual model made by "
                   "`add_variation_head`. Received: dual=\"model "
                   "'mlp_softmax' without a variation head\"")
_ERR_STRIP_NONE = (_PREFIX + "`dual`. Expected a dual model made by "
                   "`add_variation_head`. Received: dual=None")
_ERR_DELTA_NESTED = (
    _PREFIX + "`include_delta`. Expected a model whose output is a Dense "
    "layer right after a Dropout (or GaussianDropout) layer. Received: "
    "include_delta=\"the input "
    "of 'prob' does not come from a Dropout or GaussianDropout on (batch, "
    "units)\"")
_ERR_PRIOR = (_PREFIX + "`prior`. Expected one of (None, 'auto', 'delta', "
              "'moments'). Received: prior='mc'")
_ERR_DELTA_OFF = (_PREFIX + "`include_delta`. Expected True or \"auto\" "
                  "with prior=\"delta\" (that prior is the output-delta "
                  "feature). Received: include_delta=False")
_ERR_MOMENTS_CNN = "Received: model=\"layer 'sdrop' of class SpatialDropout2D\""

_CANDIDATES = {
    "softmax": ["dense_a", "dense_b"],
    # dense_a is linear and feeds BatchNormalization, not Dropout.
    "binary_bn": ["relu_a", "dense_b"],
    "regression": ["dense_a", "dense_b"],
    # Embeddings and Concatenate are linear and feed no Dropout.
    "recommender": ["dense_a"],
    "cnn": ["conv", "dense_a"],
    # A nested model is tapped as a whole.
    "nested": ["dense_a", "block"],
}

_SMALL_HEAD = dict(hidden_units=(8,))


def _predict(model, x):
  """Eager inference call (no tf.function tracing: faster for tiny models)."""
  return tf.nest.map_structure(np.asarray, model(x, training=False))


def _random_targets(n, seed=0, units=None):
  shape = (n,) if units is None else (n, units)
  return np.abs(np.random.default_rng(seed).normal(0.1, 0.05, shape))


class AddVariationHeadTest(tf.test.TestCase):

  def test_outputs_for_every_kind_of_model(self):
    for kind in tm.BUILDERS:
      with self.subTest(kind=kind):
        model = tm.build(kind)
        x = tm.sample_inputs(kind, 20)
        dual = heads.add_variation_head(model, **_SMALL_HEAD)
        self.assertTrue(heads.has_variation_head(dual))
        self.assertEqual(set(dual.output), set(contract.OUTPUT_KEYS))
        out = _predict(dual, x)
        self.assertEqual(set(out), set(contract.OUTPUT_KEYS))
        variation = out[contract.VARIATION_KEY]
        self.assertEqual(variation.shape, (20,))
        self.assertTrue(np.all(np.isfinite(variation)))
        self.assertTrue(np.all(variation >= 0))
        self.assertAllEqual(out[contract.PREDICTION_KEY], _predict(model, x))

  def test_dict_inputs_keep_their_names(self):
    model = tm.recommender()
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    self.assertEqual(set(dual.input), {"user_id", "movie_id"})
    self.assertEqual(dual.input["user_id"].dtype, "int64")

  def test_default_name_and_custom_name(self):
    model = tm.regression()
    self.assertEqual(heads.add_variation_head(model, **_SMALL_HEAD).name,
                     "regression_dual")
    self.assertEqual(
        heads.add_variation_head(model, name="mine", **_SMALL_HEAD).name,
        "mine")

  def test_head_is_not_compiled_and_base_compile_state_kept(self):
    model = tm.binary_bn()
    optimizer = keras.optimizers.SGD()
    model.compile(optimizer=optimizer, loss="binary_crossentropy")
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    training.fit_variation_head(dual, tm.sample_inputs("binary_bn", 40),
                                _random_targets(40), epochs=1)
    self.assertFalse(dual.compiled)
    self.assertIs(model.optimizer, optimizer)
    self.assertEqual(model.loss, "binary_crossentropy")

  def test_statistics_choose_output_shape(self):
    model = tm.mlp_softmax()
    x = tm.sample_inputs("softmax", 10)
    for statistic, shape in [("auto", (10,)), ("predicted_class_std", (10,)),
                             ("per_class_std", (10, tm.NUM_CLASSES)),
                             ("std", (10, tm.NUM_CLASSES))]:
      with self.subTest(statistic=statistic):
        dual = heads.add_variation_head(model, statistic=statistic,
                                        **_SMALL_HEAD)
        self.assertEqual(_predict(dual, x)["variation"].shape, shape)
    auto = heads.add_variation_head(model, **_SMALL_HEAD)
    self.assertEqual(heads.variation_head_metadata(auto)["statistic"],
                     "predicted_class_std")
    binary = heads.add_variation_head(tm.binary_bn(), **_SMALL_HEAD)
    self.assertEqual(heads.variation_head_metadata(binary)["statistic"],
                     "std")

  def test_same_seed_same_head_and_other_seed_differs(self):
    model = tm.regression()
    x = tm.sample_inputs("regression", 16)
    a = heads.add_variation_head(model, seed=3, **_SMALL_HEAD)
    b = heads.add_variation_head(model, seed=3, **_SMALL_HEAD)
    c = heads.add_variation_head(model, seed=4, **_SMALL_HEAD)
    self.assertAllEqual(_predict(a, x)["variation"],
                        _predict(b, x)["variation"])
    self.assertNotAllClose(_predict(a, x)["variation"],
                           _predict(c, x)["variation"])

  def test_metadata_before_fitting(self):
    dual = heads.add_variation_head(tm.mlp_softmax(), layers="last",
                                    features="summary", **_SMALL_HEAD)
    meta = heads.variation_head_metadata(dual)
    self.assertIsNone(meta["num_samples"])
    self.assertEqual(meta["layers"], ["dense_b"])
    self.assertEqual(meta["features"], "summary")
    self.assertEqual(meta["layer_features"], ["summary"])
    self.assertEqual(meta["transform"], "log")
    self.assertEqual(meta["base_model"], "mlp_softmax")
    self.assertEqual(meta["dropout_rates"], {"drop_a": 0.3, "drop_b": 0.3})
    self.assertTrue(meta["include_prediction"])
    self.assertEqual(meta["statistic"], "predicted_class_std")

  def test_dropout_rates_list_every_source_by_path(self):
    # Not only Dropout layers: attention, RNN (both kinds, told apart),
    # Gaussian and custom-layer dropout, by `sources.dropout_sources` path.
    cases = {
        "transformer": {"encoder/block_1/attention": 0.3,
                        "encoder/block_1/drop": 0.3, "top_drop": 0.1},
        "lstm": {"lstm/rnn_dropout": 0.3, "lstm/rnn_recurrent_dropout": 0.3},
        "gaussian": {"gdrop": 0.3},
        "custom_layer": {"block/dropout": 0.3},
    }
    for kind, expected in cases.items():
      with self.subTest(kind):
        meta = heads.variation_head_metadata(
            heads.add_variation_head(tm.source_model(kind), **_SMALL_HEAD))
        self.assertEqual(meta["dropout_rates"], expected)

  def test_summary_features_give_three_per_layer(self):
    dual = heads.add_variation_head(tm.mlp_softmax(), features="summary",
                                    include_prediction=False,
                                    **_SMALL_HEAD)
    for name in ("dense_a", "dense_b"):
      probe = dual.get_layer(heads.PROBE_PREFIX + name)
      self.assertEqual(tuple(probe.output.shape), (None, 3))

  def test_include_prediction_false_drops_its_features(self):
    dual = heads.add_variation_head(tm.regression(), include_prediction=False,
                                    **_SMALL_HEAD)
    names = [l.name for l in dual.layers]
    self.assertNotIn(heads.PREDICTION_FEATURES_NAME, names)
    self.assertFalse(
        heads.variation_head_metadata(dual)["include_prediction"])

  def test_include_moments(self):
    model = tm.mlp_softmax()
    dual = heads.add_variation_head(model, include_moments=True,
                                    **_SMALL_HEAD)
    self.assertTrue(heads.variation_head_metadata(dual)["include_moments"])
    x = tm.sample_inputs("softmax", 12)
    self.assertAllEqual(_predict(dual, x)["prediction"], _predict(model, x))
    # The default prior ("auto": the cheap delta) leaves the feature off.
    off = heads.add_variation_head(model, **_SMALL_HEAD)
    self.assertFalse(heads.variation_head_metadata(off)["include_moments"])
    # The moments prior feeds its feature too.
    on = heads.add_variation_head(model, prior=heads.PRIOR_MOMENTS,
                                  **_SMALL_HEAD)
    self.assertTrue(heads.variation_head_metadata(on)["include_moments"])

  def test_include_delta(self):
    for kind, include_delta, expected in [
        ("softmax", "auto", True), ("binary_bn", "auto", True),
        ("softmax", False, False), ("nested", "auto", False),
        ("cnn", True, True)]:
      with self.subTest(kind=kind, include_delta=include_delta):
        model = tm.build(kind)
        dual = heads.add_variation_head(model, include_delta=include_delta,
                                        **_SMALL_HEAD)
        self.assertEqual(heads.variation_head_metadata(dual)["include_delta"],
                         expected)
        names = [l.name for l in dual.layers]
        self.assertEqual(heads.DELTA_NAME in names, expected)
        if expected:
          # A copy of the output kernel, taken when the head is added.
          output_layer = model.layers[-1]
          self.assertAllEqual(dual.get_layer(heads.DELTA_NAME).kernel,
                              output_layer.kernel)

  def test_smoothed_delta_takes_the_earlier_plain_dropouts(self):
    # The inputs of the Dropouts and GaussianDropouts further down a
    # single-input path feed the smoothed prior; a merge ends the path, a
    # dropout on a rank-3 input (SpatialDropout1D) is not one, and the
    # linearised delta (a linear output) takes none, nor a delta that is
    # only a feature, nor one of several sigmoid units.
    def residual():
      keras.utils.set_random_seed(0)
      inputs = keras.Input((tm.NUM_FEATURES,))
      h = keras.layers.Dense(8, activation="relu", name="d0")(inputs)
      h = keras.layers.Dropout(0.2, name="drop0")(h)
      h = keras.layers.Add()([h, keras.layers.Dense(8, name="skip")(inputs)])
      h = keras.layers.Dense(6, activation="relu", name="d1")(h)
      h = keras.layers.Dropout(0.2, name="drop1")(h)
      h = keras.layers.Dense(5, activation="relu", name="d2")(h)
      h = keras.layers.Dropout(0.2, name="drop2")(h)
      return keras.Model(inputs, keras.layers.Dense(
          1, activation="sigmoid")(h))

    def spatial():
      keras.utils.set_random_seed(0)
      inputs = keras.Input((4, tm.NUM_FEATURES))
      h = keras.layers.SpatialDropout1D(0.2)(inputs)
      h = keras.layers.Flatten()(h)
      h = keras.layers.Dense(6, activation="relu")(h)
      h = keras.layers.Dropout(0.2)(h)
      return keras.Model(inputs, keras.layers.Dense(
          3, activation="softmax")(h))

    def gaussian():
      keras.utils.set_random_seed(0)
      inputs = keras.Input((tm.NUM_FEATURES,))
      h = keras.layers.Dense(7, activation="relu")(inputs)
      h = keras.layers.GaussianDropout(0.2)(h)
      h = keras.layers.Dense(6, activation="relu")(h)
      h = keras.layers.GaussianDropout(0.2)(h)
      return keras.Model(inputs, keras.layers.Dense(
          3, activation="softmax")(h))

    for name, model, want in [
        ("gaussian", gaussian(), (7,)),
        ("binary_bn", tm.binary_bn(), (16,)),
        ("softmax", tm.mlp_softmax(), (16,)),
        ("residual", residual(), (6,)), ("spatial", spatial(), ())]:
      with self.subTest(model=name):
        dual = heads.add_variation_head(model, **_SMALL_HEAD)
        layer = dual.get_layer(heads.DELTA_NAME)
        self.assertTrue(layer.smoothed)
        self.assertEqual(layer.earlier_dims, want)
        self.assertLen(heads.layer_input_tensors(dual, layer), 2 + len(want))
    dual = heads.add_variation_head(tm.regression(), **_SMALL_HEAD)
    self.assertEqual(dual.get_layer(heads.DELTA_NAME).earlier_dims, ())
    dual = heads.add_variation_head(tm.mlp_softmax(), prior=None,
                                    include_delta=True, **_SMALL_HEAD)
    self.assertEqual(dual.get_layer(heads.DELTA_NAME).earlier_dims, ())
    keras.utils.set_random_seed(0)
    inputs = keras.Input((tm.NUM_FEATURES,))
    h = keras.layers.Dropout(0.2)(keras.layers.Dense(
        7, activation="relu")(inputs))
    h = keras.layers.Dropout(0.2)(keras.layers.Dense(
        6, activation="relu")(h))
    several = keras.Model(inputs, keras.layers.Dense(
        3, activation="sigmoid")(h))
    dual = heads.add_variation_head(several, statistic="std", **_SMALL_HEAD)
    self.assertTrue(dual.get_layer(heads.DELTA_NAME).smoothed)
    self.assertEqual(dual.get_layer(heads.DELTA_NAME).earlier_dims, ())
    # A layer called with options ends the path: the fit could not replay it.

    class Scaled(keras.layers.Layer):

      def call(self, x, factor=1.0):
        return x * factor

    inputs = keras.Input((tm.NUM_FEATURES,))
    h = keras.layers.Dense(7, activation="relu")(inputs)
    h = keras.layers.Dropout(0.2)(h)
    h = keras.layers.Dense(6, activation="relu")(h)
    h = Scaled()(h, factor=2.0)
    h = keras.layers.Dropout(0.2)(h)
    optioned = keras.Model(inputs, keras.layers.Dense(
        1, activation="sigmoid")(h))
    dual = heads.add_variation_head(optioned, **_SMALL_HEAD)
    self.assertEqual(dual.get_layer(heads.DELTA_NAME).earlier_dims, ())

  def test_include_delta_true_without_dropout_before_output_raises(self):
    with self.assertRaises(ValueError) as cm:
      heads.add_variation_head(tm.nested(), include_delta=True, **_SMALL_HEAD)
    self.assertEqual(str(cm.exception), _ERR_DELTA_NESTED)

  def test_include_moments_true_on_unsupported_model_raises(self):
    with self.assertRaises(ValueError) as cm:
      heads.add_variation_head(tm.cnn(), include_moments=True, **_SMALL_HEAD)
    self.assertIn(_ERR_MOMENTS_CNN, str(cm.exception))

  def test_auto_prior_is_the_delta_where_the_model_has_one(self):
    inputs = keras.Input(tm.IMAGE_SHAPE)
    h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    h = keras.layers.SpatialDropout2D(0.3)(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    neither = keras.Model(inputs, keras.layers.Dense(3, "softmax")(h))
    for label, model, expected in [
        ("moments supported", tm.mlp_softmax(), heads.PRIOR_DELTA),
        ("spatial dropout", tm.cnn(), heads.PRIOR_DELTA),
        ("neither", neither, None)]:
      with self.subTest(label):
        dual = heads.add_variation_head(model, **_SMALL_HEAD)
        meta = heads.variation_head_metadata(dual)
        self.assertEqual(meta["prior"], expected)
        output = heads.variation_output_layer(dual)
        if expected is None:
          self.assertIsNone(meta["prior_bound"])
          self.assertIsNone(output.prior_bound)
        else:
          self.assertEqual(meta["prior_bound"], heads.DEFAULT_PRIOR_BOUND)
          self.assertEqual(len(heads.variation_head(dual).inputs),
                           len(heads.head_feature_tensors(dual)))

  def test_explicit_prior(self):
    model = tm.regression()
    delta = heads.add_variation_head(model, prior="delta", prior_bound=1.0,
                                     **_SMALL_HEAD)
    self.assertEqual(heads.variation_head_metadata(delta)["prior"], "delta")
    self.assertEqual(heads.variation_output_layer(delta).prior_bound, 1.0)
    with self.assertRaises(ValueError) as cm:
      heads.add_variation_head(model, prior="mc", **_SMALL_HEAD)
    self.assertEqual(str(cm.exception), _ERR_PRIOR)
    with self.assertRaises(ValueError) as cm:
      heads.add_variation_head(tm.nested(), prior="delta", **_SMALL_HEAD)
    self.assertEqual(str(cm.exception), _ERR_DELTA_NESTED)
    with self.assertRaises(ValueError) as cm:
      heads.add_variation_head(model, prior="delta", include_delta=False,
                               **_SMALL_HEAD)
    self.assertEqual(str(cm.exception), _ERR_DELTA_OFF)

  def test_sequential_built_with_build_works(self):
    model = keras.Sequential([
        keras.layers.Dense(8, activation="relu", name="dense_a"),
        keras.layers.Dropout(0.3), keras.layers.Dense(1)], name="later")
    model.build((None, tm.NUM_FEATURES))
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    x = tm.sample_inputs("regression", 8)
    self.assertAllEqual(_predict(dual, x)["prediction"], _predict(model, x))


class BaseUntouchedTest(tf.test.TestCase):

  def _check_untouched(self, kind):
    model = tm.build(kind)
    x = tm.sample_inputs(kind, 48)
    weights = tm.weights_snapshot(model)
    trainable = [v.trainable for v in model.weights]
    before = _predict(model, x)
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    training.fit_variation_head(dual, x, _random_targets(48), epochs=2,
                                batch_size=16)
    after = tm.weights_snapshot(model)
    self.assertEqual(set(after), set(weights))
    for path, value in weights.items():
      self.assertAllEqual(after[path], value, msg=path)
    self.assertEqual([v.trainable for v in model.weights], trainable)
    self.assertAllEqual(_predict(model, x), before)
    self.assertAllEqual(_predict(dual, x)["prediction"], before)

  def test_batchnorm_model_untouched_by_add_and_fit(self):
    self._check_untouched("binary_bn")

  def test_sequential_model_untouched_by_add_and_fit(self):
    self._check_untouched("softmax")

  def test_dict_input_model_untouched_by_add_and_fit(self):
    self._check_untouched("recommender")

  def test_fit_changes_only_head_weights(self):
    model = tm.binary_bn()
    x = tm.sample_inputs("binary_bn", 48)
    # MC targets (the prior is kept) and random ones (it may be silenced:
    # tests/training_test.py has a case where it must be).
    for kind, t in (
        ("mc", targets.mc_dropout_targets(model, x, num_samples=30, seed=0)),
        ("random", _random_targets(48))):
      with self.subTest(targets=kind):
        self._check_fit_changes_only_head_weights(model, x, t, kind == "mc")

  def test_head_variables_are_the_dual_s_less_the_base_s(self):
    model = tm.binary_bn()
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    head = {id(v) for v in heads.head_variables(dual)}
    base = {id(v) for v in model.variables}
    self.assertFalse(head & base)
    self.assertEqual(head | base, {id(v) for v in dual.variables})
    self.assertTrue({id(v) for v in heads.variation_head(dual).weights}
                    <= head)
    self.assertEqual(heads.head_variables(model), [])

  def _check_fit_changes_only_head_weights(self, model, x, t, kept):
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    head = heads.variation_head(dual)
    head_ids = {id(v) for v in head.weights}
    base_ids = {id(v) for v in model.weights}
    before = {id(v): np.array(v.numpy()) for v in dual.weights}
    training.fit_variation_head(dual, x, t, epochs=2, batch_size=16)
    changed = {id(v) for v in dual.weights
               if not np.array_equal(before[id(v)], v.numpy())}
    self.assertTrue(changed)
    self.assertEqual(changed & base_ids, set())
    # Besides the head, fit sets only the noise scale (and smoothing) and the
    # earlier-dropout sensitivities of the smoothed output-delta prior (and
    # zeroes its kernel copy and bias where it silences the prior) and the
    # range of the out-of-range signal the prior's correction shrinks with
    # (dual layers, not the base's): `heads.head_variables`.
    prior = heads.smoothed_prior_layer(dual)
    far = heads.out_of_range_layer(dual)
    self.assertIsNotNone(prior)
    self.assertLen(prior.sensitivities, 1)
    allowed = {id(prior.noise_scale), id(prior.smoothing),
               id(prior.sensitivities[0]), id(far.scale), id(far.offset)}
    silenced = heads.variation_head_metadata(dual)["prior_silenced"]
    if kept:
      self.assertFalse(silenced)
    # The metadata says what the prior's weights are.
    self.assertEqual(not np.any(prior.kernel.numpy()), silenced)
    if silenced:
      allowed |= {id(prior.kernel), id(prior.bias)}
      self.assertIn(id(prior.kernel), changed)
    else:
      self.assertIn(id(prior.sensitivities[0]), changed)
    self.assertLessEqual(changed - head_ids, allowed)
    self.assertLessEqual(changed, {id(v) for v in heads.head_variables(dual)})
    self.assertIn(id(far.scale), changed)
    self.assertIn(id(head.get_layer("head_out").kernel), changed)
    for v in model.trainable_weights:
      self.assertTrue(v.trainable, msg=v.path)


class LayerSelectionTest(tf.test.TestCase):

  def test_candidate_layers(self):
    for kind, expected in _CANDIDATES.items():
      with self.subTest(kind=kind):
        found = heads.candidate_layers(tm.build(kind))
        self.assertEqual([l.name for l in found], expected)

  def test_linear_layer_feeding_dropout_is_a_candidate(self):
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, name="linear_a")(inputs)
    h = keras.layers.Dropout(0.2)(h)
    h = keras.layers.Dense(8, name="linear_b")(h)
    outputs = keras.layers.Dense(1, name="out")(h)
    model = keras.Model(inputs, outputs)
    self.assertEqual([l.name for l in heads.candidate_layers(model)],
                     ["linear_a"])

  def test_layers_holding_a_source_or_a_nonlinearity_are_candidates(self):
    # Neither has an `activation`: a Bidirectional RNN, and a custom layer
    # whose blocks are a ReLU Dense and a Dropout (a source inside it).
    class Block(keras.layers.Layer):

      def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(8, activation="relu")
        self.drop = keras.layers.Dropout(0.3)

      def call(self, x, training=None):
        return self.drop(self.dense(x), training=training)

    class Linear(keras.layers.Layer):
      """Holds only a linear Dense: no candidate."""

      def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(8)

      def call(self, x):
        return self.dense(x)

    keras.utils.set_random_seed(0)
    seq = keras.Input((5, 3))
    rnn = keras.layers.Bidirectional(keras.layers.LSTM(
        4, dropout=0.2, recurrent_dropout=0.2), name="bi")(seq)
    bidirectional = keras.Model(seq, keras.layers.Dense(1, name="out")(rnn))
    flat = keras.Input((4,))
    h = Linear(name="linear")(flat)
    block = keras.Model(flat, keras.layers.Dense(1, name="out")(
        Block(name="block")(h)))
    for model, x, expected in [
        (bidirectional, np.random.default_rng(0).normal(
            size=(6, 5, 3)).astype("float32"), ["bi"]),
        (block, np.random.default_rng(0).normal(
            size=(6, 4)).astype("float32"), ["block"])]:
      with self.subTest(model=expected[0]):
        self.assertEqual([l.name for l in heads.candidate_layers(model)],
                         expected)
        dual = heads.add_variation_head(model, **_SMALL_HEAD)
        self.assertEqual(heads.variation_head_metadata(dual)["layers"],
                         expected)
        self.assertEqual(_predict(dual, x)["variation"].shape, (6,))

  def test_all_last_and_named_layers(self):
    model = tm.mlp_softmax()
    for layers, expected in [("all", ["dense_a", "dense_b"]),
                             ("last", ["dense_b"]),
                             (["dense_a"], ["dense_a"]),
                             ("dense_b", ["dense_b"]),
                             (("dense_b", "dense_a"), ["dense_b", "dense_a"])]:
      with self.subTest(layers=layers):
        dual = heads.add_variation_head(model, layers=layers, **_SMALL_HEAD)
        self.assertEqual(heads.variation_head_metadata(dual)["layers"],
                         expected)
        probes = [l.name for l in dual.layers
                  if l.name.startswith(heads.PROBE_PREFIX)]
        self.assertCountEqual(probes,
                              [heads.PROBE_PREFIX + n for n in expected])

  def test_probe_sees_the_tapped_layer_output(self):
    model = tm.cnn()
    dual = heads.add_variation_head(model, layers=["conv"], features="neurons",
                                    **_SMALL_HEAD)
    x = tm.sample_inputs("cnn", 6)
    probe = keras.Model(dual.input,
                        dual.get_layer(heads.PROBE_PREFIX + "conv").output)
    conv = keras.Model(model.input, model.get_layer("conv").output)
    self.assertAllClose(_predict(probe, x),
                        _predict(conv, x).mean(axis=(1, 2)), atol=1e-6)

  def test_nested_model_is_tapped_as_a_whole(self):
    dual = heads.add_variation_head(tm.nested(), layers="last",
                                    features="neurons", **_SMALL_HEAD)
    self.assertEqual(heads.variation_head_metadata(dual)["layers"], ["block"])
    self.assertEqual(
        tuple(dual.get_layer(heads.PROBE_PREFIX + "block").output.shape),
        (None, 12))

  def test_unknown_layer_name_raises(self):
    with self.assertRaises(ValueError) as cm:
      heads.add_variation_head(tm.mlp_softmax(), layers=["dense_a", "nope"])
    self.assertEqual(str(cm.exception), _ERR_LAYERS_UNKNOWN)

  def test_layers_that_are_not_hidden_cannot_be_tapped(self):
    model = tm.mlp_softmax()
    for layers, message in [
        (["dense_a", "dense_a"], "Expected layer names, each once. Received: "
         "layers=\"['dense_a', 'dense_a'] (repeated: ['dense_a'])\""),
        (["drop_a", "probs"], "Expected hidden layers or float inputs (not "
         "a Dropout, an output layer, whose prediction the head reads "
         "itself, or an integer or string input); candidates are "
         "['dense_a', 'dense_b']. Received: layers=['drop_a', 'probs']")]:
      with self.subTest(layers=layers):
        with self.assertRaises(ValueError) as cm:
          heads.add_variation_head(model, layers=layers)
        self.assertEqual(str(cm.exception), _PREFIX + "`layers`. " + message)
    ids = tm.target_model("dict")
    with self.assertRaisesRegex(ValueError, r"Received: layers=\['user_id'\]"):
      heads.add_variation_head(ids, layers=["user_id"])

  def test_a_float_input_can_be_tapped(self):
    model = tm.target_model("softmax")
    hidden = model.layers[1].name
    dual = heads.add_variation_head(model, layers=["features", hidden],
                                    features="summary")
    self.assertEqual(heads.variation_head_metadata(dual)["layers"],
                     ["features", hidden])
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    self.assertAllClose(dual.predict(x, verbose=0)["prediction"],
                        model.predict(x, verbose=0))

  def test_shared_layer_cannot_be_tapped(self):
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, activation="relu", name="shared")
    h = keras.layers.Dropout(0.2)(shared(shared(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    with self.assertRaises(ValueError) as cm:
      heads.add_variation_head(model, layers=["shared"])
    self.assertEqual(str(cm.exception), _ERR_SHARED)

  def test_bad_layers_argument_raises(self):
    for layers, message in [([], _ERR_LAYERS_EMPTY), (3, _ERR_LAYERS_INT)]:
      with self.subTest(layers=layers):
        with self.assertRaises(ValueError) as cm:
          heads.add_variation_head(tm.mlp_softmax(), layers=layers)
        self.assertEqual(str(cm.exception), message)

  def test_candidate_layers_validates_model(self):
    with self.assertRaises(ValueError) as cm:
      heads.candidate_layers(None)
    self.assertEqual(str(cm.exception), _ERR_MODEL_NONE)
    # A subclassed model's candidates are the layers its `call` calls.
    subclassed = tm.subclassed()
    self.assertEqual(heads.candidate_layers(subclassed), [subclassed.dense])
    # Listing candidates needs no Dropout.
    self.assertEqual([l.name for l in heads.candidate_layers(tm.no_dropout())],
                     ["dense_a"])


class InvalidArgumentsTest(tf.test.TestCase):

  def _assert_error(self, message, model, **kwargs):
    with self.assertRaises(ValueError) as cm:
      heads.add_variation_head(model, **kwargs)
    self.assertEqual(str(cm.exception), message)

  def test_invalid_models(self):
    dual = heads.add_variation_head(tm.mlp_softmax(), **_SMALL_HEAD)
    cases = [
        ("none", _ERR_MODEL_NONE, None),
        ("not_keras", _ERR_MODEL_STR, "model"),
        ("unbuilt", _ERR_UNBUILT, tm.unbuilt()),
        ("no_dropout", _ERR_NO_DROPOUT, tm.no_dropout()),
        ("has_head", _ERR_HAS_HEAD, dual),
    ]
    for label, message, model in cases:
      with self.subTest(label):
        self._assert_error(message, model)

  def test_invalid_options(self):
    model = tm.mlp_softmax()
    cases = [
        (_ERR_FEATURES, {"features": "mean"}),
        (_ERR_TRANSFORM, {"transform": "sqrt"}),
        (_ERR_STATISTIC, {"statistic": "var"}),
        (_ERR_HIDDEN_ZERO, {"hidden_units": (8, 0)}),
        (_PREFIX + "`head_dropout`. Expected a rate in [0, 1). Received: "
         "head_dropout=1.5", {"head_dropout": 1.5}),
        (_PREFIX + "`l2`. Expected a number >= 0 (or None). Received: "
         "l2=-0.1", {"l2": -0.1}),
        (_PREFIX + "`seed`. Expected an integer >= 0. Received: seed=-1",
         {"seed": -1}),
    ]
    for message, kwargs in cases:
      with self.subTest(**kwargs):
        self._assert_error(message, model, **kwargs)

  def test_hidden_units_not_a_sequence(self):
    for bad in (8, None, "8"):
      with self.subTest(hidden_units=bad):
        self._assert_error(_ERR_HIDDEN_TYPE.format(repr(bad)),
                           tm.mlp_softmax(), hidden_units=bad)

  def test_input_model_unchanged_after_refusal(self):
    model = tm.mlp_softmax()
    names = [l.name for l in model.layers]
    with self.assertRaises(ValueError):
      heads.add_variation_head(model, features="mean")
    self.assertEqual([l.name for l in model.layers], names)
    self.assertFalse(heads.has_variation_head(model))


class StripVariationHeadTest(tf.test.TestCase):

  def test_strip_gives_base_predictions(self):
    for kind in ("softmax", "recommender", "nested"):
      with self.subTest(kind=kind):
        model = tm.build(kind)
        x = tm.sample_inputs(kind, 16)
        dual = heads.add_variation_head(model, **_SMALL_HEAD)
        plain = heads.strip_variation_head(dual)
        self.assertFalse(heads.has_variation_head(plain))
        self.assertEqual(plain.name, model.name)
        self.assertEqual(len(plain.outputs), 1)
        self.assertAllEqual(_predict(plain, x), _predict(model, x))

  def test_strip_then_add_again(self):
    model = tm.regression()
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    again = heads.add_variation_head(heads.strip_variation_head(dual),
                                     **_SMALL_HEAD)
    x = tm.sample_inputs("regression", 8)
    self.assertAllEqual(_predict(again, x)["prediction"], _predict(model, x))
    self.assertEqual(heads.variation_head_metadata(again)["layers"],
                     ["dense_a", "dense_b"])

  def test_strip_refuses_models_without_head(self):
    for model, message in [(tm.mlp_softmax(), _ERR_STRIP_BASE),
                           (None, _ERR_STRIP_NONE)]:
      with self.subTest(message=message):
        with self.assertRaises(ValueError) as cm:
          heads.strip_variation_head(model)
        self.assertEqual(str(cm.exception), message)

  def test_metadata_refuses_models_without_head(self):
    with self.assertRaises(ValueError) as cm:
      heads.variation_head_metadata(tm.mlp_softmax())
    self.assertEqual(str(cm.exception), _ERR_STRIP_BASE)


class AfterMcDropoutTest(tf.test.TestCase):
  """mc_dropout_model clones the graph reusing layers: taps must still work."""

  def test_add_head_after_targets_on_base(self):
    for kind in ("softmax", "nested"):
      with self.subTest(kind=kind):
        model = tm.build(kind)
        x = tm.sample_inputs(kind, 32)
        t = targets.mc_dropout_targets(model, x, num_samples=4, seed=0,
                                       progress=False)
        dual = heads.add_variation_head(model, **_SMALL_HEAD)
        self.assertEqual(heads.variation_head_metadata(dual)["layers"],
                         _CANDIDATES[kind])
        training.fit_variation_head(dual, x, t, epochs=1)
        out = _predict(dual, x)
        self.assertAllEqual(out["prediction"], _predict(model, x))
        self.assertTrue(np.all(np.isfinite(out["variation"])))

  def test_targets_between_add_and_fit(self):
    model = tm.regression()
    x = tm.sample_inputs("regression", 32)
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    t = targets.mc_dropout_targets(model, x, num_samples=4, seed=0,
                                   progress=False)
    training.fit_variation_head(dual, x, t, epochs=1)
    plain = heads.strip_variation_head(dual)
    self.assertAllEqual(_predict(plain, x), _predict(model, x))
    second = heads.add_variation_head(model, **_SMALL_HEAD)
    self.assertEqual(heads.variation_head_metadata(second)["layers"],
                     ["dense_a", "dense_b"])


class SaveLoadTest(tf.test.TestCase):

  def _round_trip(self, dual, x):
    path = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()), "dual.keras")
    dual.save(path)
    loaded = keras.saving.load_model(path)
    before, after = _predict(dual, x), _predict(loaded, x)
    self.assertEqual(set(after), set(contract.OUTPUT_KEYS))
    for key in contract.OUTPUT_KEYS:
      self.assertAllEqual(after[key], before[key], msg=key)
    self.assertEqual(heads.variation_head_metadata(loaded),
                     heads.variation_head_metadata(dual))
    return loaded

  def test_round_trip_unfitted(self):
    for kind in tm.BUILDERS:
      with self.subTest(kind=kind):
        dual = heads.add_variation_head(tm.build(kind), **_SMALL_HEAD)
        self._round_trip(dual, tm.sample_inputs(kind, 16))

  def test_round_trip_after_fit(self):
    for kind in ("binary_bn", "recommender"):
      with self.subTest(kind=kind):
        model = tm.build(kind)
        x = tm.sample_inputs(kind, 48)
        dual = heads.add_variation_head(model, **_SMALL_HEAD)
        training.fit_variation_head(dual, x, _random_targets(48), epochs=2,
                                    num_samples=7)
        loaded = self._round_trip(dual, x)
        self.assertEqual(
            heads.variation_head_metadata(loaded)["num_samples"], 7)
        out_layer = heads.variation_output_layer(loaded)
        self.assertAllEqual(out_layer.scale.numpy(),
                            heads.variation_output_layer(dual).scale.numpy())
        plain = heads.strip_variation_head(loaded)
        self.assertEqual(plain.name, model.name)
        self.assertAllEqual(_predict(plain, x), _predict(model, x))

  def test_round_trip_with_moments(self):
    dual = heads.add_variation_head(tm.mlp_softmax(), include_moments=True,
                                    **_SMALL_HEAD)
    self._round_trip(dual, tm.sample_inputs("softmax", 16))


class XlaTest(tf.test.TestCase):
  """Keras compiles with XLA by default on GPUs: each head op needs a kernel."""

  def test_dual_model_compiles_with_xla_and_matches_graph_mode(self):
    for kind in tm.BUILDERS:
      for features in ("summary", "neurons"):
        with self.subTest(kind=kind, features=features):
          dual = heads.add_variation_head(tm.build(kind), features=features)
          x = tm.sample_inputs(kind, 8)
          xla = tf.function(lambda x, m=dual: m(x, training=False),
                            jit_compile=True)(x)
          eager = _predict(dual, x)
          for key in contract.OUTPUT_KEYS:
            self.assertAllClose(xla[key], eager[key], rtol=1e-4, atol=1e-6)


class HeadFeaturesTest(tf.test.TestCase):

  def test_auto_statistic_follows_the_output_kind(self):
    resolve = validation.resolve_statistic
    self.assertEqual(resolve("auto", 1), "std")
    self.assertEqual(resolve("auto", 1, probabilities=False), "std")
    self.assertEqual(resolve("auto", 3), "predicted_class_std")
    self.assertEqual(resolve("auto", 3, probabilities=False), "per_class_std")
    self.assertEqual(resolve("std", 3, probabilities=False), "std")

  def test_linear_multi_output_model_gets_a_std_per_output(self):
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu")(inputs)
    h = keras.layers.Dropout(0.3)(h)
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    self.assertFalse(dual.get_layer(
        heads.PREDICTION_FEATURES_NAME).probabilities)
    self.assertEqual(heads.variation_head_metadata(dual)["statistic"],
                     contract.STAT_PER_CLASS_STD)
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32") * 5
    feats = training.head_features(dual, x)
    self.assertTrue(all(np.all(np.isfinite(f)) for f in feats))
    # "auto" resolves the same way for the targets, so they fit the head.
    t = targets.mc_dropout_targets(model, x, num_samples=8, progress=False)
    self.assertEqual(t.shape, (32, 2))
    training.fit_variation_head(dual, x, t, epochs=2)
    out = _predict(dual, x)["variation"]
    self.assertEqual(out.shape, (32, 2))
    self.assertTrue(np.all(np.isfinite(out)) and np.all(out >= 0))
    self.assertTrue(heads.add_variation_head(tm.mlp_softmax()).get_layer(
        heads.PREDICTION_FEATURES_NAME).probabilities)

  def test_mixed_float16_policy_gives_finite_features(self):
    keras.mixed_precision.set_global_policy("mixed_float16")
    self.addCleanup(keras.mixed_precision.set_global_policy, "float32")
    inputs = keras.Input((8,))
    # 2048 units of value 8: a float16 sum of squares (131072) overflows.
    h = keras.layers.Dense(2048, activation="relu", kernel_initializer="ones",
                           name="wide")(inputs)
    h = keras.layers.Dropout(0.3)(h)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32",
                                 kernel_initializer="zeros")(h)
    dual = heads.add_variation_head(keras.Model(inputs, outputs))
    x = np.ones((3, 8), "float32")
    feats = training.head_features(dual, x)
    self.assertTrue(all(np.all(np.isfinite(f)) for f in feats))
    self.assertAllClose(feats[0][0], [8.0, 8.0 * np.sqrt(2048.0), 1.0],
                        rtol=1e-3)
    out = _predict(dual, x)
    self.assertTrue(np.all(np.isfinite(out["variation"])))



if __name__ == "__main__":
  tf.test.main()
