"""Tests of serving/json_codec.py: TF Serving's JSON tensor format."""

import base64
import json

import grpc
import numpy as np

from dropvar_tf._keras import tf
from dropvar_tf.serving import errors
from dropvar_tf.serving import json_codec
from tensorflow.core.framework import types_pb2


class JsonCodecTest(tf.test.TestCase):

  def assertInvalid(self, call, message):
    with self.assertRaises(errors.ServingError) as cm:
      call()
    self.assertEqual(cm.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
    self.assertIn(message, cm.exception.message)

  def test_to_array_dtypes(self):
    self.assertAllEqual(json_codec.to_array([[1, 2.5]], types_pb2.DT_FLOAT),
                        np.array([[1, 2.5]], np.float32))
    self.assertEqual(json_codec.to_array([1, 2], types_pb2.DT_INT64).dtype,
                     np.int64)
    self.assertAllEqual(json_codec.to_array([True], types_pb2.DT_BOOL),
                        [True])
    strings = json_codec.to_array(
        [{"b64": base64.b64encode(b"\x00\xff").decode()}, "text"],
        types_pb2.DT_STRING)
    self.assertEqual(strings.tolist(), [b"\x00\xff", b"text"])
    self.assertEqual(json_codec.to_array(3.0, types_pb2.DT_FLOAT).shape, ())

  def test_to_array_errors(self):
    float32 = types_pb2.DT_FLOAT
    cases = [
        ([[1.0], [1.0, 2.0]], float32,
         "Encountered list at unexpected size: 2 at level: 1 expected size: "
         "1"),
        ([[1.0], 2.0], float32,
         "JSON Value: 2.0 found at incorrect level: 2 in the JSON DOM. "
         "Expected at level: 2"),
        ([1, 2.5], types_pb2.DT_INT32,
         "JSON Value: 2.5 Type: Number is not of expected type: int32"),
        ([2**40], types_pb2.DT_INT32, "does not fit in int32"),
        ([1], types_pb2.DT_BOOL,
         "JSON Value: 1 Type: Number is not of expected type: bool"),
        ([{"b64": "!!"}], types_pb2.DT_STRING, "Unable to base64 decode"),
        ([{"b64": 3}], types_pb2.DT_STRING,
         "not formatted correctly for base64 data"),
        ([None], float32, "JSON Value: null Type: Null is not of expected "
         "type: float32"),
        # A finite value beyond float32's range would become inf.
        ([0.5, 4e38], float32, "Cannot convert JSON value: 4e+38 to "
         "float32 without loss of precision."),
        ([0.5, -1e300], types_pb2.DT_HALF, "Cannot convert JSON value: "
         "1e+300 to float16 without loss of precision."),
    ]
    for value, dtype, message in cases:
      with self.subTest(message):
        self.assertInvalid(lambda v=value, d=dtype: json_codec.to_array(v, d),
                           message)

  def test_float_inputs_take_any_json_number_in_their_range(self):
    # Integers of 2**64 and more are doubles, as TF Serving's parser reads
    # them; NaN and Infinity tokens pass.
    got = json_codec.to_array([10**20, 2**64, 2**63, 0.5, 3e38],
                              types_pb2.DT_FLOAT)
    self.assertEqual(got.dtype, np.float32)
    self.assertAllClose(got, [1e20, 2.0**64, 2.0**63, 0.5, 3e38])
    doc, _ = json_codec.parse_predict_request(
        '{"inputs": [NaN, Infinity, -Infinity, 1e38]}')
    got = json_codec.to_array(doc["inputs"], types_pb2.DT_FLOAT)
    self.assertTrue(np.isnan(got[0]))
    self.assertAllEqual(got[1:], np.array([np.inf, -np.inf, 1e38],
                                          np.float32))

  def test_a_number_too_big_for_a_double_is_a_parse_error(self):
    self.assertInvalid(
        lambda: json_codec.parse_predict_request('{"inputs": [1e400]}'),
        "JSON Parse error: Number too big to be stored in double: 1e400")

  def test_row_and_columnar_responses(self):
    outputs = {"prediction": np.array([[0.2], [1.0]], np.float32),
               "variation": np.array([[np.nan], [np.inf]], np.float32)}
    row = json_codec.predict_response(outputs, json_codec.ROW)
    self.assertEqual(row, '{"predictions": [{"prediction": [0.2], '
                     '"variation": [NaN]}, {"prediction": [1.0], '
                     '"variation": [Infinity]}]}')
    columnar = json.loads(json_codec.predict_response(outputs,
                                                      json_codec.COLUMNAR))
    self.assertEqual(columnar["outputs"]["prediction"], [[0.2], [1.0]])
    single = json_codec.predict_response(
        {"prediction": outputs["prediction"]}, json_codec.ROW)
    self.assertEqual(json.loads(single), {"predictions": [[0.2], [1.0]]})
    self.assertEqual(
        json.loads(json_codec.predict_response(
            {"image_bytes": np.array([b"\x01"], dtype=object)},
            json_codec.COLUMNAR)),
        {"outputs": [{"b64": "AQ=="}]})

  def test_outputs_from_response_round_trip(self):
    outputs = {"prediction": np.array([[0.25], [1.5]], np.float32),
               "variation": np.array([[0.5], [2.0]], np.float32)}
    dtypes = dict.fromkeys(outputs, types_pb2.DT_FLOAT)
    for request_format in (json_codec.ROW, json_codec.COLUMNAR):
      body = json_codec.predict_response(outputs, request_format)
      back = json_codec.outputs_from_response(body, request_format, dtypes)
      for key, value in outputs.items():
        self.assertAllEqual(back[key], value)

  def test_predict_inputs_formats(self):
    dtypes = {"a": types_pb2.DT_INT64, "b": types_pb2.DT_FLOAT}
    doc = {"instances": [{"a": 1, "b": [0.5, 1.5]}, {"a": 2, "b": [2.5, 3]}]}
    arrays, request_format = json_codec.predict_inputs(doc, dtypes)
    self.assertEqual(request_format, json_codec.ROW)
    self.assertAllEqual(arrays["a"], [1, 2])
    self.assertAllEqual(arrays["b"], [[0.5, 1.5], [2.5, 3.0]])
    arrays, request_format = json_codec.predict_inputs(
        {"inputs": {"a": [1, 2], "b": [[0.5, 1.5], [2.5, 3]]}}, dtypes)
    self.assertEqual(request_format, json_codec.COLUMNAR)
    self.assertAllEqual(arrays["a"], [1, 2])
    self.assertInvalid(
        lambda: json_codec.predict_inputs(
            {"instances": [{"a": 1, "b": [0.5, 1.5]}, {"a": 2}]}, dtypes),
        "Failed to process element: 1 of 'instances' list. JSON object: "
        "{\"a\":2} keys must be equal to: a,b")
    self.assertInvalid(
        lambda: json_codec.predict_inputs(
            {"instances": [{"a": 1, "b": [0.5], "c": 3}]}, dtypes),
        "JSON object: does not have named input: c")


if __name__ == "__main__":
  tf.test.main()
