"""Tests of serving/servicers.py: the RPCs over gRPC, answers and errors.

One in-process `ModelServer` on 127.0.0.1 serves a dense and a ratings
model; requests go through the official stubs, as a TF Serving client's do.
"""

import os
import shutil
import tempfile
from unittest import mock

import grpc
import numpy as np

from dropvar_tf import contract
from dropvar_tf._keras import tf
from dropvar_tf.serving import codec
from dropvar_tf.serving import server as server_lib
import serving_testing as testing
import testing_models as tm
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.framework import tensor_shape_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

_MAX_BATCH = 64
_TIMEOUT = 10.0
_AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
_predict_request = testing.predict_request


def _tensor(dtype, dims=(), content=None, unknown_rank=False):
  """A TensorProto built by hand, so malformed ones can be made too."""
  proto = tensor_pb2.TensorProto(dtype=dtype)
  if unknown_rank:
    proto.tensor_shape.unknown_rank = True
  for d in dims:
    proto.tensor_shape.dim.add(size=d)
  if content is not None:
    proto.tensor_content = content
  return proto


class ServicersTest(tf.test.TestCase):
  """One in-process server with a dense and a ratings model."""

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
    ratings_config.version_labels["canary"] = 8  # Never exported.
    cls.server = server_lib.ModelServer(
        [server_lib.model_config("dense", os.path.join(cls.base, "dense")),
         ratings_config],
        poll_seconds=0,
        options=server_lib.ServerOptions(
            max_batch_size=_MAX_BATCH,
            allow_version_labels_for_unavailable_models=True))
    cls.server.start()
    cls.channel = grpc.insecure_channel(cls.server.target)
    cls.stub = prediction_service_pb2_grpc.PredictionServiceStub(cls.channel)
    cls.model_stub = model_service_pb2_grpc.ModelServiceStub(cls.channel)

  @classmethod
  def tearDownClass(cls):
    cls.channel.close()
    cls.server.stop()
    shutil.rmtree(cls.base, ignore_errors=True)
    super().tearDownClass()

  def _good_request(self):
    return _predict_request("dense", {"x": testing.dense_inputs(3)})

  def assertRpcError(self, call, request, code, message):
    with self.assertRaises(grpc.RpcError) as cm:
      call(request, timeout=_TIMEOUT)
    self.assertEqual(cm.exception.code(), code, cm.exception.details())
    self.assertIn(message, cm.exception.details())

  def test_predict_matches_in_process_model(self):
    x = testing.dense_inputs(5, seed=1)
    response = self.stub.Predict(_predict_request("dense", {"x": x}),
                                 timeout=_TIMEOUT)
    expected = self.dense(x)
    self.assertEqual(set(response.outputs), set(contract.OUTPUT_KEYS))
    for key in contract.OUTPUT_KEYS:
      self.assertAllClose(tf.make_ndarray(response.outputs[key]),
                          expected[key], rtol=1e-6, atol=1e-6)
    self.assertEqual(response.model_spec.name, "dense")
    self.assertEqual(response.model_spec.version.value, 1)
    self.assertEqual(response.model_spec.signature_name,
                     contract.SERVING_SIGNATURE)

  def test_named_int64_inputs_match_in_process_model(self):
    x = testing.ratings_inputs(6, seed=2)
    response = self.stub.Predict(
        _predict_request("ratings", x, signature=contract.SERVING_SIGNATURE),
        timeout=_TIMEOUT)
    expected = self.ratings(x)
    for key in contract.OUTPUT_KEYS:
      self.assertAllClose(tf.make_ndarray(response.outputs[key]),
                          expected[key], rtol=1e-6, atol=1e-6)
    self.assertEqual(response.model_spec.version.value, 7)

  def test_typed_value_fields_are_accepted(self):
    # TF Serving clients may send per-element float_val lists; they must
    # decode like tensor_content does.
    x = testing.dense_inputs(2, seed=3)
    proto = _tensor(types_pb2.DT_FLOAT, x.shape)
    proto.float_val.extend(x.ravel().tolist())
    response = self.stub.Predict(_predict_request("dense", {"x": proto}),
                                 timeout=_TIMEOUT)
    self.assertAllClose(tf.make_ndarray(response.outputs["variation"]),
                        self.dense(x)["variation"], rtol=1e-6, atol=1e-6)

  def test_output_filter_returns_only_the_asked_outputs(self):
    request = _predict_request("dense", {"x": testing.dense_inputs(2)},
                               output_filter=[contract.VARIATION_KEY])
    response = self.stub.Predict(request, timeout=_TIMEOUT)
    self.assertEqual(list(response.outputs), [contract.VARIATION_KEY])

  def test_version_and_label_selection(self):
    x = testing.ratings_inputs(2)
    by_version = self.stub.Predict(_predict_request("ratings", x, version=7),
                                   timeout=_TIMEOUT)
    by_label = self.stub.Predict(_predict_request("ratings", x,
                                                  label="stable"),
                                 timeout=_TIMEOUT)
    self.assertEqual(by_version.model_spec.version.value, 7)
    self.assertEqual(by_label.model_spec.version.value, 7)
    # A label pointing at a version that is not loaded: NOT_FOUND.
    self.assertRpcError(self.stub.Predict,
                        _predict_request("ratings", x, label="canary"),
                        grpc.StatusCode.NOT_FOUND,
                        "Servable not found for request: Specific(ratings, 8)")

  def test_metadata_packs_signature_def_map(self):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "ratings"
    request.metadata_field.append("signature_def")
    response = self.stub.GetModelMetadata(request, timeout=_TIMEOUT)
    self.assertEqual(response.model_spec.version.value, 7)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    self.assertTrue(response.metadata["signature_def"].Unpack(signature_map))
    serving = signature_map.signature_def[contract.SERVING_SIGNATURE]
    self.assertEqual(set(serving.inputs), {"user_id", "movie_id", "context"})
    self.assertEqual(serving.inputs["user_id"].dtype, types_pb2.DT_INT64)
    self.assertEqual(set(serving.outputs), set(contract.OUTPUT_KEYS))

  def test_model_status(self):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "ratings"
    response = self.model_stub.GetModelStatus(request, timeout=_TIMEOUT)
    self.assertLen(response.model_version_status, 1)
    status = response.model_version_status[0]
    self.assertEqual((status.version, status.state), (7, _AVAILABLE))
    self.assertEqual(status.status.error_code, 0)

  def test_malformed_requests_get_clear_statuses(self):
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    not_found = grpc.StatusCode.NOT_FOUND
    x = testing.dense_inputs(2)
    r = testing.ratings_inputs(3)
    predict, metadata, status = (self.stub.Predict, self.stub.GetModelMetadata,
                                 self.model_stub.GetModelStatus)
    no_field = get_model_metadata_pb2.GetModelMetadataRequest()
    no_field.model_spec.name = "dense"
    bad_field = get_model_metadata_pb2.GetModelMetadataRequest()
    bad_field.model_spec.name = "dense"
    bad_field.metadata_field.append("foo")
    status_version = get_model_status_pb2.GetModelStatusRequest()
    status_version.model_spec.name = "dense"
    status_version.model_spec.version.value = 99
    status_model = get_model_status_pb2.GetModelStatusRequest()
    status_model.model_spec.name = "nope"
    big = _MAX_BATCH + 1
    # (case, rpc, request, code, expected part of the message).
    cases = [
        ("unknown model", predict, _predict_request("nope", {"x": x}),
         not_found, "Servable not found for request: Latest(nope)"),
        ("unknown version", predict,
         _predict_request("dense", {"x": x}, version=99), not_found,
         "Servable not found for request: Specific(dense, 99)"),
        ("unknown label", predict,
         _predict_request("dense", {"x": x}, label="nope"), invalid,
         "Unrecognized servable version label: nope"),
        ("unknown signature", predict,
         _predict_request("dense", {"x": x}, signature="nope"),
         grpc.StatusCode.FAILED_PRECONDITION,
         "Serving signature key \"nope\" not found."),
        ("initialization signature", predict,
         _predict_request("dense", {}, signature="__saved_model_init_op"),
         invalid, "Output __saved_model_init_op names the operation NoOp, "
         "not a tensor: it has no value to return"),
        ("no model spec", predict, predict_pb2.PredictRequest(), invalid,
         "Missing ModelSpec"),
        ("missing input", predict,
         _predict_request("ratings", {"user_id": r["user_id"],
                                      "context": r["context"]}), invalid,
         "Missing but required: {movie_id}."),
        ("extra input", predict,
         _predict_request("dense", {"x": x, "bogus": x}), invalid,
         "Sent extra: {bogus}."),
        ("wrong dtype", predict,
         _predict_request("dense", {"x": x.astype(np.int64)}), invalid,
         "Input \"x\" expects dtype float32 but int64 was sent."),
        ("unknown dtype enum", predict,
         _predict_request("dense", {"x": _tensor(999, [1, 4])}),
         invalid, "Input \"x\" expects dtype float32 but unknown dtype 999"),
        ("wrong rank", predict,
         _predict_request("dense", {"x": x[0]}), invalid,
         "Input \"x\" expects rank 2 (shape [-1,4]) but got rank 1"),
        ("wrong shape", predict,
         _predict_request("dense", {"x": np.zeros((2, 5), np.float32)}),
         invalid, "Input \"x\" expects shape [-1,4] but got [2,5]"),
        ("empty batch", predict,
         _predict_request("dense", {"x": np.zeros((0, 4), np.float32)}),
         invalid, "Input \"x\" has an empty batch (batch size 0)"),
        ("oversized batch", predict,
         _predict_request("dense", {"x": np.zeros((big, 4), np.float32)}),
         invalid, f"Input \"x\" has batch size {big}, larger than the "
         f"maximum batch size {_MAX_BATCH}"),
        ("batch sizes differ", predict,
         _predict_request("ratings", dict(r, movie_id=r["movie_id"][:2])),
         invalid, "Input \"movie_id\" has batch size 2 but input \"context\" "
         "has 3"),
        ("garbage bytes", predict,
         _predict_request("dense", {"x": _tensor(types_pb2.DT_FLOAT, [1, 4],
                                                 b"\x01" * 7)}), invalid,
         "Input \"x\": tensor_content has 7 bytes, not a multiple of 4"),
        ("content does not fill shape", predict,
         _predict_request("dense", {"x": _tensor(types_pb2.DT_FLOAT, [2, 4],
                                                 b"\x00" * 12)}), invalid,
         "Input \"x\": tensor_content holds 3 float32 values but shape [2,4] "
         "needs 8"),
        ("too many typed values", predict,
         _predict_request("dense", {"x": tensor_pb2.TensorProto(
             dtype=types_pb2.DT_FLOAT, float_val=[1.0] * 9,
             tensor_shape=tensor_shape_pb2.TensorShapeProto(
                 dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=2),
                      tensor_shape_pb2.TensorShapeProto.Dim(size=4)]))}),
         invalid, "Input \"x\" holds 9 values but shape [2,4] needs 8"),
        ("unknown rank", predict,
         _predict_request("dense", {"x": _tensor(types_pb2.DT_FLOAT,
                                                 unknown_rank=True)}),
         invalid, "Input \"x\" has an unknown rank"),
        ("negative dimension", predict,
         _predict_request("dense", {"x": _tensor(types_pb2.DT_FLOAT,
                                                 [-1, 4])}), invalid,
         "Input \"x\" has a negative dimension in shape [-1,4]"),
        ("shape too large to decode", predict,
         _predict_request("dense", {"x": _tensor(types_pb2.DT_FLOAT,
                                                 [10**12, 4])}), invalid,
         "Input \"x\" has batch size 1000000000000, larger than the maximum "
         "batch size"),
        ("bad output filter", predict,
         _predict_request("dense", {"x": x}, output_filter=["bogus"]),
         invalid, "output tensor alias not found in signature: bogus Outputs "
         "expected to be in the set {prediction,variation}."),
        ("duplicate output filter", predict,
         _predict_request("dense", {"x": x},
                          output_filter=["variation", "variation"]),
         invalid, "duplicate output tensor alias: variation"),
        ("embedding id out of range", predict,
         _predict_request("ratings", dict(r, user_id=np.full(3, 10**6,
                                                             np.int64))),
         invalid, "indices"),
        ("metadata without field", metadata, no_field, invalid,
         "GetModelMetadataRequest must specify at least one metadata_field"),
        ("metadata unknown field", metadata, bad_field, invalid,
         "Metadata field foo is not supported"),
        ("status unknown version", status, status_version, not_found,
         "Could not find version 99 of model dense"),
        ("status unknown model", status, status_model, not_found,
         "Could not find any versions of model nope"),
    ]
    for name, call, request, code, message in cases:
      with self.subTest(name):
        self.assertRpcError(call, request, code, message)
    # The server is still healthy and correct afterwards: both models are
    # still loaded and answer.
    for model, version in (("dense", 1), ("ratings", 7)):
      request = get_model_status_pb2.GetModelStatusRequest()
      request.model_spec.name = model
      response = self.model_stub.GetModelStatus(request, timeout=_TIMEOUT)
      self.assertEqual([(s.version, s.state)
                        for s in response.model_version_status],
                       [(version, _AVAILABLE)])
    x = testing.dense_inputs(4, seed=9)
    response = self.stub.Predict(_predict_request("dense", {"x": x}),
                                 timeout=_TIMEOUT)
    self.assertAllClose(tf.make_ndarray(response.outputs["prediction"]),
                        self.dense(x)["prediction"], rtol=1e-6, atol=1e-6)

  def test_claimed_huge_shape_is_refused_before_decoding(self):
    # One typed value claiming a million rows: TF would repeat it to fill the
    # shape, so the batch limit must be checked on the claimed shape.
    claim = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, float_val=[1.0],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=10**6),
                 tensor_shape_pb2.TensorShapeProto.Dim(size=4)]))
    with mock.patch.object(codec, "decode", wraps=codec.decode) as decode:
      self.assertRpcError(
          self.stub.Predict, _predict_request("dense", {"x": claim}),
          grpc.StatusCode.INVALID_ARGUMENT,
          "Input \"x\" has batch size 1000000, larger than the maximum batch "
          f"size {_MAX_BATCH}")
    decode.assert_not_called()

  def test_nan_inputs_pass_through_by_default(self):
    x = testing.dense_inputs(3)
    x[0, 0] = np.nan
    x[1, 1] = np.inf
    response = self.stub.Predict(_predict_request("dense", {"x": x}),
                                 timeout=_TIMEOUT)
    served = tf.saved_model.load(os.path.join(self.base, "dense", "1"))
    expected = served.signatures[contract.SERVING_SIGNATURE](x=x)
    for key in contract.OUTPUT_KEYS:
      got = tf.make_ndarray(response.outputs[key])
      # Exactly what the loaded signature does with NaN/Inf (a fused relu
      # may map NaN to 0, so compare with the graph, not the Keras model).
      self.assertAllEqual(np.isfinite(got), np.isfinite(expected[key]))
      self.assertAllClose(got[2], expected[key][2], rtol=1e-6, atol=1e-6)
    self.assertFalse(np.all(np.isfinite(
        tf.make_ndarray(response.outputs["prediction"]))))

  def test_handler_exception_becomes_internal(self):
    request = self._good_request()

    def broken(array):
      raise RuntimeError("encoder exploded")

    with mock.patch.object(codec, "encode", broken):
      self.assertRpcError(self.stub.Predict, request,
                          grpc.StatusCode.INTERNAL,
                          "Predict failed: RuntimeError: encoder exploded")
    self.stub.Predict(request, timeout=_TIMEOUT)


if __name__ == "__main__":
  tf.test.main()
