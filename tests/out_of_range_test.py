"""Tests of the optional "out_of_range" output of a dual model.

The layer (`head_layers.OutOfRange`), the dual made with
`add_variation_head(out_of_range=True)`, its range set by
`fit_variation_head`, and every place keyed on outputs: `.keras` saving,
`strip_variation_head`, the export, the in-process server over gRPC and
REST, the client, its CLI and the monitoring page.
"""

import os
import shutil
import tempfile
import warnings

import numpy as np
import requests
from prometheus_client import parser

from dropvar_tf import contract
from dropvar_tf import head_layers
from dropvar_tf import heads
from dropvar_tf import saved_model
from dropvar_tf import training
from dropvar_tf._keras import keras, tf
from dropvar_tf.serving import client as client_lib
from dropvar_tf.serving import client_cli
from dropvar_tf.serving import monitoring
from dropvar_tf.serving import server as server_lib
import testing_models as tm

_PREFIX = "Invalid value received for argument "
_ERR_FLAG = (_PREFIX + "`out_of_range`. Expected True or False. Received: "
             "out_of_range='yes'")
_ERR_QUANTILE = (_PREFIX + "`quantile`. Expected a number in [0, 0.5). "
                 "Received: quantile=0.5")
_ERR_WIDTH = (_PREFIX + "`features`. Expected an (N, 5) array. Received: "
              "features='shape (4, 3)'")
_ERR_NO_SIGNAL = (
    _PREFIX + "`dual`. Expected a dual model made with `out_of_range=True` "
    "or with a prior that `shrink_out_of_range`. Received: dual=\"model "
    "'mlp_softmax_dual' without an 'out_of_range' signal\"")
_ERR_UNFITTED = (
    _PREFIX + "`dual`. Expected a dual whose 'out_of_range' range was set by "
    "`fit_variation_head` (until then it reads 0 for every input). "
    "Received: dual=\"model 'mlp_softmax_dual' with an unfitted "
    "out-of-range signal\"")
_TIMEOUT = 30.0




def _signal(dual, x):
  return np.asarray(dual(x, training=False)[contract.OUT_OF_RANGE_KEY])


class OutOfRangeLayerTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.calibration = [rng.normal(size=(500, 3)).astype("float32"),
                        rng.uniform(size=(500, 2)).astype("float32")]
    self.layer = head_layers.OutOfRange(quantile=0.0)
    self.layer.build([(None, 3), (None, 2)])
    self.layer.set_range(np.concatenate(self.calibration, axis=1))

  def test_zero_inside_and_half_widths_outside(self):
    # quantile=0: every calibration row is inside [min, max].
    self.assertAllEqual(self.layer(self.calibration), np.zeros(500))
    full = np.concatenate(self.calibration, axis=1)
    low, high = self.layer.ranges()
    self.assertAllClose(low, full.min(axis=0), atol=1e-5)
    self.assertAllClose(high, full.max(axis=0), atol=1e-5)
    half = (high - low) / 2
    x = [np.zeros((2, 3), "float32"), np.full((2, 2), 0.5, "float32")]
    x[0][0, 1] = high[1] + 2 * half[1]        # 2 half-widths above
    x[1][1, 0] = low[3] - 0.5 * half[3]       # half a half-width below
    self.assertAllClose(self.layer(x), [2.0, 0.5], rtol=1e-4)

  def test_constant_feature_has_a_floored_width(self):
    layer = head_layers.OutOfRange(quantile=0.0)
    layer.build((None, 2))
    layer.set_range(np.array([[100.0, 0.0]] * 5))
    low, high = layer.ranges()
    self.assertAllClose(low, [99.9, -1e-6])
    self.assertAllClose(high, [100.1, 1e-6])
    self.assertAllClose(layer(np.array([[100.05, 0.0], [100.3, 0.0]],
                                       "float32")), [0.0, 2.0], rtol=1e-3)

  def test_finite_at_extremes_and_on_non_finite_features(self):
    rows = np.array([[1e38] * 5, [-1e38] * 5, [np.inf] * 5, [np.nan] * 5,
                     [0.0, np.nan, 0.0, 0.5, 0.5]], "float32")
    out = np.asarray(self.layer([rows[:, :3], rows[:, 3:]]))
    self.assertTrue(np.all(np.isfinite(out)))
    self.assertGreater(out[0], 1e30 / 10)
    self.assertAllEqual(
        out[2:], [np.float32(head_layers.OutOfRange.MAX_VALUE)] * 3)

  def test_same_under_xla(self):
    # XLA's reduce_max skips NaN: the row of NaN would read 0 without the
    # layer's NaN check.
    rows = np.array([[0.0, np.nan, 0.0, 0.5, 0.5], [9.0, 0, 0, 0.5, 0.5],
                     [np.nan] * 5], "float32")
    inputs = [rows[:, :3], rows[:, 3:]]
    compiled = tf.function(self.layer.call, jit_compile=True)
    self.assertAllClose(compiled(inputs), self.layer(inputs))
    self.assertEqual(float(compiled(inputs)[2]),
                     np.float32(head_layers.OutOfRange.MAX_VALUE))

  def test_unset_range_reads_zero(self):
    layer = head_layers.OutOfRange()
    self.assertAllEqual(layer(np.full((2, 4), 1e6, "float32")), [0.0, 0.0])

  def test_config_and_errors(self):
    clone = head_layers.OutOfRange.from_config(
        head_layers.OutOfRange(quantile=0.01).get_config())
    self.assertEqual(clone.quantile, 0.01)
    with self.assertRaisesWithLiteralMatch(ValueError, _ERR_QUANTILE):
      head_layers.OutOfRange(quantile=0.5)
    with self.assertRaisesWithLiteralMatch(ValueError, _ERR_WIDTH):
      self.layer.set_range(np.zeros((4, 3)))


class DualOutOfRangeTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = tm.mlp_softmax()
    cls.x = tm.sample_inputs("softmax", 300, seed=1)
    cls.dual = tm.fitted_dual(cls.model, cls.x)

  def test_off_by_default(self):
    dual = heads.add_variation_head(self.model, hidden_units=(8,))
    self.assertEqual(sorted(dual.output), sorted(contract.OUTPUT_KEYS))
    self.assertNotIn("out_of_range", heads.variation_head_metadata(dual))
    # The default head's prior shrinks with the signal: it is computed, not
    # returned.
    self.assertTrue(heads.variation_output_layer(dual).shrink)
    self.assertLen(training.out_of_range_features(dual, self.x[:2]), 2)
    plain = heads.add_variation_head(self.model, hidden_units=(8,),
                                     shrink_out_of_range=False)
    self.assertIsNone(heads.out_of_range_layer(plain))
    with self.assertRaisesWithLiteralMatch(ValueError, _ERR_NO_SIGNAL):
      training.out_of_range_features(plain, self.x[:2])
    with self.assertRaisesWithLiteralMatch(ValueError, _ERR_FLAG):
      heads.add_variation_head(self.model, out_of_range="yes")

  def test_keys_shape_and_metadata(self):
    self.assertEqual(sorted(self.dual.output),
                     sorted(contract.output_keys(None, out_of_range=True)))
    self.assertEqual(contract.output_names(self.dual.output), [])
    out = _signal(self.dual, self.x[:7])
    self.assertEqual(out.shape, (7,))
    self.assertEqual(out.dtype, np.float32)
    record = heads.variation_head_metadata(self.dual)["out_of_range"]
    self.assertTrue(record["fitted"])
    self.assertEqual(record["num_examples"], 240 - 30)  # train rows
    self.assertEqual(record["held_out"]["num_examples"], 60)

  def test_small_on_calibration_inputs_large_on_scaled_ones(self):
    calibration = _signal(self.dual, self.x)
    self.assertLess(np.mean(calibration > 0), 0.05)
    scaled = _signal(self.dual, 8.0 * self.x)
    self.assertGreater(np.median(scaled), 10 * np.quantile(calibration, 0.99))
    self.assertGreater(np.mean(scaled > 1.0), 0.9)

  def test_finite_for_extreme_inputs(self):
    x = np.array([[1e38] * 6, [-1e38] * 6, [3e38, -3e38] * 3, [0.0] * 6],
                 "float32")
    out = _signal(self.dual, x)
    self.assertTrue(np.all(np.isfinite(out)))
    self.assertTrue(np.all(out >= 0))

  def test_estimates_are_those_of_a_dual_without_it(self):
    # Both fitted here: the fit's shuffling also depends on TF's global
    # seed, which tf.test.TestCase sets anew for each test.
    x = np.concatenate([self.x[:10], 4.0 * self.x[:10]])
    plain, with_signal = (
        tm.fitted_dual(self.model, self.x, out_of_range=flag)(
            x, training=False)[contract.VARIATION_KEY]
        for flag in (False, True))
    self.assertAllEqual(plain, with_signal)

  def test_train_variation_head_sets_the_range(self):
    with warnings.catch_warnings():  # a 1-epoch fit is far below the bound
      warnings.simplefilter("ignore")
      dual = training.train_variation_head(
          self.model, self.x[:50], num_samples=4, num_perturbed=100,
          epochs=1, hidden_units=(8,), out_of_range=True)
    record = heads.variation_head_metadata(dual)["out_of_range"]
    self.assertTrue(record["fitted"])
    self.assertGreater(np.median(_signal(dual, 8.0 * self.x)),
                       np.median(_signal(dual, self.x)))

  def test_unfitted_reads_zero_and_is_not_exported(self):
    dual = heads.add_variation_head(self.model, hidden_units=(8,),
                                    out_of_range=True)
    self.assertEqual(heads.variation_head_metadata(dual)["out_of_range"],
                     {"fitted": False})
    self.assertAllEqual(_signal(dual, 5 * self.x[:3]), np.zeros(3))
    base = os.path.join(self.get_temp_dir(), "unfitted")
    with self.assertRaisesWithLiteralMatch(ValueError, _ERR_UNFITTED):
      saved_model.export_saved_model(dual, base)
    self.assertFalse(os.path.exists(base))

  def test_keras_round_trip(self):
    path = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()),
                        "dual.keras")
    self.dual.save(path)
    loaded = keras.saving.load_model(path)
    x = 3.0 * self.x[:9]
    self.assertAllClose(_signal(loaded, x), _signal(self.dual, x))
    self.assertEqual(heads.variation_head_metadata(loaded)["out_of_range"],
                     heads.variation_head_metadata(self.dual)["out_of_range"])

  def test_strip_gives_the_plain_model(self):
    plain = heads.strip_variation_head(self.dual)
    self.assertAllClose(plain(self.x[:5]), self.model(self.x[:5]))

  def test_multi_output_dual_has_one_signal(self):
    model = tm.multi_output("dict")
    x = tm.target_features(200, seed=2) * 2.0
    dual = tm.fitted_dual(model, x)
    names = ["klass", "value"]
    self.assertEqual(sorted(dual.output),
                     sorted(contract.output_keys(names, out_of_range=True)))
    self.assertEqual(contract.output_names(dual.output), names)
    records = [heads.variation_head_metadata(dual, n)["out_of_range"]
               for n in names]
    self.assertTrue(records[0]["fitted"])
    self.assertEqual(records[0], records[1])
    self.assertEqual(_signal(dual, x[:4]).shape, (4,))
    self.assertGreater(np.median(_signal(dual, 8 * x)),
                       np.median(_signal(dual, x)))
    plain = heads.strip_variation_head(dual)
    self.assertEqual(sorted(plain(x[:2])), names)


