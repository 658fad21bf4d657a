"""Tests of serving/server.py: the server, its options, config files, CLI."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from unittest import mock

from absl import app
from absl import flags
import grpc
import numpy as np
import requests

from dropvar_tf import contract
from dropvar_tf import saved_model
from dropvar_tf._keras import tf
from dropvar_tf.serving import server as server_lib
import serving_testing as testing
import testing_models as tm
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import prediction_service_pb2_grpc

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMEOUT = 10.0
_AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
_END = get_model_status_pb2.ModelVersionStatus.END
_predict_request = testing.predict_request


def _wait_for(predicate, timeout=20.0, interval=0.05):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(interval)
  return False


class _TestCase(tf.test.TestCase):

  def _new_dir(self):
    return tempfile.mkdtemp(dir=self.get_temp_dir())


class ServerOptionsTest(_TestCase):
  """Servers with non-default options, and version polling."""

  def setUp(self):
    super().setUp()
    self.base = self._new_dir()
    self.model = tm.dual_dense_model(seed=0)
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
    model2 = tm.dual_dense_model(seed=5)
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

  def test_a_label_of_a_version_not_loaded_needs_the_flag(self):
    config = server_lib.model_config("m", self.base)
    config.version_labels["stable"] = 1
    config.version_labels["canary"] = 2  # not exported
    server = server_lib.ModelServer([config], poll_seconds=0)
    with self.assertRaisesWithLiteralMatch(
        RuntimeError, "Request to assign label 'canary' to version 2 of "
        "model m, which is not currently available for inference (start "
        "with --allow_version_labels_for_unavailable_models to allow it)"):
      server.start()
    allowed = server_lib.ModelServer([config], poll_seconds=0, options=(
        server_lib.ServerOptions(
            allow_version_labels_for_unavailable_models=True)))
    with allowed:
      channel = grpc.insecure_channel(allowed.target)
      self.addCleanup(channel.close)
      stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
      request = _predict_request("m", {"x": testing.dense_inputs(1)},
                                 label="canary")
      with self.assertRaises(grpc.RpcError) as cm:
        stub.Predict(request, timeout=_TIMEOUT)
      self.assertEqual(cm.exception.code(), grpc.StatusCode.NOT_FOUND)
      request = _predict_request("m", {"x": testing.dense_inputs(1)},
                                 label="stable")
      self.assertEqual(stub.Predict(request, timeout=_TIMEOUT)
                       .model_spec.version.value, 1)

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


class FlagsTest(tf.test.TestCase):
  """`define_flags` and `main`'s checks, on a FlagValues of their own."""

  def _flag_values(self, *args):
    values = flags.FlagValues()
    server_lib.define_flags(values)
    values(["dropvar_model_server"] + list(args))
    return values

  def test_tensorflow_model_server_command_line_parses(self):
    values = self._flag_values("--port=8500", "--model_name=movies",
                               "--model_base_path=/models/movies",
                               "--rest_api_port=8501")
    self.assertEqual((values.port, values.model_name, values.model_base_path,
                      values.rest_api_port),
                     (8500, "movies", "/models/movies", 8501))
    defaults = self._flag_values()
    self.assertEqual(defaults.host, "127.0.0.1")
    self.assertEqual(defaults.max_batch_size,
                     server_lib.DEFAULT_MAX_BATCH_SIZE)
    self.assertEqual(defaults.max_request_bytes,
                     server_lib.DEFAULT_MAX_REQUEST_BYTES)
    self.assertEqual(defaults.file_system_poll_wait_seconds, 1.0)

  def test_main_refuses_bad_flag_values(self):
    # Each is refused before TF's thread pools are set or a model loaded.
    cases = [
        ((), ["dropvar_model_server", "extra"],
         "Unexpected arguments: ['extra']"),
        (("--max_batch_size=0",), ["dropvar_model_server"],
         "Invalid value received for flag `--max_batch_size`. Expected a "
         "value >= 1. Received: --max_batch_size=0"),
        (("--num_workers=0",), ["dropvar_model_server"],
         "Invalid value received for flag `--num_workers`. Expected a value "
         ">= 1. Received: --num_workers=0"),
        (("--tensorflow_intra_op_parallelism=-1",), ["dropvar_model_server"],
         "Invalid value received for flag `--tensorflow_intra_op_parallelism`"
         ". Expected a value >= 0. Received: "
         "--tensorflow_intra_op_parallelism=-1"),
        # gRPC takes sizes as a C int: 2 GiB used to crash with a traceback.
        (("--max_request_bytes=2147483648",), ["dropvar_model_server"],
         "Invalid value received for flag `--max_request_bytes`. Expected a "
         "value in [1, 2147483647]. Received: "
         "--max_request_bytes=2147483648"),
        (("--max_request_bytes=-5",), ["dropvar_model_server"],
         "Invalid value received for flag `--max_request_bytes`. Expected a "
         "value in [1, 2147483647]. Received: --max_request_bytes=-5"),
        (("--port=70000",), ["dropvar_model_server"],
         "Invalid value received for flag `--port`. Expected a value in "
         "[0, 65535]. Received: --port=70000"),
        (("--monitoring_config_file=/m.config",), ["dropvar_model_server"],
         "Invalid value received for flag `--rest_api_port`. Expected a port "
         "when --monitoring_config_file is given (metrics are served on the "
         "REST port). Received: --rest_api_port=0"),
        (("--variation_threshold=-1",), ["dropvar_model_server"],
         "Invalid value received for flag `--variation_threshold`. Expected a "
         "value >= 0. Received: --variation_threshold=-1.0"),
        (("--file_system_poll_wait_seconds=nan",), ["dropvar_model_server"],
         "Invalid value received for flag `--file_system_poll_wait_seconds`. "
         "Expected a value >= 0. Received: "
         "--file_system_poll_wait_seconds=nan"),
    ]
    for args, argv, message in cases:
      with self.subTest(message):
        with mock.patch.object(server_lib, "FLAGS",
                               self._flag_values(*args)):
          with self.assertRaises(app.UsageError) as cm:
            server_lib.main(argv)
        self.assertEqual(str(cm.exception), message)

  def test_impossible_flag_value_is_one_line_without_traceback(self):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-m", "dropvar_tf.serving.server",
         f"--model_base_path={self.get_temp_dir()}",
         "--max_request_bytes=2147483648"],
        cwd=_REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
        check=False)
    self.assertEqual(done.returncode, 2, done.stderr)
    self.assertNotIn("Traceback", done.stderr)
    self.assertEqual(
        done.stderr.strip().splitlines()[-1],
        "server.py: Invalid value received for flag `--max_request_bytes`. "
        "Expected a value in [1, 2147483647]. Received: "
        "--max_request_bytes=2147483648")


