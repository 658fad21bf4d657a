"""Property test: random requests never crash or hang the local server.

Every answer must be a PredictResponse or a clean gRPC status (a known code
and a non-empty message); never INTERNAL/UNKNOWN (an unhandled bug) and never
a missed deadline (a hang). The server must still answer a good request
correctly afterwards.
"""

import os
import shutil
import tempfile

import grpc
import hypothesis
from hypothesis import strategies as st
import numpy as np

from dropvar_tf import contract
from dropvar_tf._keras import tf
from dropvar_tf.serving import server as server_lib
import serving_testing as testing
import testing_models as tm
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

_TIMEOUT = 10.0
_CLEAN_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
})
_NAMES = ["x", "user_id", "movie_id", "context", "bogus", ""]
_DTYPES = [types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_INT32,
           types_pb2.DT_INT64, types_pb2.DT_UINT8, types_pb2.DT_BOOL,
           types_pb2.DT_HALF, types_pb2.DT_BFLOAT16, types_pb2.DT_STRING,
           types_pb2.DT_COMPLEX64, types_pb2.DT_RESOURCE, types_pb2.DT_INVALID,
           types_pb2.DT_QINT8, 1234]
_SETTINGS = hypothesis.settings(
    max_examples=150, deadline=None, derandomize=True, database=None,
    suppress_health_check=list(hypothesis.HealthCheck))


@st.composite
def tensors(draw, dtype=None):
  """A TensorProto that may be valid, slightly off, or garbage.

  Args:
    draw: hypothesis' draw function.
    dtype: the dtype the signature expects, drawn more often than others.
  """
  dtypes = _DTYPES if dtype is None else [dtype] * 6 + _DTYPES
  proto = tensor_pb2.TensorProto(dtype=draw(st.sampled_from(dtypes)))
  if draw(st.integers(0, 9)) == 0:
    proto.tensor_shape.unknown_rank = True
  dims = draw(st.lists(st.one_of(st.integers(0, 6),
                                 st.sampled_from([-1, 2**31, 10**15])),
                       max_size=3))
  for d in dims:
    proto.tensor_shape.dim.add(size=d)
  kind = draw(st.sampled_from(["content", "exact", "floats", "ints",
                               "strings", "empty"]))
  if kind == "content":
    proto.tensor_content = draw(st.binary(max_size=96))
  elif kind == "exact":
    # Exactly the right number of bytes for dtype and shape, when small.
    size = 1
    for d in dims:
      size *= max(d, 0)
    try:
      itemsize = np.dtype(tf.dtypes.as_dtype(proto.dtype).as_numpy_dtype
                         ).itemsize
    except (TypeError, ValueError, KeyError):  # No numpy type (resource).
      itemsize = 4
    if size * itemsize <= 4096:
      proto.tensor_content = draw(st.binary(min_size=size * itemsize,
                                            max_size=size * itemsize))
  elif kind == "floats":
    proto.float_val.extend(draw(st.lists(
        st.floats(width=32, allow_nan=True, allow_infinity=True),
        max_size=12)))
  elif kind == "ints":
    proto.int64_val.extend(draw(st.lists(
        st.integers(-2**63, 2**63 - 1), max_size=12)))
  elif kind == "strings":
    proto.string_val.extend(draw(st.lists(st.binary(max_size=8),
                                          max_size=4)))
  return proto


@st.composite
def dense_requests(draw):
  """Well-formed requests for the dense model (any floats, batch 1..20)."""
  batch = draw(st.integers(1, 20))
  values = draw(st.lists(st.floats(width=32), min_size=batch * 4,
                         max_size=batch * 4))
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "dense"
  request.inputs["x"].CopyFrom(tf.make_tensor_proto(
      np.array(values, np.float32).reshape(batch, 4)))
  return request


_MODEL_INPUTS = {
    "dense": {"x": types_pb2.DT_FLOAT},
    "ratings": {"user_id": types_pb2.DT_INT64, "movie_id": types_pb2.DT_INT64,
                "context": types_pb2.DT_FLOAT},
}


