"""Tests of serving/server.py: the local TF Serving gRPC API server."""

import os
import shutil
import tempfile
import time
from unittest import mock

import grpc
import numpy as np

from dropvar_tf import contract
from dropvar_tf._keras import tf
from dropvar_tf.serving import server as server_lib
import serving_testing as testing
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.framework import tensor_shape_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MAX_BATCH = 64
_TIMEOUT = 10.0
_AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
_END = get_model_status_pb2.ModelVersionStatus.END


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


def _predict_request(model, inputs, version=None, label=None, signature=None,
                     output_filter=()):
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model
  if version is not None:
    request.model_spec.version.value = version
  if label is not None:
    request.model_spec.version_label = label
  if signature is not None:
    request.model_spec.signature_name = signature
  for name, value in inputs.items():
    proto = value if isinstance(value, tensor_pb2.TensorProto) else (
        server_lib.encode_tensor(value))
    request.inputs[name].CopyFrom(proto)
  request.output_filter.extend(output_filter)
  return request


def _wait_for(predicate, timeout=20.0, interval=0.05):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(interval)
  return False


class ServerTest(tf.test.TestCase):
  """One in-process server with a dense and a ratings model."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.base = tempfile.mkdtemp()
    cls.dense = testing.dense_model(seed=0)
    cls.ratings = testing.ratings_model(seed=0)
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
        options=server_lib.ServerOptions(max_batch_size=_MAX_BATCH))
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
         "Input \"x\" with shape [1000000000000,4] would take"),
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
    self.assertGreaterEqual(len(cases), 15)
    for name, call, request, code, message in cases:
      with self.subTest(name):
        self.assertRpcError(call, request, code, message)
    # The server is still healthy and correct afterwards.
    x = testing.dense_inputs(4, seed=9)
    response = self.stub.Predict(_predict_request("dense", {"x": x}),
                                 timeout=_TIMEOUT)
    self.assertAllClose(tf.make_ndarray(response.outputs["prediction"]),
                        self.dense(x)["prediction"], rtol=1e-6, atol=1e-6)

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

    with mock.patch.object(server_lib, "encode_tensor", broken):
      self.assertRpcError(self.stub.Predict, request,
                          grpc.StatusCode.INTERNAL,
                          "Predict failed: RuntimeError: encoder exploded")
    self.stub.Predict(request, timeout=_TIMEOUT)


class _TestCase(tf.test.TestCase):

  def _new_dir(self):
    return tempfile.mkdtemp(dir=self.get_temp_dir())


class ServerOptionsTest(_TestCase):
  """Servers with non-default options, and version polling."""

  def setUp(self):
    super().setUp()
    self.base = self._new_dir()
    self.model = testing.dense_model(seed=0)
    testing.write_export(self.model, self.base, 1)

  def _start(self, **kwargs):
    poll = kwargs.pop("poll_seconds", 0)
    server = server_lib.ModelServer(
        [server_lib.model_config("m", self.base)], poll_seconds=poll,
        options=server_lib.ServerOptions(**kwargs))
    server.start()
    self.addCleanup(server.stop)
    channel = grpc.insecure_channel(server.target)
    self.addCleanup(channel.close)
    return (prediction_service_pb2_grpc.PredictionServiceStub(channel),
            model_service_pb2_grpc.ModelServiceStub(channel))

  def _status(self, model_stub):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "m"
    response = model_stub.GetModelStatus(request, timeout=_TIMEOUT)
    return {s.version: (s.state, s.status.error_message)
            for s in response.model_version_status}

  def test_reject_non_finite_names_the_input(self):
    stub, _ = self._start(reject_non_finite=True)
    x = testing.dense_inputs(2)
    x[1, 2] = np.nan
    with self.assertRaises(grpc.RpcError) as cm:
      stub.Predict(_predict_request("m", {"x": x}), timeout=_TIMEOUT)
    self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
    self.assertIn("Input \"x\" contains NaN or Inf values",
                  cm.exception.details())
    stub.Predict(_predict_request("m", {"x": testing.dense_inputs(2)}),
                 timeout=_TIMEOUT)

  def test_request_size_is_bounded(self):
    stub, _ = self._start(max_request_bytes=64 * 1024)
    x = np.zeros((8192, 4), np.float32)  # 128 KiB of tensor_content.
    with self.assertRaises(grpc.RpcError) as cm:
      stub.Predict(_predict_request("m", {"x": x}), timeout=_TIMEOUT)
    self.assertEqual(cm.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
    stub.Predict(_predict_request("m", {"x": x[:16]}), timeout=_TIMEOUT)

  def test_xla_compiled_export_is_served(self):
    # `export_saved_model(..., jit_compile=True)`: this server runs it as it
    # is (tensorflow_model_server needs --xla_cpu_compilation_enabled).
    from dropvar_tf import saved_model  # pylint: disable=import-outside-toplevel
    xla_base = self._new_dir()
    saved_model.export_saved_model(self.model, xla_base, jit_compile=True)
    server = server_lib.ModelServer(
        [server_lib.model_config("xla", xla_base)], poll_seconds=0)
    server.start()
    self.addCleanup(server.stop)
    channel = grpc.insecure_channel(server.target)
    self.addCleanup(channel.close)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    for n in (1, 3):
      x = testing.dense_inputs(n, seed=n)
      response = stub.Predict(_predict_request("xla", {"x": x}),
                              timeout=_TIMEOUT)
      expected = self.model(x, training=False)
      for key in contract.OUTPUT_KEYS:
        self.assertAllClose(tf.make_ndarray(response.outputs[key]),
                            expected[key], rtol=1e-5, atol=1e-6)

  def test_new_version_is_picked_up_and_junk_is_ignored(self):
    stub, model_stub = self._start(poll_seconds=0.1)
    x = testing.dense_inputs(3, seed=4)
    self.assertEqual(stub.Predict(_predict_request("m", {"x": x}),
                                  timeout=_TIMEOUT).model_spec.version.value,
                     1)
    # Things a poller must skip: a temporary export folder, a numeric folder
    # without saved_model.pb yet, a non-numeric name and a plain file.
    os.makedirs(os.path.join(self.base, ".tmp-9-abc"))
    os.makedirs(os.path.join(self.base, "8", "variables"))
    os.makedirs(os.path.join(self.base, "7.tmp"))
    with open(os.path.join(self.base, "6"), "w") as f:
      f.write("not a folder")
    model2 = testing.dense_model(seed=5)
    testing.write_export(model2, self.base, 2)
    self.assertTrue(_wait_for(
        lambda: self._status(model_stub).get(2, (None,))[0] == _AVAILABLE))
    response = stub.Predict(_predict_request("m", {"x": x}), timeout=_TIMEOUT)
    self.assertEqual(response.model_spec.version.value, 2)
    self.assertAllClose(tf.make_ndarray(response.outputs["prediction"]),
                        model2(x)["prediction"], rtol=1e-6, atol=1e-6)
    self.assertNotAllClose(model2(x)["prediction"],
                           self.model(x)["prediction"])
    # The "latest 1" policy unloads version 1 once version 2 is available.
    self.assertTrue(_wait_for(lambda: self._status(model_stub)[1][0] == _END))
    self.assertEqual(set(self._status(model_stub)), {1, 2})

  def test_broken_version_is_reported_and_old_one_kept(self):
    stub, model_stub = self._start(poll_seconds=0.05)
    broken = os.path.join(self.base, "3")
    os.makedirs(broken)
    with open(os.path.join(broken, "saved_model.pb"), "wb") as f:
      f.write(b"this is not a SavedModel")
    self.assertTrue(_wait_for(lambda: 3 in self._status(model_stub)))
    self.assertTrue(_wait_for(
        lambda: "Loading failed" in self._status(model_stub)[3][1]))
    response = stub.Predict(
        _predict_request("m", {"x": testing.dense_inputs(1)}),
        timeout=_TIMEOUT)
    self.assertEqual(response.model_spec.version.value, 1)


class ConfigFileTest(_TestCase):

  def test_parses_model_server_config(self):
    path = os.path.join(self._new_dir(), "models.config")
    with open(path, "w") as f:
      f.write("""
