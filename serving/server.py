"""A local server speaking TF Serving's APIs, for development and tests.

`dropvar_model_server` is started like `tensorflow_model_server`:

  dropvar_model_server --port=8500 --model_name=movies \
      --model_base_path=/models/movies

or with `--model_config_file` holding a text-format `ModelServerConfig` (the
same file a real TF Serving reads). It serves PredictionService.Predict,
PredictionService.GetModelMetadata and ModelService.GetModelStatus with the
official `tensorflow_serving.apis` messages, so a client written against it
works unchanged against a real TF Serving (>= 2.21). With `--rest_api_port`
it serves TF Serving's REST API too (`rest.py`), with
`--monitoring_config_file` Prometheus metrics (`monitoring.py`), and with
`--enable_batching` it merges concurrent requests (`batching.py`). Versions
load as TF Serving's SavedModelBundle does (`bundle.py`).

Behaviour that matches TF Serving:
- Version folders: numeric sub-folders of the base path that hold a
  `saved_model.pb` are versions; anything else (temporary export folders,
  `1.tmp`, files) is ignored. The base path is polled every
  `--file_system_poll_wait_seconds`; a new version is loaded without restart,
  and, under the default "latest 1" policy, the older one is unloaded once the
  new one is available. `model_version_policy` and `version_labels` from the
  config file are honoured.
- Status codes and messages: NOT_FOUND "Servable not found for request:
  Latest(name)" / "Specific(name, 3)" for an unknown model or version;
  INVALID_ARGUMENT "Unrecognized servable version label: x"; FAILED_PRECONDITION
  'Serving signature key "x" not found.' (TF Serving uses FAILED_PRECONDITION,
  not NOT_FOUND, for an unknown signature); INVALID_ARGUMENT "input size does
  not match signature ..." for missing or extra inputs and "output tensor
  alias not found in signature: ..." for a bad `output_filter`; GetModelStatus
  NOT_FOUND "Could not find version 3 of model m" / "Could not find any
  versions of model m". Errors raised by TF while running the model keep their
  code (an out-of-range embedding id is INVALID_ARGUMENT).

Where this server is stricter than TF Serving (each answer names the input):
- Inputs are checked against the signature before running: dtype, rank and
  every known dimension; all inputs must share one batch size. TF Serving
  leaves most of these to the TF runtime, which answers INVALID_ARGUMENT too.
- An empty batch (batch size 0) is INVALID_ARGUMENT. TF Serving would run the
  graph and return empty outputs; for a model served one request at a time an
  empty request is a client bug, so it is refused.
- A batch larger than `--max_batch_size` is INVALID_ARGUMENT (TF Serving says
  the same when its batching is configured with `max_batch_size`).
- `tensor_content` whose byte length is not a multiple of the dtype size, or
  does not match the shape, is INVALID_ARGUMENT; so is a tensor whose shape
  would need more than `--max_request_bytes` bytes once decoded.
- NaN and Inf in float inputs are passed to the model, as TF Serving does
  (outputs then usually hold NaN). With `--reject_non_finite` they are
  INVALID_ARGUMENT naming the input instead.
- A request larger than `--max_request_bytes` on the wire is refused by gRPC
  itself with RESOURCE_EXHAUSTED.
Any other exception inside a handler is answered as INTERNAL with its message;
the server keeps running.

Where it is more lenient: a SavedModel exported with
`export_saved_model(..., jit_compile=True)` (XLA) runs here as it is;
`tensorflow_model_server` needs `--xla_cpu_compilation_enabled=true` for it.

The server is assembled from `codec` (tensors), `versions` (version folders,
loading and policies) and `servicers` (the RPC handlers); this module holds
the server itself, its model config files and the `dropvar_model_server`
command line.
"""

import dataclasses
import os
import signal
import sys
import threading
from concurrent import futures

from absl import app
from absl import flags
from absl import logging
import grpc
from google.protobuf import text_format

from dropvar_tf import cli_help
from dropvar_tf._keras import tf
from dropvar_tf.serving import batching as batching_lib
from dropvar_tf.serving import monitoring
from dropvar_tf.serving import rest
from dropvar_tf.serving import servicers
from dropvar_tf.serving import versions
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