class CommandLineTest(_TestCase):

  def test_rest_monitoring_and_batching_from_the_deploy_files(self):
    base = self._new_dir()
    model = tm.dual_dense_model(seed=1)
    testing.write_export(model, base, 1)
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      rest_port = s.getsockname()[1]
    deploy = os.path.join(_REPO_ROOT, "serving", "deploy")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dropvar_tf.serving.server", "--port=0",
         f"--rest_api_port={rest_port}", "--model_name=m",
         f"--model_base_path={base}", "--num_workers=8",
         "--monitoring_config_file=" + os.path.join(deploy,
                                                    "monitoring.config"),
         "--enable_batching", "--batching_parameters_file=" +
         os.path.join(deploy, "batching_parameters.txt"),
         "--variation_threshold=0.5"],
        cwd=_REPO_ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    self.addCleanup(lambda: proc.poll() is None and proc.kill())
    lines = []
    for line in proc.stdout:
      lines.append(line.strip())
      if line.startswith("Exporting HTTP/REST API at:"):
        break
    self.assertIn(f"Exporting HTTP/REST API at:127.0.0.1:{rest_port} ...",
                  lines)
    url = f"http://127.0.0.1:{rest_port}"
    x = testing.dense_inputs(3, seed=2)
    response = requests.post(url + "/v1/models/m:predict",
                             json={"instances": x.tolist()}, timeout=_TIMEOUT)
    self.assertEqual(response.status_code, 200, response.text)
    self.assertAllClose(
        [row["variation"] for row in response.json()["predictions"]],
        model(x)["variation"], rtol=1e-5, atol=1e-6)
    page = requests.get(url + "/monitoring/prometheus/metrics",
                        timeout=_TIMEOUT).text
    self.assertIn(':tensorflow:serving:request_count{model_name="m",'
                  'version="1",status="OK"} 1.0', page)
    self.assertIn(':dropvar:serving:variation_examples{model_name="m",'
                  'version="1"} 3.0', page)
    proc.send_signal(signal.SIGTERM)
    self.assertEqual(proc.wait(timeout=30), 0)


if __name__ == "__main__":
  tf.test.main()
