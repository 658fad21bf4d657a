"""Tests of serving/client.py, and end to end.

`ClientTest` runs against a local in-process server by default. Point it at a
real TF Serving (or any server speaking its gRPC API) with

  DROPVAR_SERVING_TARGET=localhost:8500 DROPVAR_SERVING_MODEL=dropvar \
  DROPVAR_SERVING_EXPORT=/path/to/export_base \
  python -m pytest -q tests/serving_client_test.py -k ClientTest

DROPVAR_SERVING_EXPORT (optional) is the served export base: outputs are then
compared with the same version loaded in process. Tests of behaviour that only
the local server has are skipped against a real server.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc
import numpy as np

from dropvar_tf import contract
from dropvar_tf._keras import keras, tf
from dropvar_tf.serving import client as client_lib
from dropvar_tf.serving import codec
from dropvar_tf.serving import errors
from dropvar_tf.serving import server as server_lib
from dropvar_tf.serving import versions
import serving_testing as testing
import testing_models as tm
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TARGET_ENV = "DROPVAR_SERVING_TARGET"
_MODEL_ENV = "DROPVAR_SERVING_MODEL"
_EXPORT_ENV = "DROPVAR_SERVING_EXPORT"
_REMOTE = bool(os.environ.get(_TARGET_ENV))


def _inputs_for(specs, batch_size, seed=0):
  """Random inputs matching signature input specs (ids kept small)."""
  rng = np.random.default_rng(seed)
  inputs = {}
  for alias, spec in sorted(specs.items()):
    shape = [batch_size] + [1 if d < 0 else d for d in spec.shape[1:]]
    np_dtype = spec.dtype.as_numpy_dtype
    if spec.dtype.is_integer:
      inputs[alias] = rng.integers(0, 10, size=shape).astype(np_dtype)
    else:
      inputs[alias] = rng.normal(size=shape).astype(np_dtype)
  return inputs


def _port_is_free(port):
  with socket.socket() as s:
    try:
      s.bind(("127.0.0.1", port))
    except OSError:
      return False
  return True


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _FlakyServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
  """Refuses the first `failures` Predict calls with `code`, then answers.

  Attributes:
    calls: Predict calls received (attempts, retries included).
    time_left: the seconds left before the deadline at each call.
  """

  def __init__(self, failures, code=grpc.StatusCode.UNAVAILABLE,
               refuse_after=0.0):
    self.failures = failures
    self.code = code
    self.refuse_after = refuse_after
    self.calls = 0
    self.time_left = []
    self._lock = threading.Lock()

  def Predict(self, request, context):
    with self._lock:
      self.calls += 1
      call = self.calls
      self.time_left.append(context.time_remaining())
    if call <= self.failures:
      time.sleep(self.refuse_after)
      context.abort(self.code, f"attempt {call} refused")
    response = predict_pb2.PredictResponse()
    response.model_spec.name = request.model_spec.name
    response.model_spec.version.value = 1
    response.outputs[contract.VARIATION_KEY].CopyFrom(
        codec.encode(np.full((1, 1), 0.5, np.float32)))
    return response


def _serve(test, servicer):
  """Serves `servicer` on 127.0.0.1 until the test ends; returns the target."""
  server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
  prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
      servicer, server)
  port = server.add_insecure_port("127.0.0.1:0")
  server.start()
  test.addCleanup(server.stop, None)
  return f"127.0.0.1:{port}"


class ClientTest(tf.test.TestCase):
  """The client against one served model (local, or real via env vars)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.server = None
    cls.tmp = None
    if _REMOTE:
      cls.target = os.environ[_TARGET_ENV]
      cls.model_name = os.environ.get(_MODEL_ENV, "dropvar")
      cls.export_base = os.environ.get(_EXPORT_ENV)
    else:
      cls.tmp = tempfile.mkdtemp()
      cls.model_name = "ratings"
      cls.export_base = os.path.join(cls.tmp, "ratings")
      testing.write_export(tm.dual_ratings_model(seed=0), cls.export_base, 3)
      cls.server = server_lib.ModelServer(
          [server_lib.model_config(cls.model_name, cls.export_base)],
          poll_seconds=0)
      cls.server.start()
      cls.target = cls.server.target
    cls.client = client_lib.VariationClient(cls.target, cls.model_name,
                                            timeout=10.0)
    cls.specs = cls.client.input_specs()

  @classmethod
  def tearDownClass(cls):
    cls.client.close()
    if cls.server is not None:
      cls.server.stop()
    if cls.tmp is not None:
      shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _expected(self, inputs, version):
    if not self.export_base:
      self.skipTest(f"set {_EXPORT_ENV} to compare with the export")
    loaded = tf.saved_model.load(os.path.join(self.export_base, str(version)))
    outputs = loaded.signatures[contract.SERVING_SIGNATURE](**inputs)
    return {k: v.numpy() for k, v in outputs.items()}

  def test_predict_matches_the_loaded_export(self):
    inputs = _inputs_for(self.specs, 5, seed=1)
    result = self.client.predict(inputs)
    self.assertIsInstance(result, client_lib.Result)
    expected = self._expected(inputs, result.model_version)
    self.assertAllClose(result.prediction, expected[contract.PREDICTION_KEY],
                        rtol=1e-5, atol=1e-6)
    self.assertAllClose(result.variation, expected[contract.VARIATION_KEY],
                        rtol=1e-5, atol=1e-6)
    self.assertEqual(set(result.outputs), set(contract.OUTPUT_KEYS))

  def test_bare_official_stubs_agree_with_the_client(self):
    inputs = _inputs_for(self.specs, 4, seed=2)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = self.model_name
    request.model_spec.signature_name = contract.SERVING_SIGNATURE
    for alias, array in inputs.items():
      request.inputs[alias].CopyFrom(tf.make_tensor_proto(array))
    with grpc.insecure_channel(self.target) as channel:
      stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
      response = stub.Predict(request, timeout=10.0)
    result = self.client.predict(inputs)
    self.assertEqual(response.model_spec.version.value, result.model_version)
    for key in contract.OUTPUT_KEYS:
      self.assertAllClose(tf.make_ndarray(response.outputs[key]),
                          result.outputs[key], rtol=1e-6, atol=1e-7)

  def test_same_request_same_answer(self):
    # Dropout is off in the served graph.
    inputs = _inputs_for(self.specs, 3, seed=3)
    first = self.client.predict(inputs)
    second = self.client.predict(inputs)
    self.assertAllEqual(first.variation, second.variation)
    self.assertTrue(np.all(first.variation >= 0))

  def test_output_filter(self):
    result = self.client.predict(_inputs_for(self.specs, 2),
                                 output_filter=[contract.VARIATION_KEY])
    self.assertIsNone(result.prediction)
    self.assertEqual(result.variation.shape[0], 2)
    self.assertEqual(list(result.outputs), [contract.VARIATION_KEY])

  def test_metadata_and_status(self):
    metadata = self.client.get_model_metadata()
    self.assertEqual(metadata.model_name, self.model_name)
    self.assertEqual(set(metadata.outputs()), set(contract.OUTPUT_KEYS))
    statuses = self.client.get_model_status()
    available = [s.version for s in statuses if s.state == "AVAILABLE"]
    self.assertNotEmpty(available)
    self.assertEqual(self.client.predict(_inputs_for(self.specs, 1))
                     .model_version, max(available))
    self.assertEqual(metadata.model_version, max(available))

  def test_specific_version(self):
    version = self.client.get_model_metadata().model_version
    with client_lib.VariationClient(self.target, self.model_name,
                                    version=version) as client:
      self.assertEqual(client.predict(_inputs_for(self.specs, 1))
                       .model_version, version)

  def test_errors_carry_code_and_message(self):
    inputs = _inputs_for(self.specs, 1)
    with client_lib.VariationClient(self.target, self.model_name,
                                    version=987654, cast_inputs=False) as c:
      with self.assertRaises(errors.ServingError) as cm:
        c.predict(inputs)
    self.assertEqual(cm.exception.code, grpc.StatusCode.NOT_FOUND)
    self.assertEqual(cm.exception.method, "Predict")
    with client_lib.VariationClient(self.target, "no_such_model_xyz",
                                    cast_inputs=False) as c:
      with self.assertRaises(errors.ServingError) as cm:
        c.predict(inputs)
    self.assertEqual(cm.exception.code, grpc.StatusCode.NOT_FOUND)
    self.assertIn("no_such_model_xyz", str(cm.exception))
    with client_lib.VariationClient(self.target, self.model_name,
                                    signature="no_such_signature",
                                    cast_inputs=False) as c:
      with self.assertRaises(errors.ServingError) as cm:
        c.predict(inputs)
    self.assertEqual(cm.exception.code, grpc.StatusCode.FAILED_PRECONDITION)

  def test_wrong_dtype_is_invalid_argument(self):
    if self.server is None:
      self.skipTest("message wording of the local server")
    inputs = _inputs_for(self.specs, 2)
    inputs["context"] = inputs["context"].astype(np.int32)
    with client_lib.VariationClient(self.target, self.model_name,
                                    cast_inputs=False) as c:
      with self.assertRaises(errors.ServingError) as cm:
        c.predict(inputs)
    self.assertEqual(cm.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
    self.assertIn("Input \"context\" expects dtype float32 but int32",
                  cm.exception.message)

  def test_inputs_are_cast_to_the_signature_dtypes(self):
    inputs = _inputs_for(self.specs, 3, seed=4)
    loose = {k: v.astype(np.float64) if v.dtype.kind == "f" else
             v.astype(np.int32) for k, v in inputs.items()}
    self.assertAllClose(self.client.predict(loose).variation,
                        self.client.predict(inputs).variation)
    lists = {k: v.tolist() for k, v in inputs.items()}
    self.assertAllClose(self.client.predict(lists).variation,
                        self.client.predict(inputs).variation)


class LocalClientTest(tf.test.TestCase):
  """Client behaviour that needs control over the server."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.base = os.path.join(cls.tmp, "dense")
    cls.model = tm.dual_dense_model(seed=0)
    testing.write_export(cls.model, cls.base, 1)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _server(self, port=0):
    server = server_lib.ModelServer(
        [server_lib.model_config("dense", self.base)], port=port,
        poll_seconds=0)
    return server

  def test_single_array_uses_the_only_input_name(self):
    with self._server() as server:
      with client_lib.VariationClient(server.target, "dense") as client:
        x = testing.dense_inputs(4, seed=5)
        result = client.predict(x)
        self.assertEqual(list(client.input_specs()), ["x"])
    self.assertAllClose(result.prediction, self.model(x)["prediction"],
                        rtol=1e-6, atol=1e-6)
    self.assertAllClose(result.variation, self.model(x)["variation"],
                        rtol=1e-6, atol=1e-6)
    self.assertEqual(result.model_version, 1)

  def test_server_refusal_carries_code_and_message(self):
    with self._server() as server:
      with client_lib.VariationClient(server.target, "dense",
                                      cast_inputs=False) as client:
        with self.assertRaises(errors.ServingError) as cm:
          client.predict({"x": np.zeros((1, 3), np.float32)})
    self.assertEqual(cm.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
    self.assertEqual(cm.exception.method, "Predict")
    self.assertIn("Input \"x\" expects shape [-1,4] but got [1,3]",
                  str(cm.exception))

  def test_argument_validation(self):
    cases = [
        (dict(target="", model_name="m"), "argument `target`"),
        (dict(target="h:1", model_name=""), "argument `model_name`"),
        (dict(target="h:1", model_name="m", version=1, version_label="a"),
         "argument `version_label`"),
        (dict(target="h:1", model_name="m", version=-1),
         "argument `version`"),
        (dict(target="h:1", model_name="m", timeout=0), "argument `timeout`"),
        (dict(target="h:1", model_name="m", max_retries=-1),
         "argument `max_retries`"),
        (dict(target="h:1", model_name="m", max_retries=5),
         "argument `max_retries`. Expected an integer in \\[0, 4\\]"),
        (dict(target="h:1", model_name="m", backoff_seconds=0),
         "argument `backoff_seconds`"),
        (dict(target="h:1", model_name="m", max_backoff_seconds=-1.0),
         "argument `max_backoff_seconds`"),
    ]
    for kwargs, message in cases:
      with self.subTest(message):
        with self.assertRaisesRegex(ValueError, message):
          client_lib.VariationClient(**kwargs)

  def test_single_array_needs_a_single_input_signature(self):
    base = os.path.join(self.tmp, "ratings")
    if not os.path.exists(base):
      testing.write_export(tm.dual_ratings_model(), base, 1)
    server = server_lib.ModelServer([server_lib.model_config("r", base)],
                                    poll_seconds=0)
    with server:
      with client_lib.VariationClient(server.target, "r") as client:
        with self.assertRaisesRegex(ValueError, "Expected a dict with the "
                                    "keys \\['context', 'movie_id', "
                                    "'user_id'\\]"):
          client.predict(np.zeros((1, 2), np.float32))


class RetryTest(tf.test.TestCase):
  """gRPC's retryPolicy, against a server that refuses the first calls."""

  def _predict(self, servicer, **kwargs):
    target = _serve(self, servicer)
    with client_lib.VariationClient(target, "m", cast_inputs=False,
                                    **kwargs) as client:
      return client.predict({"x": testing.dense_inputs(1)})

  def test_unavailable_is_retried_until_it_succeeds(self):
    servicer = _FlakyServicer(failures=3)
    result = self._predict(servicer)  # The default: 3 retries.
    self.assertEqual(servicer.calls, 4)
    self.assertEqual(result.model_version, 1)
    self.assertAllEqual(result.variation, [[0.5]])

  def test_retries_give_up_with_unavailable(self):
    for max_retries in (0, 2, 3):
      with self.subTest(max_retries=max_retries):
        servicer = _FlakyServicer(failures=10)
        with self.assertRaises(errors.ServingError) as cm:
          self._predict(servicer, max_retries=max_retries)
        attempts = max_retries + 1
        self.assertEqual(servicer.calls, attempts)
        self.assertEqual(cm.exception.code, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(str(cm.exception), "Predict failed with UNAVAILABLE: "
                         f"attempt {attempts} refused")

  def test_other_errors_are_not_retried(self):
    servicer = _FlakyServicer(failures=1,
                              code=grpc.StatusCode.INVALID_ARGUMENT)
    with self.assertRaises(errors.ServingError) as cm:
      self._predict(servicer)
    self.assertEqual(servicer.calls, 1)
    self.assertEqual(cm.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
    self.assertEqual(cm.exception.message, "attempt 1 refused")

  def test_unreachable_server_is_unavailable(self):
    with client_lib.VariationClient(f"127.0.0.1:{_free_port()}", "m",
                                    max_retries=1, timeout=5.0,
                                    cast_inputs=False) as client:
      with self.assertRaises(errors.ServingError) as cm:
        client.predict({"x": testing.dense_inputs(1)})
    self.assertEqual(cm.exception.code, grpc.StatusCode.UNAVAILABLE)
    self.assertEqual(cm.exception.method, "Predict")

  def test_deadline_is_sent_with_every_rpc(self):
    servicer = _FlakyServicer(failures=0)
    target = _serve(self, servicer)
    with client_lib.VariationClient(target, "m", timeout=0.25,
                                    cast_inputs=False) as client:
      client.predict({"x": testing.dense_inputs(1)})
      client.predict({"x": testing.dense_inputs(1)}, timeout=1.5)
    first, second = servicer.time_left
    # gRPC rounds the deadline it sends up a little (grpc-timeout units).
    self.assertBetween(first, 0.0, 0.25 + 0.05)
    self.assertBetween(second, 0.25 + 0.05, 1.5 + 0.05)

  def test_retries_share_the_call_deadline(self):
    # Each refused attempt takes 0.2 s: gRPC's jittered backoff may be
    # near 0, so the attempts themselves make the time spent measurable.
    servicer = _FlakyServicer(failures=2, refuse_after=0.2)
    self._predict(servicer, timeout=5.0)
    first, _, last = servicer.time_left
    self.assertBetween(first, 0.0, 5.0 + 0.05)
    # The third attempt has the time already spent (>= 0.4 s) taken off its
    # deadline; a deadline per attempt would give it about 5 s again.
    self.assertLess(last, first - 0.3)


def _small_dual_model(seed=0):
  """Trains a tiny base model and its variation head (the real library)."""
  # Imported here: these modules belong to the core library and are only
  # needed by the end-to-end test.
  from dropvar_tf import heads
  from dropvar_tf import targets
  from dropvar_tf import training
  keras.utils.set_random_seed(seed)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(256, 4)).astype(np.float32)
  y = (x @ np.array([1.0, -2.0, 0.5, 0.0], np.float32))[:, None]
  inputs = keras.Input(shape=(4,), name="features")
  h = keras.layers.Dense(16, activation="relu")(inputs)
  h = keras.layers.Dropout(0.3)(h)
  base = keras.Model(inputs, keras.layers.Dense(1)(h))
  base.compile(optimizer="adam", loss="mse")
  base.fit(x, y, epochs=2, batch_size=64, verbose=0)
  dual = heads.add_variation_head(base, hidden_units=(8,), seed=seed)
  x_cal = rng.normal(size=(128, 4)).astype(np.float32)
  dpv = targets.mc_dropout_targets(base, x_cal, num_samples=8, seed=seed)
  training.fit_variation_head(dual, x_cal, dpv, epochs=2, seed=seed,
                              patience=2)
  return dual


class EndToEndTest(tf.test.TestCase):
  """Train, export, serve with `dropvar_model_server` as a subprocess.

  Also the shutdown test: SIGTERM (SIGINT shares the handler) ends the
  server with exit code 0 and releases its port.
  """

  def _start_server(self, base):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dropvar_tf.serving.server", "--port=0",
         "--model_name=dual", f"--model_base_path={base}",
         "--file_system_poll_wait_seconds=0.1", "--rest_api_port=8501",
         "--tensorflow_inter_op_parallelism=1",
         "--tensorflow_intra_op_parallelism=2"],
        cwd=_REPO_ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)
    self.addCleanup(lambda: proc.poll() is None and proc.kill())
    lines = []
    for line in proc.stdout:
      lines.append(line.strip())
      if line.startswith("Running gRPC ModelServer at "):
        self.assertIn("TensorFlow threads: intra-op 2, inter-op 1 "
                      "(0: TF's choice)", lines)
        return proc, line.split()[-2]  # "... at 127.0.0.1:PORT ..."
    self.fail("the server exited before reporting its port")

  def test_bad_thread_flag_is_a_usage_error(self):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-m", "dropvar_tf.serving.server", "--port=0",
         f"--model_base_path={self.get_temp_dir()}",
         "--tensorflow_inter_op_parallelism=-1"],
        cwd=_REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
        check=False)
    self.assertNotEqual(done.returncode, 0)
    self.assertIn("Invalid value received for flag "
                  "`--tensorflow_inter_op_parallelism`.", done.stderr)
    self.assertNotIn("Running gRPC ModelServer", done.stdout)

  def test_train_export_serve_and_pick_up_a_new_version(self):
    try:
      from dropvar_tf import saved_model
    except ImportError:
      saved_model = None
    base = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()), "dual")
    if saved_model is not None:
      dual = _small_dual_model()

      def export(model):
        return saved_model.export_saved_model(model, base)
    else:  # Before the exporter exists: the contract-shaped test model.
      dual = tm.dual_dense_model()

      def export(model):
        existing = (versions.list_versions(base) if os.path.isdir(base)
                    else {})
        return testing.write_export(model, base, 1 + len(existing))
    self.assertEqual(os.path.basename(export(dual)), "1")
    proc, target = self._start_server(base)
    with client_lib.VariationClient(target, "dual") as client:
      specs = client.input_specs()
      (alias,) = specs
      x = np.random.default_rng(7).normal(size=(6, 4)).astype(np.float32)
      expected = dual(x)
      result = client.predict(x)
      self.assertEqual(result.model_version, 1)
      for key in contract.OUTPUT_KEYS:
        self.assertAllClose(result.outputs[key], expected[key], rtol=1e-5,
                            atol=1e-6)
      request = predict_pb2.PredictRequest()
      request.model_spec.name = "dual"
      request.inputs[alias].CopyFrom(tf.make_tensor_proto(x))
      with grpc.insecure_channel(target) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(
            channel).Predict(request, timeout=10.0)
      for key in contract.OUTPUT_KEYS:
        self.assertAllClose(tf.make_ndarray(response.outputs[key]),
                            expected[key], rtol=1e-5, atol=1e-6)

      # A second version, with other variation-head weights.
      last = dual.trainable_variables[-1]
      last.assign(last + 0.5)
      expected2 = dual(x)
      self.assertNotEmpty([k for k in contract.OUTPUT_KEYS
                           if not np.allclose(expected[k], expected2[k])])
      self.assertEqual(os.path.basename(export(dual)), "2")
      deadline = time.monotonic() + 20
      while time.monotonic() < deadline:
        if any(s.version == 2 and s.state == "AVAILABLE"
               for s in client.get_model_status()):
          break
        time.sleep(0.05)
      result2 = client.predict(x)
      self.assertEqual(result2.model_version, 2)
      for key in contract.OUTPUT_KEYS:
        self.assertAllClose(result2.outputs[key], expected2[key], rtol=1e-5,
                            atol=1e-6)
    port = int(target.rsplit(":", 1)[1])
    self.assertFalse(_port_is_free(port))
    proc.send_signal(signal.SIGTERM)
    self.assertEqual(proc.wait(timeout=30), 0)
    self.assertTrue(_port_is_free(port))


if __name__ == "__main__":
  tf.test.main()
