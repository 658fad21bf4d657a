"""Tests of serving/client.py and serving/client_cli.py, and end to end.

`ClientTest` runs against a local in-process server by default. Point it at a
real TF Serving (or any server speaking its gRPC API) with

  DROPVAR_SERVING_TARGET=localhost:8500 DROPVAR_SERVING_MODEL=dropvar \
  DROPVAR_SERVING_EXPORT=/path/to/export_base \
  python -m pytest -q tests/serving_client_test.py -k ClientTest

DROPVAR_SERVING_EXPORT (optional) is the served export base: outputs are then
compared with the same version loaded in process. Tests of behaviour that only
the local server has are skipped against a real server.
"""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import redirect_stderr
from contextlib import redirect_stdout
from unittest import mock

from absl import flags
import grpc
import numpy as np

from dropvar_tf import contract
from dropvar_tf._keras import keras, tf
from dropvar_tf.serving import client as client_lib
from dropvar_tf.serving import client_cli
from dropvar_tf.serving import server as server_lib
from dropvar_tf.serving import versions
import serving_testing as testing
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


def _run_cli(args):
  """Parses `args` as `dropvar_client` would and runs it; (code, stdout)."""
  client_cli.define_flags()
  buffer = io.StringIO()
  try:
    remaining = flags.FLAGS(["dropvar_client"] + args)
    with redirect_stdout(buffer), redirect_stderr(io.StringIO()):
      code = client_cli.main(remaining)
  finally:
    flags.FLAGS.unparse_flags()
  return code, buffer.getvalue()


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
      testing.write_export(testing.ratings_model(seed=0), cls.export_base, 3)
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
      with self.assertRaises(client_lib.ServingError) as cm:
        c.predict(inputs)
    self.assertEqual(cm.exception.code, grpc.StatusCode.NOT_FOUND)
    self.assertEqual(cm.exception.method, "Predict")
    with client_lib.VariationClient(self.target, "no_such_model_xyz",
                                    cast_inputs=False) as c:
      with self.assertRaises(client_lib.ServingError) as cm:
        c.predict(inputs)
    self.assertEqual(cm.exception.code, grpc.StatusCode.NOT_FOUND)
    self.assertIn("no_such_model_xyz", str(cm.exception))
    with client_lib.VariationClient(self.target, self.model_name,
                                    signature="no_such_signature",
                                    cast_inputs=False) as c:
      with self.assertRaises(client_lib.ServingError) as cm:
        c.predict(inputs)
    self.assertEqual(cm.exception.code, grpc.StatusCode.FAILED_PRECONDITION)

  def test_wrong_dtype_is_invalid_argument(self):
    if self.server is None:
      self.skipTest("message wording of the local server")
    inputs = _inputs_for(self.specs, 2)
    inputs["context"] = inputs["context"].astype(np.int32)
    with client_lib.VariationClient(self.target, self.model_name,
                                    cast_inputs=False) as c:
      with self.assertRaises(client_lib.ServingError) as cm:
        c.predict(inputs)
    self.assertEqual(cm.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
    self.assertIn("Input \"context\" expects dtype float32 but int32",
                  cm.exception.details)

  def test_inputs_are_cast_to_the_signature_dtypes(self):
    inputs = _inputs_for(self.specs, 3, seed=4)
    loose = {k: v.astype(np.float64) if v.dtype.kind == "f" else
             v.astype(np.int32) for k, v in inputs.items()}
    self.assertAllClose(self.client.predict(loose).variation,
                        self.client.predict(inputs).variation)
    lists = {k: v.tolist() for k, v in inputs.items()}
    self.assertAllClose(self.client.predict(lists).variation,
                        self.client.predict(inputs).variation)

  def test_encode_uses_tensor_content(self):
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    proto = client_lib.encode(array)
    self.assertLen(proto.tensor_content, array.nbytes)
    self.assertEmpty(proto.float_val)
    self.assertAllEqual(tf.make_ndarray(proto), array)
    self.assertAllEqual(client_lib.decode(proto), array)
    typed = client_lib.encode(array)
    typed.ClearField("tensor_content")
    typed.float_val.extend(array.ravel().tolist())
    self.assertAllEqual(client_lib.decode(typed), tf.make_ndarray(typed))
    big_endian = array.astype(">f4")
    self.assertAllEqual(client_lib.decode(client_lib.encode(big_endian)),
                        array)


class LocalClientTest(tf.test.TestCase):
  """Client behaviour that needs control over the server."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.base = os.path.join(cls.tmp, "dense")
    cls.model = testing.dense_model(seed=0)
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

  def test_unavailable_is_retried_until_the_server_is_up(self):
    port = _free_port()
    server = self._server(port)
    starter = threading.Timer(0.6, server.start)
    starter.start()
    self.addCleanup(server.stop)
    self.addCleanup(starter.cancel)
    with client_lib.VariationClient(f"127.0.0.1:{port}", "dense",
                                    max_retries=8, backoff_seconds=0.1,
                                    timeout=5.0) as client:
      result = client.predict({"x": testing.dense_inputs(1)})
    self.assertEqual(result.model_version, 1)

  def test_retries_give_up_with_unavailable(self):
    port = _free_port()
    with client_lib.VariationClient(f"127.0.0.1:{port}", "dense",
                                    max_retries=2, backoff_seconds=0.01,
                                    timeout=2.0, cast_inputs=False) as client:
      with mock.patch.object(time, "sleep", wraps=time.sleep) as sleep:
        with self.assertRaises(client_lib.ServingError) as cm:
          client.predict({"x": testing.dense_inputs(1)})
    self.assertEqual(cm.exception.code, grpc.StatusCode.UNAVAILABLE)
    self.assertIn("(after 3 attempts)", str(cm.exception))
    self.assertEqual(sleep.call_count, 2)

  def test_other_errors_are_not_retried(self):
    with self._server() as server:
      with client_lib.VariationClient(server.target, "dense",
                                      cast_inputs=False) as client:
        with mock.patch.object(time, "sleep") as sleep:
          with self.assertRaises(client_lib.ServingError) as cm:
            client.predict({"x": np.zeros((1, 3), np.float32)})
    self.assertEqual(cm.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
    self.assertIn("Input \"x\" expects shape [-1,4] but got [1,3]",
                  str(cm.exception))
    sleep.assert_not_called()

  def test_deadline_is_sent_with_every_rpc(self):
    with self._server() as server:
      with client_lib.VariationClient(server.target, "dense",
                                      timeout=0.25) as client:
        calls = []
        stub = client._predict_stub  # pylint: disable=protected-access
        real = stub.Predict

        def spy(request, timeout=None):
          calls.append(timeout)
          return real(request, timeout=timeout)

        with mock.patch.object(stub, "Predict", spy):
          client.predict({"x": testing.dense_inputs(1)})
          client.predict({"x": testing.dense_inputs(1)}, timeout=1.5)
    self.assertEqual(calls, [0.25, 1.5])

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
    ]
    for kwargs, message in cases:
      with self.subTest(message):
        with self.assertRaisesRegex(ValueError, message):
          client_lib.VariationClient(**kwargs)

  def test_single_array_needs_a_single_input_signature(self):
    base = os.path.join(self.tmp, "ratings")
    if not os.path.exists(base):
      testing.write_export(testing.ratings_model(), base, 1)
    server = server_lib.ModelServer([server_lib.model_config("r", base)],
                                    poll_seconds=0)
    with server:
      with client_lib.VariationClient(server.target, "r") as client:
        with self.assertRaisesRegex(ValueError, "Expected a dict with the "
                                    "keys \\['context', 'movie_id', "
                                    "'user_id'\\]"):
          client.predict(np.zeros((1, 2), np.float32))

  def test_cli_predict_metadata_status(self):
    tmp = tempfile.mkdtemp(dir=self.get_temp_dir())
    x = testing.dense_inputs(2, seed=6)
    json_path = os.path.join(tmp, "req.json")
    with open(json_path, "w") as f:
      json.dump({"inputs": {"x": x.tolist()}}, f)
    npy_path = os.path.join(tmp, "req.npy")
    np.save(npy_path, x)
    expected = self.model(x)
    with self._server() as server:
      common = [f"--target={server.target}", "--model_name=dense"]
      outputs = {}
      for name, args in [
          ("json", ["predict", f"--input={json_path}"]),
          ("npy", [f"--input={npy_path}", "--output_filter=variation"]),
          ("metadata", ["metadata"]),
          ("status", ["status"]),
      ]:
        code, stdout = _run_cli(args + common)
        self.assertEqual(code, 0, name)
        outputs[name] = json.loads(stdout)
      code, stdout = _run_cli([f"--input={npy_path}",
                               f"--target={server.target}",
                               "--model_name=nope"])
      self.assertEqual((code, stdout), (1, ""))
    self.assertAllClose(outputs["json"]["prediction"], expected["prediction"],
                        rtol=1e-6, atol=1e-6)
    self.assertAllClose(outputs["json"]["variation"], expected["variation"],
                        rtol=1e-6, atol=1e-6)
    self.assertEqual(outputs["json"]["model_version"], 1)
    self.assertIsNone(outputs["npy"]["prediction"])
    self.assertAllClose(outputs["npy"]["variation"], expected["variation"],
                        rtol=1e-6, atol=1e-6)
    self.assertEqual(
        outputs["metadata"]["signatures"]["serving_default"]["inputs"]["x"],
        {"dtype": "float32", "shape": [-1, 4]})
    self.assertEqual(outputs["status"]["model_version_status"],
                     [{"version": 1, "state": "AVAILABLE", "error_code": 0,
                       "error_message": ""}])

  def test_cli_reads_npz_and_list_json(self):
    tmp = tempfile.mkdtemp(dir=self.get_temp_dir())
    npz_path = os.path.join(tmp, "req.npz")
    inputs = testing.ratings_inputs(2)
    np.savez(npz_path, **inputs)
    loaded = client_cli.load_inputs(npz_path)
    self.assertEqual(sorted(loaded), sorted(inputs))
    self.assertAllEqual(loaded["user_id"], inputs["user_id"])
    list_path = os.path.join(tmp, "req.json")
    with open(list_path, "w") as f:
      json.dump([[1.0, 2.0, 3.0, 4.0]], f)
    self.assertAllEqual(client_cli.load_inputs(list_path),
                        [[1.0, 2.0, 3.0, 4.0]])
    with open(list_path, "w") as f:
      json.dump({"instances": []}, f)
    with self.assertRaisesRegex(ValueError, "expected {\"inputs\": ...}"):
      client_cli.load_inputs(list_path)


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
    self.assertIn("--tensorflow_inter_op_parallelism must be >= 0.",
                  done.stderr)
    self.assertNotIn("Running gRPC ModelServer", done.stdout)

  def test_train_export_serve_and_pick_up_a_new_version(self):
    try:
      from dropvar_tf import saved_model
    except ImportError:
      saved_model = None
    base = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()), "dual")
    if saved_model is not None:
      dual = _small_dual_model()
      export = lambda model: saved_model.export_saved_model(model, base)
    else:  # Before the exporter exists: the contract-shaped test model.
      dual = testing.dense_model()
      export = lambda model: testing.write_export(
          model, base, 1 + len(versions.list_versions(base)))
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
