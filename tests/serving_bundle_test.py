"""Tests of serving/bundle.py: TF Serving's Session loading path, warm-up."""

import os
import tempfile
from unittest import mock

import grpc
import numpy as np

from dropvar_tf import contract
from dropvar_tf._keras import tf
from dropvar_tf.serving import bundle
from dropvar_tf.serving import codec
from dropvar_tf.serving import errors
import serving_testing as testing
import testing_models as tm
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2


def _write_warmup(path, requests):
  folder = os.path.join(path, "assets.extra")
  os.makedirs(folder, exist_ok=True)
  with tf.io.TFRecordWriter(os.path.join(path, bundle.WARMUP_PATH)) as writer:
    for request in requests:
      writer.write(prediction_log_pb2.PredictionLog(
          predict_log=prediction_log_pb2.PredictLog(
              request=request)).SerializeToString())


def _request(inputs):
  request = predict_pb2.PredictRequest()
  for alias, array in inputs.items():
    request.inputs[alias].CopyFrom(codec.encode(array))
  return request


class SavedModelBundleTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.base = tempfile.mkdtemp(dir=self.get_temp_dir())
    self.model = tm.dual_ratings_model(seed=2)
    self.path = testing.write_export(self.model, self.base, 1)

  def test_runs_signature_tensor_names_in_a_session(self):
    # Never the TF2 object path: TF Serving does not have it.
    with mock.patch.object(tf.saved_model, "load",
                           side_effect=AssertionError("TF2 load used")):
      loaded = bundle.SavedModelBundle(1, self.path)
    fn, specs, signature_def = loaded.signature(contract.SERVING_SIGNATURE)
    self.assertEqual(specs["context"].dims, (-1, tm.DUAL_CONTEXT_FEATURES))
    self.assertEqual(set(signature_def.outputs), set(contract.OUTPUT_KEYS))
    x = testing.ratings_inputs(5, seed=3)
    outputs = fn(**x)
    expected = self.model(x, training=False)
    for key in contract.OUTPUT_KEYS:
      self.assertIsInstance(outputs[key], np.ndarray)
      self.assertAllClose(outputs[key], expected[key], rtol=1e-6, atol=1e-6)
    self.assertEqual(loaded.warmup_records, 0)
    with self.assertRaises(errors.ServingError) as cm:
      loaded.signature("nope")
    self.assertEqual(cm.exception.code, grpc.StatusCode.FAILED_PRECONDITION)

  def test_warmup_records_are_replayed(self):
    _write_warmup(self.path, [_request(testing.ratings_inputs(n, seed=n))
                              for n in (1, 2, 3)])
    call = bundle._SessionSignature.__call__
    with mock.patch.object(bundle._SessionSignature, "__call__",
                           autospec=True, side_effect=call) as run:
      loaded = bundle.SavedModelBundle(1, self.path)
    self.assertEqual(loaded.warmup_records, 3)
    self.assertEqual(run.call_count, 3)

  def test_a_bad_warmup_record_fails_the_load(self):
    _write_warmup(self.path, [_request({"x": np.zeros((1, 4), np.float32)})])
    with self.assertRaisesRegex(errors.ServingError,
                                "has the inputs \\['x'\\]; signature "
                                "serving_default takes"):
      bundle.SavedModelBundle(1, self.path)


if __name__ == "__main__":
  tf.test.main()
