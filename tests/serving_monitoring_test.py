"""Tests of serving/monitoring.py: the config file and the scraped metrics."""

import os
import shutil
import tempfile

import grpc
import numpy as np
import prometheus_client
from prometheus_client import parser
import requests

from dropvar_tf import contract
from dropvar_tf._keras import tf
from dropvar_tf.serving import monitoring
from dropvar_tf.serving import server as server_lib
import serving_testing as testing
import testing_models as tm
from tensorflow_serving.apis import prediction_service_pb2_grpc

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMEOUT = 10.0


def _samples(text):
  """{(sample name, sorted label items): value} of a Prometheus page."""
  out = {}
  for family in parser.text_string_to_metric_families(text):
    for sample in family.samples:
      out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
  return out


class VariationHistogramTest(tf.test.TestCase):

  def test_batches_count_as_prometheus_client_counts_one_by_one(self):
    rng = np.random.default_rng(0)
    batches = [rng.gamma(0.5, 0.05, size=n) for n in (1, 7, 256)]
    # Values on bucket bounds: "le" buckets include their bound.
    batches.append(np.array([1e-4, 2e-4, 0.0, 1e3]))
    metrics = monitoring.Metrics()
    registry = prometheus_client.CollectorRegistry()
    reference = prometheus_client.Histogram(
        ":dropvar:serving:variation", "reference", ("model_name", "version"),
        buckets=monitoring.DEFAULT_VARIATION_BUCKETS, registry=registry)
    for batch in batches:
      metrics.observe_outputs("m", 3, {contract.VARIATION_KEY: batch})
      for value in batch:
        reference.labels("m", "3").observe(float(value))

    def samples(text):
      return {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in parser.text_string_to_metric_families(text)
              if family.name == ":dropvar:serving:variation"
              for s in family.samples}

    got = samples(metrics.render())
    want = samples(prometheus_client.generate_latest(registry).decode())
    self.assertEqual(sorted(got), sorted(want))
    for key, value in want.items():
      self.assertAllClose(got[key], value, rtol=1e-12, msg=str(key))
    self.assertEqual(got[(":dropvar:serving:variation_count",
                          (("model_name", "m"), ("version", "3")))], 268)

  def test_multi_output_dual_observes_the_largest_variation_per_example(self):
    metrics = monitoring.Metrics(variation_threshold=0.5)
    outputs = {contract.prediction_key("a"): np.zeros(3),
               contract.variation_key("a"): np.array([0.1, 0.9, 0.2]),
               contract.variation_key("b"): np.array([[0.6, 0.0],
                                                      [0.1, 0.3],
                                                      [0.05, 0.1]])}
    metrics.observe_outputs("m", 1, outputs)
    got = _samples(metrics.render())
    labels = (("model_name", "m"), ("version", "1"))
    self.assertEqual(got[(":dropvar:serving:variation_count", labels)], 3)
    self.assertAllClose(got[(":dropvar:serving:variation_sum", labels)],
                        0.6 + 0.9 + 0.2)
    self.assertEqual(got[(":dropvar:serving:variation_examples_above_"
                          "threshold_total", labels)], 2)


class MonitoringConfigTest(tf.test.TestCase):

  def _write(self, text):
    path = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()), "m.cfg")
    with open(path, "w") as f:
      f.write(text)
    return path

  def test_out_of_range_histogram_only_with_that_output(self):
    metrics = monitoring.Metrics()
    metrics.observe_outputs("m", 2, {contract.VARIATION_KEY: np.ones(2)})
    metrics.observe_outputs("m", 2, {
        contract.VARIATION_KEY: np.ones(3),
        contract.OUT_OF_RANGE_KEY: np.array([0.0, 0.3, 1e30], np.float32)})
    got = _samples(metrics.render())
    labels = (("model_name", "m"), ("version", "2"))
    name = ":dropvar:serving:out_of_range"

    def bucket(le):
      return got[(name + "_bucket", (("le", le),) + labels)]

    self.assertEqual(got[(name + "_count", labels)], 3)
    self.assertEqual([bucket("0.0"), bucket("0.25"), bucket("0.5"),
                      bucket("16384.0"), bucket("+Inf")], [1, 1, 2, 2, 3])
    self.assertEqual(got[(":dropvar:serving:variation_count", labels)], 5)

  def test_deploy_config_and_defaults(self):
    self.assertEqual(
        monitoring.read_monitoring_config(os.path.join(
            _REPO_ROOT, "serving", "deploy", "monitoring.config")),
        "/monitoring/prometheus/metrics")
    self.assertEqual(monitoring.read_monitoring_config(
        self._write("prometheus_config { enable: true }")),
                     monitoring.DEFAULT_PATH)
    self.assertIsNone(monitoring.read_monitoring_config(
        self._write("prometheus_config { path: '/m' }")))

  def test_bad_configs(self):
    with self.assertRaisesRegex(ValueError, "Could not read monitoring"):
      monitoring.read_monitoring_config(self._write("prometheus { }"))
    with self.assertRaisesRegex(ValueError, "Expected a path starting"):
      monitoring.read_monitoring_config(
          self._write("prometheus_config { enable: true path: 'm' }"))


class MetricsTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.base = tempfile.mkdtemp()
    cls.model = tm.dual_dense_model(seed=3)
    testing.write_export(cls.model, cls.base, 1)
    cls.inputs = [testing.dense_inputs(2, seed=s) for s in range(5)]
    variations = np.concatenate([
        cls.model(x, training=False)[contract.VARIATION_KEY].numpy()
        for x in cls.inputs]).ravel()
    cls.variations = variations
    cls.threshold = float(np.median(variations))
    cls.server = server_lib.ModelServer(
        [server_lib.model_config("m", cls.base)], poll_seconds=0,
        rest_api_port=0,
        metrics=monitoring.Metrics(variation_threshold=cls.threshold),
        metrics_path="/monitoring/prometheus/metrics")
    cls.server.start()

  @classmethod
  def tearDownClass(cls):
    cls.server.stop()
    shutil.rmtree(cls.base, ignore_errors=True)
    super().tearDownClass()

  def test_scraped_metrics(self):
    with grpc.insecure_channel(self.server.target) as channel:
      stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
      for x in self.inputs[:3]:
        stub.Predict(testing.predict_request("m", {"x": x}),
                     timeout=_TIMEOUT)
      with self.assertRaises(grpc.RpcError):
        stub.Predict(testing.predict_request("m", {"x": x}, version=9),
                     timeout=_TIMEOUT)
    url = self.server.rest_url
    for x in self.inputs[3:]:
      response = requests.post(url + "/v1/models/m:predict",
                               json={"inputs": x.tolist()}, timeout=_TIMEOUT)
      self.assertEqual(response.status_code, 200, response.text)
    self.assertEqual(requests.post(url + "/v1/models/m:predict", data=b"{",
                                   timeout=_TIMEOUT).status_code, 400)
    page = requests.get(url + "/monitoring/prometheus/metrics",
                        timeout=_TIMEOUT)
    self.assertEqual(page.status_code, 200)
    self.assertIn("# TYPE :tensorflow:serving:request_count counter",
                  page.text)
    samples = _samples(page.text)

    def get(name, **labels):
      return samples.get((name, tuple(sorted(labels.items()))))

    # The parser names counter samples NAME_total; the page has NAME.
    self.assertIn(":tensorflow:serving:request_count{", page.text)
    count = ":tensorflow:serving:request_count_total"
    self.assertEqual(get(count, model_name="m", version="1", status="OK"), 5)
    self.assertEqual(get(count, model_name="m", version="",
                         status="NOT_FOUND"), 1)
    self.assertEqual(get(count, model_name="m", version="",
                         status="INVALID_ARGUMENT"), 1)
    latency = ":tensorflow:serving:request_latency_count"
    self.assertEqual(get(latency, model_name="m", version="1", API="Predict",
                         entrypoint="GRPC"), 3)
    self.assertEqual(get(latency, model_name="m", version="1", API="predict",
                         entrypoint="REST"), 2)
    variation = ":dropvar:serving:variation"
    self.assertEqual(get(variation + "_count", model_name="m", version="1"),
                     10)
    self.assertAllClose(get(variation + "_sum", model_name="m", version="1"),
                        self.variations.sum(), rtol=1e-5)
    above = int(np.sum(self.variations > self.threshold))
    self.assertEqual(get(":dropvar:serving:variation_examples_total",
                         model_name="m", version="1"), 10)
    self.assertEqual(
        get(":dropvar:serving:variation_examples_above_threshold_total",
            model_name="m", version="1"), above)
    self.assertAllClose(
        get(":dropvar:serving:variation_share_above_threshold",
            model_name="m", version="1"), above / 10)
    self.assertNotIn("_created", page.text)


if __name__ == "__main__":
  tf.test.main()