# Default limits. A real TF Serving has no batch limit without batching and
# accepts messages up to 2 GiB; a development server is better off bounded.
DEFAULT_MAX_BATCH_SIZE = 8192
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class ServerOptions:
  """Request limits of the server.

  Attributes:
    max_batch_size: the largest batch (first dimension) accepted.
    max_request_bytes: the largest request on the wire, and the largest
      decoded input tensor.
    reject_non_finite: answer INVALID_ARGUMENT for NaN/Inf in float inputs
      instead of passing them to the model.
    allow_version_labels_for_unavailable_models: accept a config's version
      label that names a version not loaded at start (its requests get
      NOT_FOUND until it is); without it `ModelServer.start` refuses the
      config, as TF Serving does.
  """
  max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
  max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
  reject_non_finite: bool = False
  allow_version_labels_for_unavailable_models: bool = False


def model_configs_from_file(path):
  """Parses a text-format ModelServerConfig (TF Serving's --model_config_file).

  Args:
    path: the config file.

  Returns:
    A list of `ModelConfig` protos.

  Raises:
    ValueError: the file does not parse, uses `custom_model_config`, or a
      model lacks a name or base_path.
  """
  with open(path) as f:
    text = f.read()
  config = model_server_config_pb2.ModelServerConfig()
  try:
    text_format.Parse(text, config)
  except text_format.ParseError as e:
    raise ValueError(f"Could not parse model config file {path}: {e}") from e
  if config.WhichOneof("config") != "model_config_list":
    raise ValueError(f"Model config file {path} must hold a "
                     "model_config_list.")
  configs = list(config.model_config_list.config)
  for c in configs:
    if not c.name or not c.base_path:
      one_line = text_format.MessageToString(c, as_one_line=True)
      raise ValueError(f"Model config file {path}: every config needs a name "
                       f"and a base_path; got {one_line!r}.")
  return configs


def model_config(name, base_path):
  """A ModelConfig for one model served from `base_path` (latest version)."""
  return model_server_config_pb2.ModelConfig(
      name=name, base_path=os.path.abspath(base_path),
      model_platform="tensorflow")