@st.composite
def requests(draw):
  """Mostly the right model, signature and input names, random tensors."""
  if draw(st.sampled_from([True, False, False, False])):
    return draw(dense_requests())
  request = predict_pb2.PredictRequest()
  model = draw(st.sampled_from(["dense", "ratings"] * 4 + ["nope", ""]) |
               st.text(max_size=6))
  if draw(st.sampled_from([True] * 19 + [False])):
    spec = request.model_spec
    spec.name = model
    choice = draw(st.sampled_from(["latest"] * 4 + ["version", "label"]))
    if choice == "version":
      spec.version.value = draw(st.sampled_from([1, 1, 2, 0, -1, 2**62]))
    elif choice == "label":
      spec.version_label = draw(st.sampled_from(["stable", "nope", ""]))
    spec.signature_name = draw(st.sampled_from(
        ["", "", contract.SERVING_SIGNATURE, "__saved_model_init_op",
         "nope"]))
  expected = _MODEL_INPUTS.get(model, {})
  names = list(expected)
  if not names or draw(st.sampled_from([True, False, False, False])):
    names = draw(st.lists(st.sampled_from(_NAMES) | st.text(max_size=4),
                          max_size=4, unique=True))
  for name in names:
    request.inputs[name].CopyFrom(draw(tensors(expected.get(name))))
  if draw(st.sampled_from([True, False, False])):
    request.output_filter.extend(draw(st.lists(
        st.sampled_from(list(contract.OUTPUT_KEYS) + ["bogus", ""]),
        max_size=3)))
  return request


class ServerFuzzTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.base = tempfile.mkdtemp()
    cls.dense = tm.dual_dense_model(seed=0)
    testing.write_export(cls.dense, os.path.join(cls.base, "dense"), 1)
    testing.write_export(tm.dual_ratings_model(seed=0),
                         os.path.join(cls.base, "ratings"), 1)
    ratings = server_lib.model_config("ratings",
                                      os.path.join(cls.base, "ratings"))
    ratings.version_labels["stable"] = 1
    cls.server = server_lib.ModelServer(
        [server_lib.model_config("dense", os.path.join(cls.base, "dense")),
         ratings], poll_seconds=0,
        options=server_lib.ServerOptions(max_batch_size=16,
                                         max_request_bytes=1 << 20))
    cls.server.start()
    cls.channel = grpc.insecure_channel(cls.server.target)
    cls.stub = prediction_service_pb2_grpc.PredictionServiceStub(cls.channel)

  @classmethod
  def tearDownClass(cls):
    cls.channel.close()
    cls.server.stop()
    shutil.rmtree(cls.base, ignore_errors=True)
    super().tearDownClass()

  def _assert_clean(self, call, request):
    try:
      response = call(request, timeout=_TIMEOUT)
    except grpc.RpcError as e:
      self.assertIn(e.code(), _CLEAN_CODES, e.details())
      self.assertTrue(e.details())
      return None
    return response

  def _assert_still_healthy(self):
    x = testing.dense_inputs(3, seed=11)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "dense"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    response = self.stub.Predict(request, timeout=_TIMEOUT)
    self.assertAllClose(tf.make_ndarray(response.outputs["variation"]),
                        self.dense(x)["variation"], rtol=1e-6, atol=1e-6)

  def test_random_predict_requests_get_a_result_or_a_clean_status(self):
    answered = []

    @_SETTINGS
    @hypothesis.given(requests())
    def check(request):
      response = self._assert_clean(self.stub.Predict, request)
      if response is not None:
        answered.append(response)
        self.assertTrue(set(response.outputs) <= set(contract.OUTPUT_KEYS))

    check()
    # Some random requests were valid and answered: the property is not
    # only about refusals.
    self.assertNotEmpty(answered)
    self._assert_still_healthy()

  def test_random_bytes_as_a_request(self):
    raw_predict = self.channel.unary_unary(
        "/tensorflow.serving.PredictionService/Predict",
        request_serializer=None, response_deserializer=None)

    @hypothesis.settings(_SETTINGS, max_examples=40)
    @hypothesis.given(st.binary(max_size=256))
    def check(payload):
      try:
        raw_predict(payload, timeout=_TIMEOUT)
      except grpc.RpcError as e:
        # Bytes that do not parse as a PredictRequest are refused by gRPC
        # itself ("Exception deserializing request!", INTERNAL); that is a
        # clean answer too, not a crash.
        self.assertIn(e.code(),
                      _CLEAN_CODES | {grpc.StatusCode.INTERNAL}, e.details())
        self.assertTrue(e.details())

    check()
    self._assert_still_healthy()


if __name__ == "__main__":
  tf.test.main()
