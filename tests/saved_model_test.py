"""Tests for dropvar_tf.saved_model (SavedModel export for TF Serving)."""

import json
import os
import re
import tempfile
from unittest import mock

import numpy as np
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2

from dropvar_tf import contract
from dropvar_tf import export_checks
from dropvar_tf import heads
from dropvar_tf import saved_model
from dropvar_tf import targets
from dropvar_tf import training
from dropvar_tf._keras import keras, tf

# Expected error messages, stored once.
BAD_VERSION = ("Invalid value received for argument `version`. Expected an "
               "integer >= 1. Received: version={}")
NOT_A_MODEL = ("Invalid value received for argument `dual`. Expected a built "
               "Functional or Sequential `keras.Model`. Received: dual={}")
NOT_DUAL = ("Invalid value received for argument `dual`. Expected a dual model "
            "whose outputs are a dict with keys ['prediction', 'variation'] "
            "or `contract.output_keys(names)` (build it with "
            "`dropvar_tf.add_variation_head`). Received: "
            "dual=\"model {!r} with outputs {}\"")
WARMUP = "Invalid value received for argument `warmup_examples`. Expected "
PY_OPS = ("The exported graph cannot run on a stock TF Serving: it uses ops "
          "that call Python (absent from TF Serving): ['EagerPyFunc']")


def make_dual(kind="float", rate=0.3, seed=0, dropout=True):
  """Builds a tiny dual model with dict outputs {"prediction", "variation"}.

  kind: "float" (one float input "features", shape (N, 4)), "ids" (dict
  int64 inputs "user_id", "movie_id", shape (N,)), "list" (two float inputs
  given as a list), "linear" (Dropout on the 16 inputs then one Dense unit,
  for analytic checks), "py_function" (a layer that calls tf.py_function),
  "no_xla" (a layer with an op XLA has no kernel for).
  """
  keras.utils.set_random_seed(seed)
  layers = keras.layers
  if kind == "ids":
    user = keras.Input(shape=(), dtype="int64", name="user_id")
    movie = keras.Input(shape=(), dtype="int64", name="movie_id")
    h = layers.Concatenate()([layers.Embedding(20, 4)(user),
                              layers.Embedding(30, 4)(movie)])
    inputs = {"user_id": user, "movie_id": movie}
  elif kind == "list":
    a = keras.Input(shape=(3,), name="left")
    b = keras.Input(shape=(2,), name="right")
    h = layers.Concatenate()([a, b])
    inputs = [a, b]
  elif kind == "linear":
    inputs = keras.Input(shape=(16,), name="features")
    h = inputs
  else:
    inputs = keras.Input(shape=(4,), name="features")
    h = inputs
    if kind == "py_function":
      h = PyFunctionLayer()(h)
    elif kind == "no_xla":
      h = NormalizeLayer()(h)
  if kind != "linear":
    h = layers.Dense(8, activation="relu")(h)
  if dropout:
    h = layers.Dropout(rate, name="base_dropout")(h)
  prediction = layers.Dense(1, name="out")(h)
  variation = layers.Dense(1, activation="softplus", name="var")(
      layers.Concatenate()([h, prediction]))
  return keras.Model(inputs, {contract.PREDICTION_KEY: prediction,
                              contract.VARIATION_KEY: variation})


class PyFunctionLayer(keras.layers.Layer):
  """Doubles its input through Python: not runnable by TF Serving."""

  def call(self, inputs):
    out = tf.py_function(lambda t: t * 2.0, [inputs], tf.float32)
    out.set_shape(inputs.shape)
    return out

  def compute_output_shape(self, input_shape):
    return input_shape


class NormalizeLayer(keras.layers.Layer):
  """Divides rows by 1 + their L2 norm via EuclideanNorm: no XLA kernel."""

  def call(self, inputs):
    return inputs / (1.0 + tf.math.reduce_euclidean_norm(
        inputs, axis=-1, keepdims=True))


def float_examples(n, seed=0, width=4):
  return np.random.RandomState(seed).randn(n, width).astype("float32")


def id_examples(n, seed=0):
  rng = np.random.RandomState(seed)
  return {"user_id": rng.randint(0, 20, size=n).astype("int64"),
          "movie_id": rng.randint(0, 30, size=n).astype("int64")}


def fresh_dir(test):
  """A new empty folder under the test's temp dir (works under pytest)."""
  return tempfile.mkdtemp(dir=test.get_temp_dir())


def signature_inputs(signature):
  return signature.structured_input_signature[1]


class ExportSavedModelTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.base = os.path.join(fresh_dir(self), "model")

  def entries(self):
    return sorted(os.listdir(self.base)) if os.path.isdir(self.base) else []

  def test_reload_with_other_batch_size_matches_predict(self):
    dual = make_dual("float")
    path = saved_model.export_saved_model(dual, self.base)
    self.assertEqual(path, os.path.join(self.base, "1"))
    self.assertEqual(self.entries(), ["1"])
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures[contract.SERVING_SIGNATURE]
    self.assertEqual(set(serve.structured_outputs), set(contract.OUTPUT_KEYS))
    spec = signature_inputs(serve)["features"]
    self.assertEqual(spec.shape.as_list(), [None, 4])
    for batch in (1, 7):
      x = float_examples(batch, seed=batch)
      got = serve(features=tf.constant(x))
      want = dual.predict(x, verbose=0)
      self.assertEqual(set(got), set(contract.OUTPUT_KEYS))
      for key in contract.OUTPUT_KEYS:
        self.assertAllClose(got[key], want[key], rtol=1e-5, atol=1e-6)

  def test_dropout_is_off_in_served_graph(self):
    dual = make_dual("float", rate=0.5)
    serve = tf.saved_model.load(saved_model.export_saved_model(
        dual, self.base)).signatures[contract.SERVING_SIGNATURE]
    x = tf.constant(float_examples(16))
    first, second = serve(features=x), serve(features=x)
    for key in contract.OUTPUT_KEYS:
      self.assertAllEqual(first[key], second[key])
    # With dropout at 0.5 a training-mode pass would differ from this one.
    training = dual(x, training=True)[contract.PREDICTION_KEY]
    self.assertNotAllClose(training, first[contract.PREDICTION_KEY])

  def test_int64_dict_inputs_keep_names_and_dtypes(self):
    dual = make_dual("ids")
    serve = tf.saved_model.load(saved_model.export_saved_model(
        dual, self.base)).signatures[contract.SERVING_SIGNATURE]
    specs = signature_inputs(serve)
    self.assertEqual(sorted(specs), ["movie_id", "user_id"])
    for spec in specs.values():
      self.assertEqual(spec.dtype, tf.int64)
      self.assertEqual(spec.shape.as_list(), [None])
    x = id_examples(5)
    got = serve(**{k: tf.constant(v) for k, v in x.items()})
    want = dual.predict(x, verbose=0)
    for key in contract.OUTPUT_KEYS:
      self.assertAllClose(got[key], want[key], rtol=1e-5, atol=1e-6)

  def test_list_inputs_named_by_keras_input_names(self):
    dual = make_dual("list")
    serve = tf.saved_model.load(saved_model.export_saved_model(
        dual, self.base)).signatures[contract.SERVING_SIGNATURE]
    self.assertEqual(sorted(signature_inputs(serve)), ["left", "right"])
    a, b = float_examples(3, width=3), float_examples(3, seed=1, width=2)
    got = serve(left=tf.constant(a), right=tf.constant(b))
    want = dual.predict([a, b], verbose=0)
    self.assertAllClose(got[contract.PREDICTION_KEY],
                        want[contract.PREDICTION_KEY], rtol=1e-5, atol=1e-6)

  def test_versions_increase_and_are_never_overwritten(self):
    dual = make_dual("float")
    self.assertEqual(saved_model.export_saved_model(dual, self.base),
                     os.path.join(self.base, "1"))
    self.assertEqual(saved_model.export_saved_model(dual, self.base, 5),
                     os.path.join(self.base, "5"))
    self.assertEqual(saved_model.export_saved_model(dual, self.base),
                     os.path.join(self.base, "6"))
    before = os.path.getmtime(os.path.join(self.base, "5", "saved_model.pb"))
    with self.assertRaisesRegex(FileExistsError,
                                "Version 5 already exists.*never overwritten"):
      saved_model.export_saved_model(dual, self.base, version=5)
    self.assertEqual(self.entries(), ["1", "5", "6"])
    after = os.path.getmtime(os.path.join(self.base, "5", "saved_model.pb"))
    self.assertEqual(before, after)
    self.assertEqual(saved_model.existing_versions(self.base), [1, 5, 6])

  def test_bad_versions_are_refused(self):
    dual = make_dual("float")
    for version, shown in ((0, "0"), (-3, "-3"), ("2", "'2'"), (1.5, "1.5"),
                           (True, "True")):
      with self.assertRaisesRegex(ValueError,
                                  re.escape(BAD_VERSION.format(shown))):
        saved_model.export_saved_model(dual, self.base, version=version)
    self.assertEqual(self.entries(), [])

  def test_versions_stay_within_int64_and_files_take_their_names(self):
    dual = make_dual("float")
    with self.assertRaisesWithLiteralMatch(
        ValueError, "Invalid value received for argument `version`. Expected "
        "an integer in [1, 2**63 - 1] (TF Serving's versions are int64). "
        "Received: version=9223372036854775808"):
      saved_model.export_saved_model(dual, self.base, version=2**63)
    # A plain file named 1 is in the way of version 1: the next is 2.
    os.makedirs(self.base)
    with open(os.path.join(self.base, "1"), "w") as f:
      f.write("not a version")
    self.assertEqual(saved_model.export_saved_model(dual, self.base),
                     os.path.join(self.base, "2"))
    os.makedirs(os.path.join(self.base, str(2**63 - 1)))
    with self.assertRaisesRegex(ValueError, re.escape(
        f"Expected an explicit free version: the next after '{self.base}'/"
        f"{2**63 - 1} is above TF Serving's largest (2**63 - 1)")):
      saved_model.export_saved_model(dual, self.base)

  def test_export_base_that_cannot_be_written_is_refused_first(self):
    dual = make_dual("float")
    afile = os.path.join(self.base + "_file")
    with open(afile, "w") as f:
      f.write("x")
    with self.assertRaisesWithLiteralMatch(
        ValueError, "Invalid value received for argument `export_base`. "
        f"Expected a directory path. Received: export_base=\"'{afile}/sub' "
        f"(under the file '{afile}')\""):
      saved_model.export_saved_model(dual, os.path.join(afile, "sub"))
    dangling = self.base + "_link"
    os.symlink(os.path.join(self.base, "nowhere"), dangling)
    with self.assertRaisesRegex(ValueError, re.escape(
        f"Received: export_base=\"'{dangling}' (a symlink to nothing)\"")):
      saved_model.export_saved_model(dual, dangling)
    # A read-only mount (as root, permissions alone do not stop writes).
    with mock.patch.object(export_checks.os, "access", return_value=False), \
        mock.patch.object(saved_model, "_build_archive") as build:
      with self.assertRaisesRegex(ValueError, re.escape(
          f"Expected a directory this process can write in. Received: "
          f"export_base=\"'{self.base}' (")):
        saved_model.export_saved_model(dual, self.base)
    build.assert_not_called()

  def test_a_full_disk_while_writing_metadata_names_the_file(self):
    path = os.path.join(self.get_temp_dir(), "assets", "metadata.json")
    with mock.patch.object(saved_model.json, "dump",
                           side_effect=OSError(28, "No space left on device")):
      with self.assertRaises(OSError) as cm:
        saved_model._write_json(path, {"a": 1})
    self.assertEqual((cm.exception.errno, cm.exception.filename), (28, path))
    self.assertEqual(str(cm.exception),
                     f"[Errno 28] No space left on device: '{path}'")

  def test_invalid_dual_is_refused(self):
    with self.assertRaisesRegex(ValueError,
                                re.escape(NOT_A_MODEL.format("None"))):
      saved_model.export_saved_model(None, self.base)
    with self.assertRaisesRegex(ValueError,
                                re.escape(NOT_A_MODEL.format("'str'"))):
      saved_model.export_saved_model("model.keras", self.base)
    x = keras.Input(shape=(4,), name="features")
    y = keras.layers.Dense(1)(keras.layers.Dropout(0.2)(x))
    plain = keras.Model(x, y, name="plain")
    with self.assertRaisesRegex(
        ValueError, re.escape(NOT_DUAL.format("plain", "1 unnamed output(s)"))):
      saved_model.export_saved_model(plain, self.base)
    wrong_keys = keras.Model(x, {"prediction": y, "std": y}, name="wrong")
    with self.assertRaisesRegex(
        ValueError,
        re.escape(NOT_DUAL.format("wrong", "['prediction', 'std']"))):
      saved_model.export_saved_model(wrong_keys, self.base)
    self.assertEqual(self.entries(), [])

  def test_other_bad_arguments_are_refused(self):
    dual = make_dual("float")
    with self.assertRaisesRegex(ValueError, "argument `mc_num_samples`. "
                                "Expected an integer >= 2. Received: "
                                "mc_num_samples=1"):
      saved_model.export_saved_model(dual, self.base, mc_num_samples=1)
    with self.assertRaisesRegex(ValueError, "argument `metadata`. Expected a "
                                "JSON-serializable dict"):
      saved_model.export_saved_model(dual, self.base,
                                     metadata={"bad": object()})
    with self.assertRaisesRegex(ValueError, "argument `metadata`. Expected a "
                                "'statistic' in"):
      saved_model.export_saved_model(dual, self.base,
                                     metadata={"statistic": "variance"})
    with self.assertRaisesRegex(ValueError, "argument `export_base`"):
      saved_model.export_saved_model(dual, "")
    no_dropout = make_dual("float", dropout=False)
    with self.assertRaisesRegex(ValueError, "argument `mc_num_samples`. "
                                "Expected None for a model without dropout "
                                "sources"):
      saved_model.export_saved_model(no_dropout, self.base, mc_num_samples=4)
    self.assertEqual(self.entries(), [])

  def test_warmup_examples_must_match_inputs(self):
    ids = make_dual("ids")
    good = id_examples(4)
    cases = [
        (good["user_id"], "a dict of arrays keyed by the input names"),
        ({"user_id": good["user_id"]}, "missing ['movie_id']"),
        (dict(good, rating=good["user_id"]), "unexpected ['rating']"),
        (dict(good, user_id=good["user_id"].astype("float32")),
         "input 'user_id' of dtype int64. Received: "
         "warmup_examples='array of dtype float32'"),
        (dict(good, movie_id=good["movie_id"][:, None]),
         "input 'movie_id' of shape [None]"),
        (dict(good, movie_id=good["movie_id"][:2]),
         "input 'movie_id' with 2 examples (others have 4)"),
        ({k: v[:0] for k, v in good.items()}, "a non-empty batch"),
    ]
    for examples, message in cases:
      pattern = re.escape(WARMUP) + ".*" + re.escape(message)
      with self.assertRaisesRegex(ValueError, pattern):
        saved_model.export_saved_model(ids, self.base, warmup_examples=examples)
    with self.assertRaisesRegex(ValueError, re.escape(
        "input 'features' of shape [None, 4]")):
      saved_model.export_saved_model(make_dual("float"), self.base,
                                     warmup_examples=float_examples(3, width=5))
    nan = float_examples(3)
    nan[1, 2] = np.nan
    nan[2, 0] = -np.inf
    message = ("finite values (no NaN or Inf). Received: warmup_examples="
               "\"2 of 3 rows of input 'features' with NaN or Inf values\"")
    with self.assertRaisesRegex(ValueError,
                                re.escape(WARMUP) + ".*" + re.escape(message)):
      saved_model.export_saved_model(make_dual("float"), self.base,
                                     warmup_examples=nan)
    self.assertEqual(self.entries(), [])

  def test_warmup_records_replay_through_loaded_signature(self):
    dual = make_dual("ids")
    examples = id_examples(10, seed=3)
    path = saved_model.export_saved_model(dual, self.base,
                                          warmup_examples=examples)
    filename = os.path.join(path, "assets.extra", "tf_serving_warmup_requests")
    serve = tf.saved_model.load(path).signatures[contract.SERVING_SIGNATURE]
    want = dual.predict(examples, verbose=0)
    row = 0
    records = list(tf.data.TFRecordDataset(filename).as_numpy_iterator())
    self.assertLen(records, 4)
    for record in records:
      log = prediction_log_pb2.PredictionLog.FromString(record)
      request = log.predict_log.request
      self.assertEqual(request.model_spec.signature_name,
                       contract.SERVING_SIGNATURE)
      self.assertEqual(sorted(request.inputs), ["movie_id", "user_id"])
      inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
      self.assertEqual(inputs["user_id"].dtype, np.int64)
      n = len(inputs["user_id"])
      self.assertAllEqual(inputs["user_id"],
                          examples["user_id"][row:row + n])
      got = serve(**{k: tf.constant(v) for k, v in inputs.items()})
      self.assertAllClose(got[contract.VARIATION_KEY],
                          want[contract.VARIATION_KEY][row:row + n],
                          rtol=1e-5, atol=1e-6)
      row += n
    self.assertEqual(row, 10)
    self.assertEqual(saved_model.read_export_metadata(path)["warmup_requests"],
                     4)

  def test_metadata_asset_and_signature_agree(self):
    dual = make_dual("float", rate=0.25)
    path = saved_model.export_saved_model(
        dual, self.base, metadata={"statistic": "std", "num_samples": 30})
    from_base = saved_model.read_export_metadata(self.base)
    from_path = saved_model.read_export_metadata(path)
    self.assertEqual(from_base, from_path)
    signature = tf.saved_model.load(path).signatures["metadata"]
    from_signature = json.loads(
        signature()[saved_model.METADATA_OUTPUT_KEY].numpy().decode("utf-8"))
    self.assertEqual(from_signature, from_path)
    head = from_path["variation_head"]
    self.assertEqual(head["dropout_rates"], {"base_dropout": 0.25})
    self.assertEqual(head["statistic"], "std")
    self.assertEqual(head["num_samples"], 30)
    self.assertEqual(from_path["output_keys"], list(contract.OUTPUT_KEYS))
    self.assertEqual(from_path["inputs"], [
        {"name": "features", "dtype": "float32", "shape": [None, 4]}])
    self.assertEqual(from_path["signatures"],
                     [contract.SERVING_SIGNATURE, "metadata"])
    self.assertIsNone(from_path["mc_dropout"])
    self.assertEqual(from_path["dropvar_tf_version"],
                     __import__("dropvar_tf").__version__)
    with self.assertRaisesRegex(FileNotFoundError, "no numeric version"):
      saved_model.read_export_metadata(fresh_dir(self))

  def test_head_metadata_of_a_dual_from_add_variation_head(self):
    keras.utils.set_random_seed(1)
    x = keras.Input(shape=(4,), name="features")
    h = keras.layers.Dense(8, activation="relu", name="hidden")(x)
    h = keras.layers.Dropout(0.2, name="drop")(h)
    base = keras.Model(x, keras.layers.Dense(1, name="y")(h), name="base")
    dual = heads.add_variation_head(base)
    path = saved_model.export_saved_model(dual, self.base)
    head = saved_model.read_export_metadata(path)["variation_head"]
    self.assertEqual(head, heads.variation_head_metadata(dual))
    self.assertEqual(head["statistic"], contract.STAT_STD)
    self.assertEqual(head["dropout_rates"], {"drop": 0.2})
    self.assertIsNone(saved_model.read_export_metadata(path)["fit_report"])
    serve = tf.saved_model.load(path).signatures[contract.SERVING_SIGNATURE]
    xs = float_examples(6, seed=2)
    got, want = serve(features=tf.constant(xs)), dual.predict(xs, verbose=0)
    for key in contract.OUTPUT_KEYS:
      self.assertAllClose(got[key], want[key], rtol=1e-5, atol=1e-6)


  def test_extreme_inputs_give_finite_non_negative_variation(self):
    keras.utils.set_random_seed(1)
    x = keras.Input(shape=(4,), name="features")
    h = keras.layers.Dense(8, activation="relu", name="hidden")(x)
    h = keras.layers.Dropout(0.2, name="drop")(h)
    base = keras.Model(x, keras.layers.Dense(1, name="y")(h), name="base")
    dual = heads.add_variation_head(base, hidden_units=(8,))
    fit_x = float_examples(64, seed=3)
    training.fit_variation_head(
        dual, fit_x, targets.mc_dropout_targets(base, fit_x, num_samples=8),
        epochs=2, num_samples=8)
    path = saved_model.export_saved_model(dual, self.base)
    # The fitted head's self-assessment travels with the export.
    self.assertEqual(saved_model.read_export_metadata(path)["fit_report"],
                     heads.variation_head_metadata(dual)["fit_report"])
    serve = tf.saved_model.load(path).signatures[
        contract.SERVING_SIGNATURE]
    extremes = np.array([[1e19] * 4, [1e38] * 4, [-1e38] * 4,
                         [1e38, -1e38, 3e38, -3e38]], "float32")
    for label, got in [("dual", dual.predict(extremes, verbose=0)),
                       ("served", serve(features=tf.constant(extremes)))]:
      with self.subTest(label):
        variation = np.asarray(got[contract.VARIATION_KEY])
        self.assertTrue(np.all(np.isfinite(variation)), variation)
        self.assertTrue(np.all(variation >= 0), variation)