class ModelServer:
  """A gRPC ModelServer for dual models, in process.

  Example:

  ```python
  server = ModelServer([model_config("movies", "/tmp/export")], port=0)
  port = server.start()
  ...
  server.stop()
  ```
  """

  def __init__(self, model_configs, host="127.0.0.1", port=0,
               poll_seconds=versions.DEFAULT_POLL_SECONDS, options=None,
               max_workers=4, rest_api_port=None, metrics=None,
               metrics_path=None, batching=None):
    """Creates the server; nothing is loaded or bound until `start`.

    Args:
      model_configs: `ModelConfig` protos (see `model_config`,
        `model_configs_from_file`).
      host: interface to bind; loopback by default.
      port: TCP port; 0 picks a free one.
      poll_seconds: how often base paths are polled for new versions; 0
        loads once at start.
      options: `ServerOptions`.
      max_workers: request handler threads (per API).
      rest_api_port: TCP port of the REST API (`rest.py`); 0 picks a free
        one, None serves no REST API.
      metrics: a `monitoring.Metrics` to record requests and variations in,
        or None.
      metrics_path: where the REST port serves the Prometheus page of
        `metrics` (needs `rest_api_port`).
      batching: `batching.BatchingOptions` to merge concurrent Predicts
        into batches (TF Serving's --enable_batching), or None. Merging
        needs as many handler threads (`max_workers`) as concurrent
        requests.

    Raises:
      ValueError: `metrics_path` without `metrics` or `rest_api_port`.
    """
    if metrics_path is not None and (metrics is None or
                                     rest_api_port is None):
      raise ValueError(
          "Invalid value received for argument `metrics_path`. Expected None "
          "unless `metrics` and `rest_api_port` are given (the page is "
          f"served on the REST port). Received: metrics_path={metrics_path!r}")
    self.host = host
    self.port = port
    self.options = options or ServerOptions()
    self.manager = versions.ModelManager(model_configs, poll_seconds)
    self.metrics = metrics
    self.metrics_path = metrics_path
    self.batcher = None if batching is None else batching_lib.Batcher(
        batching)
    self.core = servicers.ServingCore(
        self.manager, self.options,
        run=None if self.batcher is None else self.batcher.run,
        metrics=metrics)
    self._max_workers = max_workers
    self._server = None
    self.rest_api_port = rest_api_port
    self._rest = None

  def start(self):
    """Loads the models, binds and starts serving.

    Returns:
      The bound port.

    Raises:
      RuntimeError: the address cannot be bound, or (without
        `allow_version_labels_for_unavailable_models`) a version label
        names a version that did not load.
    """
    self.manager.start()
    if not self.options.allow_version_labels_for_unavailable_models:
      for model in self.manager.models.values():
        loaded = set(model.loaded_versions)
        for label, version in sorted(model.labels.items()):
          if version not in loaded:
            self.manager.stop()
            # TF Serving's words (ServerCore), and how to allow it.
            raise RuntimeError(
                f"Request to assign label {label!r} to version {version} of "
                f"model {model.name}, which is not currently available for "
                "inference (start with "
                "--allow_version_labels_for_unavailable_models to allow it)")
    if self.batcher is not None:
      self.batcher.start()
    limit = self.options.max_request_bytes
    self._server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=self._max_workers,
                                   thread_name_prefix="grpc-handler"),
        options=[("grpc.max_receive_message_length", limit),
                 ("grpc.so_reuseport", 0)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        servicers.PredictionServicer(self.core, self.metrics), self._server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(
        servicers.ModelServicer(self.core), self._server)
    address = f"{self.host}:{self.port}"
    if ":" in self.host and not self.host.startswith("["):
      address = f"[{self.host}]:{self.port}"
    try:
      bound = self._server.add_insecure_port(address)
    except RuntimeError as e:
      self.manager.stop()
      raise RuntimeError(f"Could not bind {address}: {e}") from e
    if not bound:
      self.manager.stop()
      raise RuntimeError(f"Could not bind {address}.")
    self.port = bound
    self._server.start()
    if self.rest_api_port is not None:
      self._rest = rest.RestServer(
          rest.RestApi(self.core, self.metrics, self.metrics_path),
          host=self.host, port=self.rest_api_port,
          max_request_bytes=limit, max_workers=self._max_workers)
      try:
        self.rest_api_port = self._rest.start()
      except OSError as e:
        self._rest = None
        self.stop()
        raise RuntimeError(f"Could not bind the REST API to {self.host}:"
                           f"{self.rest_api_port}: {e}") from e
    return bound

  @property
  def target(self):
    """"host:port" to connect to (the bound port once started)."""
    return f"{self.host}:{self.port}"

  @property
  def rest_url(self):
    """"http://host:port" of the REST API once started; None without it."""
    return None if self._rest is None else self._rest.url

  def stop(self, grace=1.0):
    """Stops accepting requests, lets running ones finish, stops polling."""
    if self._rest is not None:
      self._rest.stop()
      self._rest = None
    if self._server is not None:
      self._server.stop(grace).wait()
      self._server = None
    if self.batcher is not None:
      self.batcher.stop()
    self.manager.stop()

  def __enter__(self):
    self.start()
    return self

  def __exit__(self, *exc):
    self.stop()


def define_flags(flag_values=FLAGS):
  """Defines the server's flags on `flag_values`.

  Called by `run_main`, not at import, so that other absl tools (the client
  CLI defines `--model_name` too) can be imported into the same process.

  Args:
    flag_values: the `flags.FlagValues` to define them on.
  """
  flags.DEFINE_integer("port", 8500, "gRPC port; 0 picks a free port.",
                       flag_values=flag_values)
  flags.DEFINE_string("host", "127.0.0.1",
                      "Interface to bind (loopback by default; 0.0.0.0 for "
                      "all).", flag_values=flag_values)
  flags.DEFINE_string("model_name", "default",
                      "Name of the model (with --model_base_path).",
                      flag_values=flag_values)
  flags.DEFINE_string("model_base_path", None,
                      "Folder holding numeric version folders of the model.",
                      flag_values=flag_values)
  flags.DEFINE_string("model_config_file", None,
                      "Text-format ModelServerConfig (as "
                      "tensorflow_model_server reads); overrides "
                      "--model_name/--model_base_path.",
                      flag_values=flag_values)
  flags.DEFINE_float("file_system_poll_wait_seconds",
                     versions.DEFAULT_POLL_SECONDS,
                     "Seconds between polls for new versions; 0 loads once.",
                     flag_values=flag_values)
  flags.DEFINE_integer("max_batch_size", DEFAULT_MAX_BATCH_SIZE,
                       "Largest batch size accepted per request.",
                       flag_values=flag_values)
  flags.DEFINE_integer("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES,
                       "Largest request accepted, in bytes (gRPC "
                       "max_receive_message_length and decoded tensor size).",
                       flag_values=flag_values)
  flags.DEFINE_bool("allow_version_labels_for_unavailable_models", False,
                    "Accept version labels of the config that name versions "
                    "not loaded at start (as tensorflow_model_server's flag).",
                    flag_values=flag_values)
  flags.DEFINE_bool("reject_non_finite", False,
                    "Answer INVALID_ARGUMENT for NaN/Inf in float inputs "
                    "instead of passing them to the model.",
                    flag_values=flag_values)
  flags.DEFINE_integer("num_workers", 4, "Request handler threads.",
                       flag_values=flag_values)
  flags.DEFINE_integer("tensorflow_intra_op_parallelism", 0,
                       "Threads one TF op may use; 0 lets TF choose (as in "
                       "tensorflow_model_server).", flag_values=flag_values)
  flags.DEFINE_integer("tensorflow_inter_op_parallelism", 0,
                       "Threads running independent TF ops at once; 0 lets "
                       "TF choose. On a small CPU machine 1 keeps the "
                       "variation head's ops from competing with the base "
                       "model's matmuls (bench/dual_bench.py).",
                       flag_values=flag_values)
  flags.DEFINE_string("monitoring_config_file", None,
                      "Text-format MonitoringConfig (as "
                      "tensorflow_model_server reads): "
                      "prometheus_config { enable: true path: ... } serves "
                      "Prometheus metrics on the REST port.",
                      flag_values=flag_values)
  flags.DEFINE_float("variation_threshold", None,
                     "With monitoring: variation above which a served "
                     "example counts in "
                     ":dropvar:serving:variation_share_above_threshold.",
                     flag_values=flag_values)
  flags.DEFINE_bool("enable_batching", False,
                    "Merge concurrent Predict requests into batches, as "
                    "tensorflow_model_server does (see "
                    "--batching_parameters_file). Pass --num_workers of at "
                    "least the number of concurrent clients.",
                    flag_values=flag_values)
  flags.DEFINE_string("batching_parameters_file", None,
                      "Text-format BatchingParameters (as "
                      "tensorflow_model_server reads), used with "
                      "--enable_batching; TF Serving's defaults without it.",
                      flag_values=flag_values)
  flags.DEFINE_integer("rest_api_port", 0,
                       "Port of TF Serving's REST API (and of the "
                       "Prometheus page); 0 serves no REST API, as in "
                       "tensorflow_model_server.", flag_values=flag_values)


# Inclusive bounds of the numeric flags. gRPC takes message sizes as a C int,
# so 2 GiB and more cannot be passed on (TF Serving has the same limit).
_MAX_PORT = 65535
_MAX_GRPC_BYTES = 2**31 - 1
_FLAG_BOUNDS = {
    "port": (0, _MAX_PORT),
    "rest_api_port": (0, _MAX_PORT),
    "max_batch_size": (1, None),
    "max_request_bytes": (1, _MAX_GRPC_BYTES),
    "num_workers": (1, None),
    "tensorflow_intra_op_parallelism": (0, None),
    "tensorflow_inter_op_parallelism": (0, None),
    "file_system_poll_wait_seconds": (0, None),
    "variation_threshold": (0, None),
}


def check_flag_values(flag_values):
  """Refuses flag values the server cannot run with, before anything starts.

  Args:
    flag_values: the parsed `flags.FlagValues`.

  Raises:
    app.UsageError: a value is out of range (or NaN), with a one-line
      message naming the flag and the value received.
  """
  for name, (low, high) in _FLAG_BOUNDS.items():
    value = getattr(flag_values, name)
    if value is None:
      continue
    if low is not None and high is not None:
      expected = f"a value in [{low}, {high}]"
    else:
      expected = f"a value >= {low}"
    # `not <=` also refuses NaN.
    if not low <= value or (high is not None and value > high):
      raise app.UsageError(
          f"Invalid value received for flag `--{name}`. Expected {expected}. "
          f"Received: --{name}={value}")


def _configs_from_flags():
  """The ModelConfigs the flags ask for (config file, or name and path)."""
  if FLAGS.model_config_file:
    return model_configs_from_file(FLAGS.model_config_file)
  if not FLAGS.model_base_path:
    raise app.UsageError(
        "Pass --model_base_path (with --model_name) or --model_config_file.")
  return [model_config(FLAGS.model_name, FLAGS.model_base_path)]


def main(argv):
  """Serves the models named by FLAGS until SIGTERM or SIGINT.

  Args:
    argv: the arguments left after flag parsing (none are accepted).

  Returns:
    The exit code: 0 after a signal, 1 when the config cannot be read or
    the address cannot be bound.

  Raises:
    app.UsageError: a flag value is out of range, or flags are missing.
  """
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  check_flag_values(FLAGS)
  if FLAGS.monitoring_config_file and not FLAGS.rest_api_port:
    raise app.UsageError(
        "Invalid value received for flag `--rest_api_port`. Expected a port "
        "when --monitoring_config_file is given (metrics are served on the "
        "REST port). Received: --rest_api_port=0")
  # Before any model is loaded: TF fixes its thread pools on first use.
  tf.config.threading.set_intra_op_parallelism_threads(
      FLAGS.tensorflow_intra_op_parallelism)
  tf.config.threading.set_inter_op_parallelism_threads(
      FLAGS.tensorflow_inter_op_parallelism)
  print("TensorFlow threads: intra-op "
        f"{tf.config.threading.get_intra_op_parallelism_threads()}, inter-op "
        f"{tf.config.threading.get_inter_op_parallelism_threads()} "
        "(0: TF's choice)", flush=True)
  allow_labels = FLAGS.allow_version_labels_for_unavailable_models
  try:
    configs = _configs_from_flags()
    metrics = metrics_path = None
    if FLAGS.monitoring_config_file:
      metrics_path = monitoring.read_monitoring_config(
          FLAGS.monitoring_config_file)
      if metrics_path is not None:
        metrics = monitoring.Metrics(FLAGS.variation_threshold)
    batching = None
    if FLAGS.enable_batching:
      batching = (batching_lib.read_batching_parameters(
          FLAGS.batching_parameters_file)
                  if FLAGS.batching_parameters_file else
                  batching_lib.BatchingOptions())
    server = ModelServer(
        configs, host=FLAGS.host, port=FLAGS.port,
        poll_seconds=FLAGS.file_system_poll_wait_seconds,
        options=ServerOptions(max_batch_size=FLAGS.max_batch_size,
                              max_request_bytes=FLAGS.max_request_bytes,
                              reject_non_finite=FLAGS.reject_non_finite,
                              allow_version_labels_for_unavailable_models=(
                                  allow_labels)),
        max_workers=FLAGS.num_workers,
        rest_api_port=FLAGS.rest_api_port or None, metrics=metrics,
        metrics_path=metrics_path, batching=batching)
  except (ValueError, OSError) as e:
    logging.error("%s", e)
    return 1
  stop = threading.Event()

  def on_signal(signum, frame):
    logging.info("Received signal %d, shutting down.", signum)
    stop.set()

  signal.signal(signal.SIGTERM, on_signal)
  signal.signal(signal.SIGINT, on_signal)
  try:
    port = server.start()
  except RuntimeError as e:
    logging.error("%s", e)
    return 1
  # Tests and scripts wait for this line (TF Serving prints the same).
  message = f"Running gRPC ModelServer at {server.host}:{port} ..."
  logging.info("%s", message)
  print(message, flush=True)
  if server.rest_url is not None:
    message = (f"Exporting HTTP/REST API at:{server.host}:"
               f"{server.rest_api_port} ...")
    logging.info("%s", message)
    print(message, flush=True)
  while not stop.wait(0.5):
    pass
  server.stop(grace=2.0)
  logging.info("Server stopped.")
  return 0


def _main_or_usage_error(argv):
  """`main`, with a usage error printed as one line and exit code 2."""
  try:
    return main(argv)
  except app.UsageError as e:
    print(f"{os.path.basename(argv[0])}: {e}", file=sys.stderr, flush=True)
    return 2


def run_main():
  """Console entry point `dropvar_model_server`."""
  define_flags()
  cli_help.run(_main_or_usage_error, __name__, __doc__)


if __name__ == "__main__":
  run_main()
