"""Tests of serving/rest_client.py: `VariationClient` over the REST API."""

import os
import shutil
import tempfile

import grpc

from dropvar_tf import contract
from dropvar_tf._keras import tf
from dropvar_tf.serving import client as client_lib
from dropvar_tf.serving import errors
from dropvar_tf.serving import server as server_lib
import serving_testing as testing
import testing_models as tm


class RestClientTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.base = tempfile.mkdtemp()
    cls.model = tm.dual_ratings_model(seed=1)
    testing.write_export(cls.model, os.path.join(cls.base, "ratings"), 3)
    config = server_lib.model_config("ratings",
                                     os.path.join(cls.base, "ratings"))
    config.version_labels["stable"] = 3
    cls.server = server_lib.ModelServer([config], poll_seconds=0,
                                        rest_api_port=0)
    cls.server.start()
    cls.rest_target = f"127.0.0.1:{cls.server.rest_api_port}"

  @classmethod
  def tearDownClass(cls):
    cls.server.stop()
    shutil.rmtree(cls.base, ignore_errors=True)
    super().tearDownClass()

  def test_rest_and_grpc_give_the_same_answers(self):
    inputs = testing.ratings_inputs(4, seed=2)
    with client_lib.VariationClient(self.rest_target, "ratings",
                                    protocol="rest") as rest, \
        client_lib.VariationClient(self.server.target, "ratings") as grpc_:
      over_rest = rest.predict(inputs)
      over_grpc = grpc_.predict(inputs)
      for key in contract.OUTPUT_KEYS:
        self.assertAllEqual(over_rest.outputs[key], over_grpc.outputs[key])
      self.assertIsNone(over_rest.model_version)
      self.assertEqual(over_grpc.model_version, 3)
      only = rest.predict(inputs, output_filter=["variation"])
      self.assertIsNone(only.prediction)
      self.assertAllEqual(only.variation, over_grpc.variation)
      self.assertEqual(rest.get_model_status(), grpc_.get_model_status())
      self.assertEqual(rest.get_model_metadata(),
                       grpc_.get_model_metadata())

  def test_version_label_and_errors(self):
    inputs = testing.ratings_inputs(2)
    with client_lib.VariationClient(self.rest_target, "ratings", version=3,
                                    protocol="rest") as rest:
      self.assertEqual(rest.predict(inputs).model_version, 3)
    with client_lib.VariationClient(self.rest_target, "ratings",
                                    version_label="stable",
                                    protocol="rest") as rest:
      self.assertLen(rest.predict(inputs).variation, 2)
    cases = [
        (dict(version=9), grpc.StatusCode.NOT_FOUND,
         "Servable not found for request: Specific(ratings, 9)"),
        (dict(version_label="nope"), grpc.StatusCode.INVALID_ARGUMENT,
         "Unrecognized servable version label: nope"),
    ]
    for kwargs, code, message in cases:
      with self.subTest(message):
        with client_lib.VariationClient(self.rest_target, "ratings",
                                        protocol="rest", cast_inputs=False,
                                        **kwargs) as rest:
          with self.assertRaises(errors.ServingError) as cm:
            rest.predict(inputs)
        self.assertEqual(cm.exception.code, code)
        self.assertEqual(cm.exception.message, message)
        self.assertEqual(cm.exception.method, "GetModelMetadata")

  def test_an_http_url_is_a_target_and_other_urls_are_refused(self):
    for target in (f"http://{self.rest_target}",
                   f"http://{self.rest_target}/"):
      with self.subTest(target=target):
        with client_lib.VariationClient(target, "ratings",
                                        protocol="rest") as rest:
          self.assertEqual(
              [s.version for s in rest.get_model_status()], [3])
    for target in (f"https://{self.rest_target}",
                   f"http://{self.rest_target}/v1/models", "http://"):
      with self.subTest(target=target):
        with self.assertRaisesRegex(
            ValueError, "argument `target`. Expected \"host:port\" \\(or "
            "\"http://host:port\"\\) of TF Serving's REST API"):
          client_lib.VariationClient(target, "ratings", protocol="rest")

  def test_unreachable_server_is_unavailable(self):
    with client_lib.VariationClient("127.0.0.1:1", "ratings", max_retries=0,
                                    protocol="rest") as rest:
      with self.assertRaises(errors.ServingError) as cm:
        rest.get_model_status()
    self.assertEqual(cm.exception.code, grpc.StatusCode.UNAVAILABLE)


if __name__ == "__main__":
  tf.test.main()