class McDropoutSignatureTest(tf.test.TestCase):

  def test_linear_model_matches_analytic_dropout_std(self):
    # prediction = w . (x * m / (1 - p)) + b with m ~ Bernoulli(1 - p):
    # mean w . x + b and std sqrt(p / (1 - p) * sum_i (w_i x_i)^2).
    rate, num_samples = 0.3, 2000
    dual = make_dual("linear", rate=rate)
    base = fresh_dir(self)
    path = saved_model.export_saved_model(dual, base,
                                          mc_num_samples=num_samples, seed=7)
    loaded = tf.saved_model.load(path)
    mc = loaded.signatures[contract.MC_DROPOUT_SIGNATURE]
    self.assertEqual(set(mc.structured_outputs), set(contract.OUTPUT_KEYS))
    x = float_examples(8, width=16)
    got = mc(features=tf.constant(x))
    kernel = dual.get_layer("out").kernel.numpy()[:, 0]
    bias = dual.get_layer("out").bias.numpy()[0]
    want_mean = x @ kernel + bias
    want_std = np.sqrt(rate / (1 - rate) * ((x * kernel) ** 2).sum(axis=1))
    self.assertEqual(got[contract.VARIATION_KEY].shape, (8, 1))
    # Sampling error of a std over T draws is about 1 / sqrt(2 T) = 1.6%,
    # of a mean std / sqrt(T) = 2.2% of std: both bounds are > 3 sigma.
    self.assertAllClose(got[contract.VARIATION_KEY][:, 0], want_std, rtol=0.06)
    mean_error = np.abs(got[contract.PREDICTION_KEY][:, 0] - want_mean)
    self.assertAllLessEqual(mean_error / want_std, 0.1)
    # Seeded and stateless: the same request gets the same answer.
    again = mc(features=tf.constant(x))
    self.assertAllEqual(got[contract.VARIATION_KEY],
                        again[contract.VARIATION_KEY])
    # serving_default is unaffected by the extra signature.
    serve = loaded.signatures[contract.SERVING_SIGNATURE]
    self.assertAllClose(serve(features=tf.constant(x))[contract.PREDICTION_KEY],
                        dual.predict(x, verbose=0)[contract.PREDICTION_KEY],
                        rtol=1e-5, atol=1e-6)
    meta = saved_model.read_export_metadata(path)
    self.assertEqual(meta["mc_dropout"]["num_samples"], num_samples)
    self.assertEqual(meta["mc_dropout"]["seed"], 7)
    self.assertEqual(meta["mc_dropout"]["statistic"], contract.STAT_STD)
    self.assertIn(contract.MC_DROPOUT_SIGNATURE, meta["signatures"])

  def test_seeds_change_masks(self):
    dual = make_dual("float", rate=0.5)
    base = fresh_dir(self)
    x = tf.constant(float_examples(4))
    outputs = []
    for seed in (0, 1):
      path = saved_model.export_saved_model(dual, base, mc_num_samples=8,
                                            seed=seed)
      mc = tf.saved_model.load(path).signatures[contract.MC_DROPOUT_SIGNATURE]
      outputs.append(mc(features=x)[contract.VARIATION_KEY].numpy())
    self.assertNotAllClose(outputs[0], outputs[1])
    self.assertTrue(np.all(outputs[0] >= 0))

  def test_reproduces_offline_targets_for_classes(self):
    keras.utils.set_random_seed(4)
    x = keras.Input(shape=(4,), name="features")
    h = keras.layers.Dropout(0.4, name="drop")(
        keras.layers.Dense(16, activation="relu")(x))
    probs = keras.layers.Dense(3, activation="softmax")(h)
    variation = keras.layers.Dense(1, activation="softplus")(h)
    dual = keras.Model(x, {contract.PREDICTION_KEY: probs,
                           contract.VARIATION_KEY: variation})
    path = saved_model.export_saved_model(
        dual, fresh_dir(self), mc_num_samples=64, seed=11,
        metadata={"statistic": contract.STAT_PREDICTED_CLASS_STD})
    mc = tf.saved_model.load(path).signatures[contract.MC_DROPOUT_SIGNATURE]
    xs = float_examples(6, seed=5)
    got = mc(features=tf.constant(xs))
    want = targets.mc_dropout_targets(
        keras.Model(x, probs), xs, num_samples=64, seed=11,
        statistic=contract.STAT_PREDICTED_CLASS_STD)
    self.assertEqual(got[contract.VARIATION_KEY].shape, (6, 1))
    self.assertAllClose(got[contract.VARIATION_KEY][:, 0], want,
                        rtol=1e-4, atol=1e-6)
    self.assertAllGreater(want, 0.0)
    self.assertAllClose(np.sum(got[contract.PREDICTION_KEY], axis=1),
                        np.ones(6), atol=1e-5)

  def test_predicted_class_std_picks_the_deterministic_class(self):
    samples = tf.constant([[[0.7, 0.3], [0.1, 0.9]],
                           [[0.5, 0.5], [0.3, 0.7]]])
    deterministic = tf.constant([[0.6, 0.4], [0.2, 0.8]])
    got = saved_model._mc_statistic(
        samples, deterministic, contract.STAT_PREDICTED_CLASS_STD)
    self.assertAllClose(got, [0.1, 0.1])
    per_class = saved_model._mc_statistic(
        samples, deterministic, contract.STAT_PER_CLASS_STD)
    self.assertAllClose(per_class, [[0.1, 0.1], [0.1, 0.1]])


class AtomicityAndOpCheckTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.base = fresh_dir(self)

  def test_py_function_model_is_refused_and_nothing_written(self):
    dual = make_dual("py_function")
    with self.assertRaisesRegex(ValueError, re.escape(PY_OPS)):
      saved_model.export_saved_model(dual, self.base)
    self.assertEqual(os.listdir(self.base), [])

  def test_failure_half_way_leaves_no_version_folder(self):
    dual = make_dual("float")
    steps = [(saved_model, "_write_warmup"),
             (export_checks, "check_serving_ops"),
             (export_checks, "verify_serving_load"),
             (saved_model, "_fsync_tree")]
    for module, step in steps:
      with mock.patch.object(module, step,
                             side_effect=RuntimeError(f"boom in {step}")):
        with self.assertRaisesRegex(RuntimeError, f"boom in {step}"):
          saved_model.export_saved_model(dual, self.base,
                                         warmup_examples=float_examples(2))
      self.assertEqual(os.listdir(self.base), [])
    self.assertEqual(saved_model.export_saved_model(dual, self.base),
                     os.path.join(self.base, "1"))

  def test_leftover_temp_folder_of_a_killed_export_is_ignored(self):
    stale = os.path.join(self.base, ".tmp-1-killed000000")
    os.makedirs(os.path.join(stale, "variables"))
    with open(os.path.join(stale, "saved_model.pb"), "wb") as f:
      f.write(b"\x08partial")
    self.assertEqual(saved_model.existing_versions(self.base), [])
    with self.assertRaisesRegex(FileNotFoundError, "no numeric version"):
      saved_model.read_export_metadata(self.base)
    path = saved_model.export_saved_model(make_dual("float"), self.base)
    self.assertEqual(path, os.path.join(self.base, "1"))
    self.assertEqual(saved_model.existing_versions(self.base), [1])
    # Not ours to delete: it may belong to an export still running.
    self.assertTrue(os.path.isdir(stale))
    self.assertEqual(sorted(os.listdir(self.base)),
                     [".tmp-1-killed000000", "1"])

  def test_version_published_by_a_concurrent_export_is_not_overwritten(self):
    target = os.path.join(self.base, "1")

    def other_exporter_wins(tmp):
      os.makedirs(target)
      with open(os.path.join(target, "saved_model.pb"), "wb") as f:
        f.write(b"theirs")
      del tmp

    with mock.patch.object(saved_model, "_fsync_tree",
                           side_effect=other_exporter_wins):
      with self.assertRaisesRegex(FileExistsError,
                                  "Version 1 appeared .* never overwritten"):
        saved_model.export_saved_model(make_dual("float"), self.base)
    self.assertEqual(os.listdir(self.base), ["1"])
    with open(os.path.join(target, "saved_model.pb"), "rb") as f:
      self.assertEqual(f.read(), b"theirs")



class JitCompileExportTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.base = fresh_dir(self)

  def test_bucket_sizes_are_the_next_power_of_two(self):
    rows = [0, 1, 2, 3, 4, 5, 255, 256, 257, 1000, 4096, 16385, 32769,
            2**20 + 1, 2**30]
    got = [int(saved_model._bucket_size(tf.constant(r, tf.int32)))
           for r in rows]
    self.assertEqual(got, [0, 1, 2, 4, 4, 8, 256, 256, 512, 1024, 4096,
                           32768, 65536, 2**21, 2**30])
    for r in range(1, 5000):
      bucket = int(saved_model._bucket_size(tf.constant(r, tf.int32)))
      self.assertTrue(bucket >= r > bucket // 2, (r, bucket))

  def test_requests_are_padded_to_the_bucket_and_cut_back(self):
    dual = make_dual("float")
    seen = []

    def spy(inputs):
      seen.append(tuple(inputs.shape))  # at trace time: the padded shape
      return inputs

    _, rebuild = saved_model._input_entries(dual)

    @tf.function(jit_compile=True)
    def compiled(inputs):
      return dual(spy(rebuild(inputs)), training=False)
    forward = saved_model._padded_to_bucket(compiled)
    for n in (3, 5):
      x = float_examples(n, seed=n)
      out = forward({"features": tf.constant(x)})
      for key in contract.OUTPUT_KEYS:
        self.assertAllClose(out[key], dual(x, training=False)[key],
                            rtol=1e-5, atol=1e-6)
    self.assertEqual(seen, [(4, 4), (8, 4)])

  def test_variable_length_inputs_export_with_xla(self):
    keras.utils.set_random_seed(0)
    tokens = keras.Input(shape=(None,), dtype="int32", name="tokens")
    h = keras.layers.GlobalAveragePooling1D()(
        keras.layers.Embedding(50, 8)(tokens))
    h = keras.layers.Dropout(0.3)(keras.layers.Dense(8, "relu")(h))
    base = keras.Model(tokens, keras.layers.Dense(1)(h))
    dual = heads.add_variation_head(base, hidden_units=(4,))
    path = saved_model.export_saved_model(dual, self.base, jit_compile=True)
    serve = tf.saved_model.load(path).signatures[contract.SERVING_SIGNATURE]
    for length in (3, 7):
      x = np.random.RandomState(length).randint(0, 50, (2, length))
      served = serve(tokens=tf.constant(x, tf.int32))
      expected = dual(x, training=False)
      for key in contract.OUTPUT_KEYS:
        self.assertAllClose(served[key], expected[key], rtol=1e-5, atol=1e-6)

  def test_xla_export_serves_the_same_outputs_at_any_batch_size(self):
    for kind, examples in (("float", float_examples), ("ids", id_examples)):
      with self.subTest(kind=kind):
        dual = make_dual(kind)
        path = saved_model.export_saved_model(
            dual, os.path.join(self.base, kind), jit_compile=True,
            warmup_examples=examples(3))
        self.assertTrue(saved_model.read_export_metadata(path)["jit_compile"])
        proto = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
          proto.ParseFromString(f.read())
        compiled = [f for f in proto.meta_graphs[0].graph_def.library.function
                    if f.attr["_XlaMustCompile"].b]
        self.assertLen(compiled, 1)
        serve = tf.saved_model.load(path).signatures[
            contract.SERVING_SIGNATURE]
        for n in (1, 3, 5):  # 3 and 5 are padded to 4 and 8 rows
          x = examples(n, seed=n)
          served = serve(**tf.nest.map_structure(
              tf.constant, x if isinstance(x, dict) else {"features": x}))
          expected = dual(x, training=False)
          for key in contract.OUTPUT_KEYS:
            self.assertEqual(served[key].shape[0], n)
            self.assertAllClose(served[key], expected[key], rtol=1e-5,
                                atol=1e-6)

  def test_default_export_is_not_compiled(self):
    path = saved_model.export_saved_model(make_dual("float"), self.base)
    self.assertFalse(saved_model.read_export_metadata(path)["jit_compile"])

  def test_model_xla_cannot_compile_is_refused_and_nothing_written(self):
    dual = make_dual("no_xla")
    with self.assertRaisesRegex(
        ValueError, r"Invalid value received for argument `jit_compile`\. "
        r"Expected False for a model that XLA cannot compile \(XLA said: "):
      saved_model.export_saved_model(dual, self.base, jit_compile=True)
    self.assertEqual(os.listdir(self.base), [])
    # Without XLA the same model exports.
    self.assertEqual(saved_model.export_saved_model(dual, self.base),
                     os.path.join(self.base, "1"))

  def test_non_bool_jit_compile_is_refused(self):
    with self.assertRaisesRegex(
        ValueError, re.escape("Invalid value received for argument "
                              "`jit_compile`. Expected True or False. "
                              "Received: jit_compile='yes'")):
      saved_model.export_saved_model(make_dual("float"), self.base,
                                     jit_compile="yes")


def session_run(path, feeds):
  """Runs serving_default of `path` in a TF1 Session, as TF Serving does.

  Returns its outputs and how many variables the run read (VarHandleOps in
  the partition graphs the Session ran).
  """
  graph = tf.Graph()
  with tf.compat.v1.Session(graph=graph) as session:
    with graph.as_default():
      meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
    signature = meta.signature_def[contract.SERVING_SIGNATURE]
    run_metadata = tf.compat.v1.RunMetadata()
    outputs = session.run(
        {key: t.name for key, t in signature.outputs.items()},
        {signature.inputs[name].name: value for name, value in feeds.items()},
        options=tf.compat.v1.RunOptions(output_partition_graphs=True),
        run_metadata=run_metadata)
  reads = sum(node.op == "VarHandleOp"
              for graph_def in run_metadata.partition_graphs
              for node in graph_def.node)
  return outputs, reads


class ConstantHeadTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    keras.utils.set_random_seed(0)
    x = keras.Input(shape=(4,), name="features")
    h = keras.layers.Dropout(0.3)(keras.layers.Dense(8, "relu")(x))
    self.model = keras.Model(x, keras.layers.Dense(1)(h))
    self.dual = heads.add_variation_head(self.model, hidden_units=(4,))
    # Weights no initializer gives (the head's scale is 1 before fitting).
    for i, v in enumerate(self.dual.variables):
      v.assign(v.numpy() + 0.01 * (i + 1))
    self.x = float_examples(3)

  def export_and_run(self, **kwargs):
    path = saved_model.export_saved_model(
        self.dual, fresh_dir(self), **kwargs)
    served, reads = session_run(path, {"features": self.x})
    expected = self.dual(self.x, training=False)
    for key in contract.OUTPUT_KEYS:
      self.assertAllClose(served[key], expected[key], rtol=1e-5, atol=1e-6)
    return path, reads

  def test_served_graph_reads_only_the_base_variables(self):
    head = saved_model.head_weight_values(self.dual)
    # Kernel and bias of two Dense layers; the Dropout's seed state is
    # not read with dropout off.
    base_reads = 4
    base_ids = {id(v) for v in self.model.variables}
    self.assertLen(head, len(self.dual.variables) - len(base_ids))
    self.assertFalse(base_ids & {id(v) for v, _ in head})
    for jit_compile in (False, True):
      with self.subTest(jit_compile=jit_compile):
        path, reads = self.export_and_run(jit_compile=jit_compile)
        self.assertEqual(reads, base_reads)
        # The SavedModel still holds every variable of the dual.
        loaded = tf.saved_model.load(path)
        self.assertLen(loaded.variables, len(self.dual.variables))

  def test_large_head_weights_stay_variables(self):
    sizes = {id(v): int(np.prod(v.shape)) for v, _ in
             saved_model.head_weight_values(self.dual)}
    limit = sorted(sizes.values())[len(sizes) // 2]
    with mock.patch.object(saved_model, "_MAX_CONSTANT_ELEMENTS", limit):
      kept = saved_model.head_weight_values(self.dual)
      _, reads = self.export_and_run()
    self.assertNotEmpty(kept)
    self.assertLess(len(kept), len(sizes))
    self.assertTrue(all(np.prod(v.shape) <= limit for v, _ in kept))
    self.assertEqual(reads, 4 + len(sizes) - len(kept))

  def test_constants_stop_at_their_total_smallest_first(self):
    sizes = sorted(int(np.prod(v.shape)) for v in
                   heads.head_variables(self.dual))
    total = sum(sizes[:len(sizes) // 2])
    with mock.patch.object(saved_model, "_MAX_CONSTANT_TOTAL", total):
      kept = saved_model.head_weight_values(self.dual)
      _, reads = self.export_and_run()
    self.assertEqual(sorted(int(np.prod(v.shape)) for v, _ in kept),
                     sizes[:len(sizes) // 2])
    self.assertEqual(reads, 4 + len(sizes) - len(kept))

  def test_model_without_a_head_keeps_its_variables(self):
    dual = make_dual("float")
    self.assertEqual(saved_model.head_weight_values(dual), [])
    path = saved_model.export_saved_model(dual, fresh_dir(self))
    _, reads = session_run(path, {"features": float_examples(2)})
    self.assertEqual(reads, 6)  # three Dense layers, kernel and bias


if __name__ == "__main__":
  tf.test.main()