class ServedOutOfRangeTest(tf.test.TestCase):
  """Exported, then served over gRPC and REST: equal to the dual in process."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = tm.mlp_softmax()
    cls.x = tm.sample_inputs("softmax", 200, seed=1)
    cls.dual = tm.fitted_dual(cls.model, cls.x)
    cls.tmp = tempfile.mkdtemp()
    cls.base = os.path.join(cls.tmp, "dual")
    cls.path = saved_model.export_saved_model(cls.dual, cls.base,
                                              mc_num_samples=4)
    cls.metrics = monitoring.Metrics()
    cls.server = server_lib.ModelServer(
        [server_lib.model_config("dual", cls.base)], poll_seconds=0,
        rest_api_port=0, metrics=cls.metrics,
        metrics_path=monitoring.DEFAULT_PATH)
    cls.server.start()

  @classmethod
  def tearDownClass(cls):
    cls.server.stop()
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _inputs(self):
    x = np.concatenate([self.x[:3], 6.0 * self.x[:3]])
    return x, _signal(self.dual, x)

  def test_export_signature_and_metadata(self):
    x, expected = self._inputs()
    loaded = tf.saved_model.load(self.path)
    served = loaded.signatures[contract.SERVING_SIGNATURE](
        features=tf.constant(x))
    self.assertAllClose(served[contract.OUT_OF_RANGE_KEY], expected,
                        rtol=1e-5)
    mc = loaded.signatures[contract.MC_DROPOUT_SIGNATURE](
        features=tf.constant(x))
    self.assertEqual(sorted(mc), sorted(contract.OUTPUT_KEYS))
    meta = saved_model.read_export_metadata(self.base)
    self.assertEqual(meta["output_keys"],
                     sorted(contract.output_keys(None, out_of_range=True)))
    self.assertEqual(meta["out_of_range"],
                     heads.variation_head_metadata(self.dual)["out_of_range"])

  def test_xla_export_serves_the_same_signal(self):
    x, _ = self._inputs()
    x = np.concatenate([x, np.full((1, x.shape[1]), 1e38, "float32")])
    path = saved_model.export_saved_model(
        self.dual, os.path.join(self.tmp, "xla"), jit_compile=True)
    served = tf.saved_model.load(path).signatures[
        contract.SERVING_SIGNATURE](features=tf.constant(x))
    self.assertAllClose(served[contract.OUT_OF_RANGE_KEY],
                        _signal(self.dual, x), rtol=1e-5)
    self.assertTrue(np.all(np.isfinite(served[contract.OUT_OF_RANGE_KEY])))

  def test_rows_with_nan_or_inf_inputs_answer_the_largest_uncertainty(self):
    # A ReLU turns NaN into 0: unflagged, such a row would get an ordinary
    # variation and a small signal. Finite rows are served as before.
    x = np.array(self.x[:4])
    x[1, 0] = np.nan
    x[2, :] = np.nan
    x[3, 5] = -np.inf
    good = self.dual.predict(x[:1], verbose=0)
    cap = float(heads.variation_output_layer(self.dual).max_value.numpy())
    xla = saved_model.export_saved_model(
        self.dual, os.path.join(self.tmp, "xla_nan"), jit_compile=True)
    for label, path in (("plain", self.path), ("xla", xla)):
      with self.subTest(label):
        served = tf.saved_model.load(path).signatures[
            contract.SERVING_SIGNATURE](features=tf.constant(x))
        variation = served[contract.VARIATION_KEY].numpy()
        far = served[contract.OUT_OF_RANGE_KEY].numpy()
        self.assertAllClose(variation[:1], good[contract.VARIATION_KEY],
                            rtol=1e-5)
        self.assertAllClose(far[:1], good[contract.OUT_OF_RANGE_KEY],
                            rtol=1e-5)
        self.assertAllEqual(variation[1:], [cap] * 3)
        self.assertAllEqual(far[1:], np.full(
            3, head_layers.OutOfRange.MAX_VALUE, np.float32))
    with client_lib.VariationClient(self.server.target, "dual",
                                    timeout=_TIMEOUT) as client:
      result = client.predict({"features": x})
    self.assertAllEqual(result.variation[1:], [cap] * 3)

  def test_grpc_and_rest_equal_in_process(self):
    x, expected = self._inputs()
    for protocol, target in (("grpc", self.server.target),
                             ("rest", self.server.rest_url.split("//")[-1])):
      with self.subTest(protocol=protocol):
        with client_lib.VariationClient(target, "dual", timeout=_TIMEOUT,
                                        protocol=protocol) as client:
          result = client.predict({"features": x})
          self.assertAllClose(result.out_of_range, expected, rtol=1e-5)
          filtered = client.predict({"features": x},
                                    output_filter=[contract.VARIATION_KEY])
          self.assertIsNone(filtered.out_of_range)
          out = client_cli.run_command("predict", client, {"features": x})
          self.assertAllClose(out["out_of_range"], expected, rtol=1e-5)
          self.assertNotIn("outputs", out)

  def test_monitoring_histogram(self):
    x, _ = self._inputs()
    with client_lib.VariationClient(self.server.target, "dual",
                                    timeout=_TIMEOUT) as client:
      client.predict({"features": x})
    page = requests.get(self.server.rest_url + monitoring.DEFAULT_PATH,
                        timeout=_TIMEOUT).text
    counts = {tuple(sorted(s.labels.items())): s.value
              for family in parser.text_string_to_metric_families(page)
              if family.name == ":dropvar:serving:out_of_range"
              for s in family.samples
              if s.name == ":dropvar:serving:out_of_range_count"}
    # Other tests of this class may have served rows too: at least these.
    self.assertGreaterEqual(
        counts[(("model_name", "dual"), ("version", "1"))], len(x))


if __name__ == "__main__":
  tf.test.main()
