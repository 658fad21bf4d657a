"""Tests of serving/rest.py: TF Serving's REST API over real HTTP.

One in-process `ModelServer` on 127.0.0.1 serves a dense and a ratings
model on a gRPC and a REST port; requests are real HTTP requests.
"""

import json
import os
import shutil
import tempfile

import numpy as np
import requests

from dropvar_tf import contract
from dropvar_tf._keras import tf
from dropvar_tf.serving import server as server_lib
import serving_testing as testing
import testing_models as tm

_TIMEOUT = 10.0
_MAX_BATCH = 64
_MAX_REQUEST_BYTES = 256 * 1024


class RestTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.base = tempfile.mkdtemp()
    cls.dense = tm.dual_dense_model(seed=0)
    cls.ratings = tm.dual_ratings_model(seed=0)
    testing.write_export(cls.dense, os.path.join(cls.base, "dense"), 1)
    testing.write_export(cls.ratings, os.path.join(cls.base, "ratings"), 7)
    ratings_config = server_lib.model_config(
        "ratings", os.path.join(cls.base, "ratings"))
    ratings_config.version_labels["stable"] = 7
    cls.server = server_lib.ModelServer(
        [server_lib.model_config("dense", os.path.join(cls.base, "dense")),
         ratings_config],
        poll_seconds=0, rest_api_port=0,
        options=server_lib.ServerOptions(
            max_batch_size=_MAX_BATCH, max_request_bytes=_MAX_REQUEST_BYTES))
    cls.server.start()
    cls.url = cls.server.rest_url
    cls.session = requests.Session()

  @classmethod
  def tearDownClass(cls):
    cls.session.close()
    cls.server.stop()
    shutil.rmtree(cls.base, ignore_errors=True)
    super().tearDownClass()

  def _post(self, path, body):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return self.session.post(self.url + path, data=data, timeout=_TIMEOUT)

  def _get(self, path):
    return self.session.get(self.url + path, timeout=_TIMEOUT)

  def assertOutputsClose(self, got, expected):
    for key in contract.OUTPUT_KEYS:
      self.assertAllClose(np.asarray(got[key], np.float32), expected[key],
                          rtol=1e-5, atol=1e-6)

  def test_row_format_single_input(self):
    x = testing.dense_inputs(3, seed=1)
    response = self._post("/v1/models/dense:predict",
                          {"instances": x.tolist()})
    self.assertEqual(response.status_code, 200, response.text)
    self.assertEqual(response.headers["Content-Type"].split(";")[0],
                     "application/json")
    predictions = response.json()["predictions"]
    self.assertLen(predictions, 3)
    self.assertEqual(set(predictions[0]), set(contract.OUTPUT_KEYS))
    got = {key: [row[key] for row in predictions]
           for key in contract.OUTPUT_KEYS}
    self.assertOutputsClose(got, self.dense(x, training=False))

  def test_columnar_format_single_input(self):
    x = testing.dense_inputs(2, seed=2)
    expected = self.dense(x, training=False)
    for inputs in (x.tolist(), {"x": x.tolist()}):
      response = self._post("/v1/models/dense/versions/1:predict",
                            {"signature_name": "serving_default",
                             "inputs": inputs})
      self.assertEqual(response.status_code, 200, response.text)
      self.assertOutputsClose(response.json()["outputs"], expected)

  def test_named_inputs_in_both_formats_and_by_label(self):
    r = testing.ratings_inputs(3, seed=3)
    expected = self.ratings(r, training=False)
    instances = [{name: r[name][i].tolist() for name in r} for i in range(3)]
    response = self._post("/v1/models/ratings/labels/stable:predict",
                          {"instances": instances})
    self.assertEqual(response.status_code, 200, response.text)
    rows = response.json()["predictions"]
    self.assertOutputsClose(
        {key: [row[key] for row in rows] for key in contract.OUTPUT_KEYS},
        expected)
    response = self._post("/v1/models/ratings:predict",
                          {"inputs": {k: v.tolist() for k, v in r.items()}})
    self.assertEqual(response.status_code, 200, response.text)
    self.assertOutputsClose(response.json()["outputs"], expected)

  def test_status_and_metadata(self):
    for path in ("/v1/models/dense", "/v1/models/dense/versions/1",
                 "/V1/Models/dense"):
      with self.subTest(path):
        response = self._get(path)
        self.assertEqual(response.status_code, 200, response.text)
        self.assertEqual(response.json(), {"model_version_status": [{
            "version": "1", "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""}}]})
    response = self._get("/v1/models/ratings/labels/stable/metadata")
    self.assertEqual(response.status_code, 200, response.text)
    body = response.json()
    self.assertEqual(body["model_spec"],
                     {"name": "ratings", "signature_name": "",
                      "version": "7"})
    signature = body["metadata"]["signature_def"]["signature_def"][
        contract.SERVING_SIGNATURE]
    self.assertEqual(set(signature["inputs"]),
                     {"user_id", "movie_id", "context"})
    self.assertEqual(signature["inputs"]["user_id"]["dtype"], "DT_INT64")
    self.assertEqual(set(signature["outputs"]), set(contract.OUTPUT_KEYS))

  def test_bad_requests_get_tf_serving_codes_and_server_stays_up(self):
    x = testing.dense_inputs(2).tolist()
    r = testing.ratings_inputs(2)
    cases = [
        ("not JSON", "POST", "/v1/models/dense:predict", b"{nope", 400,
         "JSON Parse error"),
        ("empty body", "POST", "/v1/models/dense:predict", b"", 400,
         "JSON Parse error: The document is empty"),
        ("not an object", "POST", "/v1/models/dense:predict", b"[1]", 400,
         "Is not object"),
        ("neither key", "POST", "/v1/models/dense:predict", {"x": x}, 400,
         "Missing 'inputs' or 'instances' key"),
        ("both keys", "POST", "/v1/models/dense:predict",
         {"instances": x, "inputs": x}, 400,
         "expecting only one of 'inputs' or 'instances' keys to exist"),
        ("empty instances", "POST", "/v1/models/dense:predict",
         {"instances": []}, 400, "No values in 'instances' array"),
        ("ragged instances", "POST", "/v1/models/dense:predict",
         {"instances": [[1.0, 2.0, 3.0, 4.0], [1.0]]}, 400,
         "Expecting shape [4] but got: [1]"),
        ("wrong type", "POST", "/v1/models/dense:predict",
         {"inputs": [["a", "b", "c", "d"]]}, 400,
         "JSON Value: \"a\" Type: String is not of expected type: float32"),
        ("wrong width", "POST", "/v1/models/dense:predict",
         {"inputs": [[1.0, 2.0]]}, 400,
         "Input \"x\" expects shape [-1,4] but got [1,2]"),
        ("oversized batch", "POST", "/v1/models/dense:predict",
         {"inputs": [[0.0] * 4] * (_MAX_BATCH + 1)}, 400,
         f"has batch size {_MAX_BATCH + 1}, larger than the maximum"),
        ("plain list, several inputs", "POST", "/v1/models/ratings:predict",
         {"instances": [1, 2]}, 400, "instances is a plain list"),
        ("missing named input", "POST", "/v1/models/ratings:predict",
         {"inputs": {"user_id": r["user_id"].tolist()}}, 400,
         "Missing named input: context in 'inputs' object."),
        ("float for int64", "POST", "/v1/models/ratings:predict",
         {"inputs": {"user_id": [1.5, 2.5],
                     "movie_id": r["movie_id"].tolist(),
                     "context": r["context"].tolist()}}, 400,
         "is not of expected type: int64"),
        ("embedding id out of range", "POST", "/v1/models/ratings:predict",
         {"inputs": {"user_id": [10**6, 1],
                     "movie_id": r["movie_id"].tolist(),
                     "context": r["context"].tolist()}}, 400, "indices"),
        ("unknown signature", "POST", "/v1/models/dense:predict",
         {"signature_name": "nope", "instances": x}, 400,
         "Serving signature name: \"nope\" not found in signature def"),
        ("signature not a string", "POST", "/v1/models/dense:predict",
         {"signature_name": 3, "instances": x}, 400,
         "'signature_name' key must be a string value."),
        ("unknown model", "POST", "/v1/models/nope:predict",
         {"instances": x}, 404,
         "Servable not found for request: Latest(nope)"),
        ("unknown version", "POST", "/v1/models/dense/versions/9:predict",
         {"instances": x}, 404,
         "Servable not found for request: Specific(dense, 9)"),
        ("unknown label", "GET", "/v1/models/ratings/labels/nope", None, 400,
         "Unrecognized servable version label: nope"),
        ("status of unknown version", "GET", "/v1/models/dense/versions/9",
         None, 404, "Could not find version 9 of model dense"),
        ("no model name", "GET", "/v1/models", None, 400,
         "Missing model name in request."),
        ("classify", "POST", "/v1/models/dense:classify", {"examples": []},
         501, "Classify is not served"),
        ("malformed path", "POST", "/v1/models/dense:explode",
         {"instances": x}, 400,
         "Malformed request: POST /v1/models/dense:explode"),
        ("GET a predict path", "GET", "/v1/models/dense:predict", None, 400,
         "Malformed request: GET /v1/models/dense:predict"),
        ("body too large", "POST", "/v1/models/dense:predict",
         b" " * (_MAX_REQUEST_BYTES + 1), 429, "Request body larger than"),
    ]
    for name, method, path, body, status, message in cases:
      with self.subTest(name):
        if method == "GET":
          response = self._get(path)
        else:
          response = self._post(path, body)
        self.assertEqual(response.status_code, status, response.text)
        self.assertIn(message, response.json()["error"])
    self.assertEqual(self._get("/other").status_code, 404)
    x = testing.dense_inputs(2, seed=5)
    response = self._post("/v1/models/dense:predict", {"inputs": x.tolist()})
    self.assertEqual(response.status_code, 200, response.text)
    self.assertOutputsClose(response.json()["outputs"],
                            self.dense(x, training=False))

  def test_nan_and_infinity_tokens_are_read(self):
    # TF Serving parses with rapidjson's kParseNanAndInfFlag.
    response = self._post("/v1/models/dense:predict",
                          '{"inputs": [[NaN, Infinity, -Infinity, 3.0]]}')
    self.assertEqual(response.status_code, 200, response.text)


if __name__ == "__main__":
  tf.test.main()