model_config_list {
  config {
    name: "movies"
    base_path: "/models/movies"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 2 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 2 }
  }
  config { name: "digits" base_path: "/models/digits" }
}
""")
    configs = server_lib.model_configs_from_file(path)
    self.assertEqual([c.name for c in configs], ["movies", "digits"])
    self.assertEqual(dict(configs[0].version_labels),
                     {"stable": 1, "canary": 2})
    self.assertEqual(list(configs[0].model_version_policy.specific.versions),
                     [1, 2])

  def test_deploy_models_config_parses(self):
    configs = server_lib.model_configs_from_file(
        os.path.join(_REPO_ROOT, "serving", "deploy", "models.config"))
    self.assertNotEmpty(configs)
    for c in configs:
      self.assertEqual(c.model_platform, "tensorflow")
      self.assertStartsWith(c.base_path, "/models/")

  def test_bad_config_file_is_a_clear_error(self):
    path = os.path.join(self._new_dir(), "bad.config")
    with open(path, "w") as f:
      f.write("model_config_list { config { nam: 'x' } }")
    with self.assertRaisesRegex(ValueError, "Could not parse model config"):
      server_lib.model_configs_from_file(path)
    with open(path, "w") as f:
      f.write("model_config_list { config { name: 'x' } }")
    with self.assertRaisesRegex(ValueError, "needs a name and a base_path"):
      server_lib.model_configs_from_file(path)

  def test_specific_and_all_version_policies(self):
    base = self._new_dir()
    model = testing.dense_model()
    for version in (1, 2, 3):
      testing.write_export(model, base, version)
    specific = server_lib.model_config("m", base)
    specific.model_version_policy.specific.versions.extend([1, 3])
    served = server_lib.ServedModel(specific)
    served.poll()
    self.assertEqual([v for v, *_ in served.status()], [1, 3])
    every = server_lib.model_config("m", base)
    every.model_version_policy.all.SetInParent()
    served = server_lib.ServedModel(every)
    served.poll()
    self.assertEqual([v for v, *_ in served.status()], [1, 2, 3])


if __name__ == "__main__":
  tf.test.main()
