"""Load test of `dropvar_model_server` on loopback, with and without batching.

  python bench/serving_load_bench.py [--quick] [--clients=1,16,64]
      [--width=2048 | --model=encoder --size=32]

The base model is an MLP of 3 hidden layers (256 units, or `--width`) on
32 float features, or with `--model` one of `zoo_cost_bench.py`'s models
(EfficientNetB0, MobileNetV2, the BERT-style encoder, the LSTM text model)
at `--size`. Exports a dual model (the base with a variation head from
`dropvar_tf.heads.add_variation_head`) and the base the same way (a
`serving_default` signature taking "x"; the base returns only
"prediction"), then starts `dropvar_model_server` as a subprocess on
127.0.0.1 and:

1. For each batching setting (off, then `--enable_batching`, then a gRPC
   server whose Predict does nothing: the floor of gRPC itself) and each number
   of concurrent clients (threads, each sending batch-1 Predict requests
   over gRPC back to back), sends a bounded number of requests and reports
   requests/s, p50/p99 latency, errors, the server's CPU time per request
   (user + system, from /proc: what a request costs the server whatever
   else the machine runs) and its RSS before and after.
2. Times the dual and the base model end to end at batch 1 (one client,
   requests interleaved dual/base/floor/minimal so machine load hits all
   alike),
   over gRPC and over REST, and reports the p50 ratio dual/base. The floor
   is the base's graph exported with the dual's two outputs (the variation
   a constant): floor/base is what serving a second output costs in the
   server, dual/floor what the head's graph costs. "minimal" is the
   cheapest head `add_variation_head` builds (the last layer's summaries
   alone, no prediction or delta feature, no prior): what any head costs.

`--extra_models=name=path,...` serves more SavedModels beside these (the
dual and minimal head exported by another revision's code, say) and
interleaves them in the latency loop: ratios across revisions from one
run. `--variable_head` adds the dual with its head's weights read from
variables, as exports did before they served them as graph constants;
`--jit_compile` exports every model with XLA, and `--plain_too` then adds
base and dual exported without it.
`--census` only counts the ops each model runs per batch-1 request in a
TF1 Session (the path TF Serving loads a SavedModel into), with
`--census_rounds=N` also times those runs (N interleaved rounds, no RPC;
`--census_session` and `--census_intra_op` pick the Sessions' executor and
threads), and exits.

Everything stays on loopback and is bounded by `--requests` per setting and
`--max_seconds` per setting. Client and server share the machine, so the
numbers are for comparing settings, not absolute capacity.
"""

import collections
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from absl import app
from absl import flags
from absl import logging
import grpc
import numpy as np
import requests

from dropvar_tf import contract
from dropvar_tf import heads
from dropvar_tf import keras_graph
from dropvar_tf import saved_model
from dropvar_tf._keras import keras, tf
from dropvar_tf.serving import bundle
from dropvar_tf.serving import codec
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo_cost_bench  # noqa: E402  (a script beside this one)

FLAGS = flags.FLAGS
_FEATURES = 32
# The base model, the dual, and the floor: the base's graph answering the
# dual's two outputs (a constant variation).
_MODELS = ("base", "dual", "floor", "minimal")
# With --variable_head: the dual with its head's weights read from variables.
_VARIABLE_HEAD = "dual_variable_head"
# With --jit_compile --plain_too: base and dual exported without XLA.
_PLAIN = ("base_plain", "dual_plain")


def _extra_models():
  """{name: SavedModel path} of `--extra_models`."""
  extra = {}
  for item in FLAGS.extra_models:
    name, sep, path = item.partition("=")
    if (not sep or not name or name in _MODELS + (_VARIABLE_HEAD,) + _PLAIN
        or not os.path.isdir(path)):
      raise ValueError(
          "Invalid value received for argument `extra_models`. Expected "
          "name=path pairs, each a new name and a SavedModel directory. "
          f"Received: extra_models={item!r}")
    extra[name] = path
  return extra


def _models():
  variable = (_VARIABLE_HEAD,) if FLAGS.variable_head else ()
  plain = _PLAIN if FLAGS.plain_too else ()  # needs --jit_compile
  return _MODELS + variable + plain + tuple(_extra_models())


_BATCHING = """
max_batch_size { value: 64 }
batch_timeout_micros { value: 1000 }
num_batch_threads { value: 2 }
max_enqueued_batches { value: 1000 }
"""


def define_flags(flag_values=FLAGS):
  """Defines the benchmark's flags on `flag_values`."""
  flags.DEFINE_bool("quick", False, "Fewer requests (a smoke run).",
                    flag_values=flag_values)
  flags.DEFINE_list("clients", ["1", "16", "64"],
                    "Numbers of concurrent clients.", flag_values=flag_values)
  flags.DEFINE_integer("requests", 3000,
                       "Requests per (batching, clients) setting.",
                       flag_values=flag_values)
  flags.DEFINE_float("max_seconds", 30.0,
                     "Longest a setting may run; it stops early then.",
                     flag_values=flag_values)
  flags.DEFINE_list("server_flags", [],
                    "Extra dropvar_model_server flags, e.g. "
                    "--server_flags=--tensorflow_inter_op_parallelism=1.",
                    flag_values=flag_values)
  flags.DEFINE_integer("width", 256,
                       "Width of the MLP's 3 hidden layers: a wider one costs "
                       "more per run, which batching shares.",
                       flag_values=flag_values)
  flags.DEFINE_enum("model", "mlp", ["mlp"] + list(zoo_cost_bench.MODELS),
                    "The base model: the MLP, or one of "
                    "bench/zoo_cost_bench.py's (BatchNorm calibrated, "
                    "served at --size; --width is then unused).",
                    flag_values=flag_values)
  flags.DEFINE_integer("size", 32,
                       "With a zoo --model: its image size or sequence "
                       "length (zoo_cost_bench.py's own default image size "
                       "is 64).", flag_values=flag_values)
  flags.DEFINE_enum("census_session", "default",
                    ["default", "caller_thread", "single_threaded"],
                    "With --census: the Sessions' executor. caller_thread: "
                    "every op in the calling thread "
                    "(inter_op_parallelism_threads=-1); single_threaded: "
                    "TF's SINGLE_THREADED_EXECUTOR.", flag_values=flag_values)
  flags.DEFINE_integer("census_intra_op", 0,
                       "With --census: intra-op threads of the process (0: "
                       "TF's choice).", flag_values=flag_values)
  flags.DEFINE_integer("latency_requests", 1000,
                       "Requests per model for the dual vs base latency.",
                       flag_values=flag_values)
  flags.DEFINE_list("extra_models", [],
                    "name=path pairs: SavedModels (e.g. this bench's dual "
                    "exported by another revision) served beside the "
                    "bench's own and interleaved with them in the latency "
                    "table, as name/base and dual/name.",
                    flag_values=flag_values)
  flags.DEFINE_bool("plain_too", False,
                    "With --jit_compile: also serve base and dual exported "
                    f"without XLA, as models {_PLAIN[0]!r} and "
                    f"{_PLAIN[1]!r} (in the latency table as "
                    f"{_PLAIN[0]}/base, dual/{_PLAIN[0]}, ...): what XLA "
                    "itself costs or saves.",
                    flag_values=flag_values)
  flags.DEFINE_bool("variable_head", False,
                    "Also serve the dual with its head's weights read from "
                    "variables instead of graph constants, as model "
                    f"{_VARIABLE_HEAD!r} (in the latency table as "
                    f"{_VARIABLE_HEAD}/base and dual/{_VARIABLE_HEAD}).",
                    flag_values=flag_values)
  flags.DEFINE_bool("jit_compile", False,
                    "Export every model's serving_default compiled with XLA "
                    "(`export_saved_model(jit_compile=True)`; TF Serving "
                    "runs such exports with "
                    "--xla_cpu_compilation_enabled=true).",
                    flag_values=flag_values)
  flags.register_multi_flags_validator(
      ["plain_too", "jit_compile"],
      lambda values: values["jit_compile"] or not values["plain_too"],
      message="--plain_too needs --jit_compile (without it every model is "
      "exported plain already)", flag_values=flag_values)
  flags.DEFINE_integer("census_rounds", 0,
                       "With --census, also time each model's Session run "
                       "in this many interleaved rounds of 100.",
                       flag_values=flag_values)
  flags.DEFINE_bool("census", False,
                    "Only count the ops each exported model runs per batch-1 "
                    "request in a TF1 Session (as TF Serving runs it) and "
                    "exit.", flag_values=flag_values)


def _description():
  xla = ", every model exported with XLA (jit_compile)" if FLAGS.jit_compile \
      else ""
  if FLAGS.model == "mlp":
    return f"3x{FLAGS.width} MLP, {_FEATURES} features{xla}"
  description, _, _, size_arg = zoo_cost_bench.MODELS[FLAGS.model]
  return f"{description}, {size_arg}={FLAGS.size}{xla}"


def _inputs(n, seed):
  """`n` rows of the base model's input "x"."""
  if FLAGS.model == "mlp":
    return np.random.default_rng(seed).normal(
        size=(n, _FEATURES)).astype(np.float32)
  return zoo_cost_bench.MODELS[FLAGS.model][2](n, FLAGS.size, seed)


def _base_model():
  """The base model, built with seed 0 (served under the input name "x")."""
  if FLAGS.model != "mlp":
    return zoo_cost_bench.build(FLAGS.model, FLAGS.size, seed=0)[0]
  keras.utils.set_random_seed(0)
  x = keras.Input(shape=(_FEATURES,), name="x")
  h = x
  for _ in range(3):
    h = keras.layers.Dense(FLAGS.width, activation="relu")(h)
    h = keras.layers.Dropout(0.2)(h)
  return keras.Model(x, keras.layers.Dense(1)(h))


def _export(model, path, keys, spec, constant_variation=None,
            variable_head=False, jit_compile=None):
  """Exports `model` with a `serving_default` returning `keys`.

  As `export_saved_model` does, a dual's small head weights are constants of
  the serving graph (`saved_model.constant_head`; with `variable_head` they
  are read from the variables, as exports before that did), and a row with
  a NaN or infinite input answers the head's cap. `jit_compile`
  None follows --jit_compile.

  With `constant_variation` (the dual's variation shape, batch excluded) the
  "variation" output is zeros instead of the head: the dual's outputs at
  the base's graph cost, the floor of what serving the dual can cost.
  """
  archive = keras.export.ExportArchive()
  archive.track(model)
  head_values = [] if variable_head else saved_model.head_weight_values(model)
  # As export_saved_model answers rows of non-finite inputs (empty for the
  # base: it has no head).
  unknown = saved_model._unknown_values(model)  # noqa: SLF001

  def serve(x):
    with saved_model.constant_head(head_values):
      outputs = model(x, training=False)
    if not isinstance(outputs, dict):
      outputs = {contract.PREDICTION_KEY: outputs}
    if constant_variation is not None:
      outputs[contract.VARIATION_KEY] = tf.zeros(
          [tf.shape(x)[0]] + constant_variation)
    outputs = {key: outputs[key] for key in keys}
    return saved_model._flag_non_finite_rows(  # noqa: SLF001
        {"x": x}, {"x": spec}, outputs, unknown)

  if FLAGS.jit_compile if jit_compile is None else jit_compile:
    # As `export_saved_model(jit_compile=True)` compiles it: one XLA
    # program per power-of-two batch size, requests padded up to it.
    run = serve
    padded = saved_model._padded_to_bucket(  # noqa: SLF001
        tf.function(lambda inputs: run(inputs["x"]), jit_compile=True))
    serve = lambda x: padded({"x": x})  # noqa: E731
  archive.add_endpoint(contract.SERVING_SIGNATURE, serve,
                       input_signature=[spec])
  archive.write_out(path, verbose=False)


def _export_models(base_dir):
  """Exports base and dual under `base_dir`; returns the config file path."""
  base = _base_model()
  dual = heads.add_variation_head(base)
  example = _inputs(1, 0)
  spec = tf.TensorSpec((None,) + example.shape[1:], example.dtype, name="x")
  _export(base, os.path.join(base_dir, "base", "1"),
          [contract.PREDICTION_KEY], spec)
  _export(dual, os.path.join(base_dir, "dual", "1"), contract.OUTPUT_KEYS,
          spec)
  if FLAGS.variable_head:
    _export(dual, os.path.join(base_dir, _VARIABLE_HEAD, "1"),
            contract.OUTPUT_KEYS, spec, variable_head=True)
  if _PLAIN[0] in _models():
    _export(base, os.path.join(base_dir, _PLAIN[0], "1"),
            [contract.PREDICTION_KEY], spec, jit_compile=False)
    _export(dual, os.path.join(base_dir, _PLAIN[1], "1"),
            contract.OUTPUT_KEYS, spec, jit_compile=False)
  # The cheapest head the library builds: the last layer's summaries only,
  # no prediction or delta feature, no prior, no shrink.
  minimal = heads.add_variation_head(
      base, layers="last", include_prediction=False, include_delta=False,
      prior=None, shrink_out_of_range=False)
  _export(minimal, os.path.join(base_dir, "minimal", "1"),
          contract.OUTPUT_KEYS, spec)
  _export(base, os.path.join(base_dir, "floor", "1"), contract.OUTPUT_KEYS,
          spec, constant_variation=[
              int(d) for d in dual.output[contract.VARIATION_KEY].shape[1:]])
  for name, path in _extra_models().items():
    shutil.copytree(path, os.path.join(base_dir, name, "1"))
  config = os.path.join(base_dir, "models.config")
  with open(config, "w") as f:
    entries = "".join(
        f'config {{ name: "{name}" base_path: '
        f'"{os.path.join(base_dir, name)}" model_platform: "tensorflow" }} '
        for name in _models())
    f.write(f"model_config_list {{ {entries}}}\n")
  return config


def census(base_dir, rounds=0, passes=100):
  """Ops, and optionally time, of each model's batch-1 run in a TF1 Session.

  The ops are those of the Session's partition graphs after Grappler, as
  `dropvar_model_server` (and TF Serving) runs the `serving_default`
  signature: every variable costs three (VarHandleOp, Identity,
  ReadVariableOp), constants count. With `rounds`, each model's Session
  callable is then timed for `passes` runs a round, the models interleaved
  (in alternating order) round by round.

  Returns:
    {model: Counter of op types}, and {model: (rounds,) seconds a run}
    (empty without `rounds`).
  """
  counts, callables, sessions = {}, {}, []
  x = _inputs(1, 0)
  config = tf.compat.v1.ConfigProto()
  if FLAGS.census_session == "caller_thread":
    config.inter_op_parallelism_threads = -1
    config.use_per_session_threads = True
  elif FLAGS.census_session == "single_threaded":
    config.experimental.executor_type = "SINGLE_THREADED_EXECUTOR"
  for name in _models():
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph, config=config)
    sessions.append(session)
    with graph.as_default(), bundle.no_deprecation_warning():
      meta = tf.compat.v1.saved_model.loader.load(
          session, ["serve"], os.path.join(base_dir, name, "1"))
    signature = meta.signature_def[contract.SERVING_SIGNATURE]
    feeds = {signature.inputs["x"].name: x}
    fetches = [t.name for t in signature.outputs.values()]
    session.run(fetches, feeds)
    run_metadata = tf.compat.v1.RunMetadata()
    session.run(fetches, feeds, options=tf.compat.v1.RunOptions(
        output_partition_graphs=True), run_metadata=run_metadata)
    counts[name] = collections.Counter(
        node.op for graph_def in run_metadata.partition_graphs
        for node in graph_def.node)
    callables[name] = keras_graph.session_callable(
        session, list(feeds), fetches)
  times = {name: [] for name in callables}
  order = list(callables.items())
  for r in range(rounds + 1):  # round 0 warms up
    for name, run in order[::-1] if r % 2 else order:
      start = time.perf_counter()
      for _ in range(passes):
        run(x)
      if r:
        times[name].append((time.perf_counter() - start) / passes)
  for session in sessions:
    session.close()
  return counts, {name: np.asarray(t) for name, t in times.items() if t}


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# A gRPC server in the same runtime whose Predict does nothing: what gRPC
# itself costs the server per request, the floor of any Python handler.
_EMPTY_SERVER = """
from concurrent import futures
import grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc
class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
  def Predict(self, request, context):
    return predict_pb2.PredictResponse()
server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
    Servicer(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(f"Running gRPC ModelServer at 127.0.0.1:{port} ...", flush=True)
server.wait_for_termination()
"""


class _Server:
  """`dropvar_model_server` (or `_EMPTY_SERVER`) in a subprocess."""

  def __init__(self, config, extra_args, empty=False):
    self.rest_port = _free_port()
    argv = ([sys.executable, "-c", _EMPTY_SERVER] if empty else
            [sys.executable, "-m", "dropvar_tf.serving.server", "--port=0",
             f"--rest_api_port={self.rest_port}",
             f"--model_config_file={config}", "--num_workers=64",
             "--file_system_poll_wait_seconds=0"] + extra_args)
    self.proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    for line in self.proc.stdout:
      match = re.match(r"Running gRPC ModelServer at (\S+) \.\.\.", line)
      if match:
        self.target = match.group(1)
        break
    else:
      raise RuntimeError("dropvar_model_server exited before serving")
    # Keep reading its stdout so the pipe never fills.
    threading.Thread(target=self.proc.stdout.read, daemon=True).start()

  def rss_mib(self):
    with open(f"/proc/{self.proc.pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024
    return float("nan")

  def cpu_seconds(self):
    """User + system CPU time the server process has used so far."""
    with open(f"/proc/{self.proc.pid}/stat") as f:
      # Fields 14 and 15 (utime, stime), counted after the ")" that ends
      # the command name.
      fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

  def stop(self):
    self.proc.terminate()
    self.proc.wait(timeout=60)


def _request(model, x):
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model
  request.inputs["x"].CopyFrom(codec.encode(x))
  return request


def _load(target, clients, total, max_seconds):
  """`clients` threads send batch-1 Predicts until `total` are done."""
  rng = np.random.default_rng(clients)
  rows = _inputs(64, int(rng.integers(1 << 30)))
  requests_ = [_request("dual", rows[i:i + 1]) for i in range(len(rows))]
  lock = threading.Lock()
  state = {"left": total, "errors": 0}
  latencies = []
  deadline = time.monotonic() + max_seconds

  def client(index):
    with grpc.insecure_channel(target) as channel:
      stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
      mine = []
      i = index
      while time.monotonic() < deadline:
        with lock:
          if state["left"] <= 0:
            break
          state["left"] -= 1
        t0 = time.perf_counter()
        try:
          stub.Predict(requests_[i % len(requests_)], timeout=30)
          mine.append(time.perf_counter() - t0)
        except grpc.RpcError:
          with lock:
            state["errors"] += 1
        i += clients
      with lock:
        latencies.extend(mine)

  threads = [threading.Thread(target=client, args=(i,))
             for i in range(clients)]
  start = time.perf_counter()
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  wall = time.perf_counter() - start
  ms = np.asarray(latencies) * 1e3
  return {"rps": len(latencies) / wall, "p50": float(np.percentile(ms, 50)),
          "p99": float(np.percentile(ms, 99)), "errors": state["errors"],
          "done": len(latencies)}


def _dual_vs_base(server, iterations):
  """p50/p99 ms of dual and base at batch 1, gRPC and REST, interleaved."""
  x = _inputs(1, 1)
  body = json.dumps({"inputs": x.tolist()})
  url = f"http://127.0.0.1:{server.rest_port}/v1/models/{{}}:predict"
  times = {(p, m): [] for p in ("grpc", "rest") for m in _models()}
  with grpc.insecure_channel(server.target) as channel, \
      requests.Session() as session:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    grpc_requests = {m: _request(m, x) for m in _models()}

    def once(protocol, model):
      t0 = time.perf_counter()
      if protocol == "grpc":
        stub.Predict(grpc_requests[model], timeout=30)
      else:
        response = session.post(url.format(model), data=body, timeout=30)
        response.raise_for_status()
      return time.perf_counter() - t0

    for _ in range(max(20, iterations // 10)):  # Warm-up.
      for key in times:
        once(*key)
    keys = list(times)
    order = np.random.default_rng(0)
    for _ in range(iterations):
      # A shuffled order each round: the first call after the other
      # protocol's pays for waking the server's threads.
      for index in order.permutation(len(keys)):
        times[keys[index]].append(once(*keys[index]))
  return {key: (float(np.percentile(np.asarray(v) * 1e3, 50)),
                float(np.percentile(np.asarray(v) * 1e3, 99)))
          for key, v in times.items()}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # The exporter's INFO lines.
  total = 300 if FLAGS.quick else FLAGS.requests
  latency_requests = 100 if FLAGS.quick else FLAGS.latency_requests
  clients = [int(c) for c in FLAGS.clients]
  if FLAGS.census:
    if FLAGS.census_intra_op:
      tf.config.threading.set_intra_op_parallelism_threads(
          FLAGS.census_intra_op)
    with tempfile.TemporaryDirectory() as base_dir:
      _export_models(base_dir)
      counts, times = census(base_dir, FLAGS.census_rounds)
    print(f"{_description()}: ops run per batch-1 request in a TF1 Session")
    for name, count in counts.items():
      print(f"{name}: {sum(count.values())} ops {dict(count.most_common())}")
    if times:
      print(f"\nSession run at batch 1 ({FLAGS.census_session} executor, "
            f"intra-op threads {FLAGS.census_intra_op or 'TF choice'}), "
            f"{FLAGS.census_rounds} interleaved rounds of 100 runs: median "
            "us a run, median of the per-round ratio to base (IQR), median "
            "of the per-round extra us over base")
      for name, t in times.items():
        q1, med, q3 = np.percentile(t / times["base"], [25, 50, 75])
        extra = np.median(t - times["base"]) * 1e6
        print(f"| {name} | {np.median(t) * 1e6:.1f} | {med:.3f} "
              f"({q1:.3f}-{q3:.3f}) | {extra:+.0f} |")
      for name in _models()[len(_MODELS):]:
        # An extra "minimal..." compares with minimal, any other with dual.
        mine = "minimal" if name.startswith("minimal") else "dual"
        q1, med, q3 = np.percentile(times[mine] / times[name], [25, 50, 75])
        print(f"{mine}/{name}: {med:.3f} ({q1:.3f}-{q3:.3f})")
    return
  print(f"{_description()}: dual model, batch-1 gRPC "
        f"Predicts, {total} per setting, {os.cpu_count()} CPUs shared by "
        "server and clients")
  print("(server CPU ms/request: the server process's user + system time "
        "over the requests answered; it does not depend on what else runs. "
        "empty handler: a gRPC server whose Predict does nothing, what gRPC "
        "costs per request)")
  print("| batching | clients | requests/s | p50 ms | p99 ms | errors | "
        "server CPU ms/request | RSS before MiB | RSS after MiB |")
  print("|---|---|---|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as base_dir:
    config = _export_models(base_dir)
    batching_file = os.path.join(base_dir, "batching.txt")
    with open(batching_file, "w") as f:
      f.write(_BATCHING)
    latency = None
    for batching in ("off", "on", "empty handler"):
      extra = (["--enable_batching",
                f"--batching_parameters_file={batching_file}"]
               if batching == "on" else [])
      server = _Server(config, extra + FLAGS.server_flags,
                       empty=batching == "empty handler")
      try:
        _load(server.target, 4, 200, FLAGS.max_seconds)  # Warm-up.
        for n in clients:
          before = server.rss_mib()
          cpu = server.cpu_seconds()
          result = _load(server.target, n, total, FLAGS.max_seconds)
          cpu = server.cpu_seconds() - cpu
          after = server.rss_mib()
          print(f"| {batching} | {n} | "
                f"{result['rps']:.0f} | {result['p50']:.2f} | "
                f"{result['p99']:.2f} | {result['errors']} | "
                f"{1e3 * cpu / max(result['done'], 1):.2f} | {before:.0f} | "
                f"{after:.0f} |", flush=True)
        if batching == "off":
          latency = _dual_vs_base(server, latency_requests)
      finally:
        server.stop()
  print(f"\nDual vs base, batch 1, one client, {latency_requests} "
        "interleaved requests each, batching off:")
  print("(floor: the base's graph answering both outputs, the variation a "
        "constant: floor/base is the server's share, dual/floor the head's "
        "graph; minimal: the cheapest head add_variation_head builds, the "
        "last layer's summaries alone)")
  print("| protocol | base p50 ms | floor p50 ms | dual p50 ms | dual/base "
        "p50 | floor/base p50 | dual/floor p50 | minimal/base p50 | "
        "base p99 ms | dual p99 ms |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for protocol in ("grpc", "rest"):
    base_p50, base_p99 = latency[(protocol, "base")]
    floor_p50, _ = latency[(protocol, "floor")]
    dual_p50, dual_p99 = latency[(protocol, "dual")]
    minimal_p50, _ = latency[(protocol, "minimal")]
    print(f"| {protocol} | {base_p50:.3f} | {floor_p50:.3f} | "
          f"{dual_p50:.3f} | {dual_p50 / base_p50:.3f} | "
          f"{floor_p50 / base_p50:.3f} | {dual_p50 / floor_p50:.3f} | "
          f"{minimal_p50 / base_p50:.3f} | {base_p99:.3f} | "
          f"{dual_p99:.3f} |")
  for name in _models()[len(_MODELS):]:
    print(f"\n{name}, interleaved with the above:")
    print(f"| protocol | {name} p50 ms | {name}/base p50 | dual/{name} p50 | "
          f"minimal/{name} p50 |")
    print("|---|---|---|---|---|")
    for protocol in ("grpc", "rest"):
      p50 = {m: latency[(protocol, m)][0] for m in ("base", "dual", "minimal",
                                                     name)}
      print(f"| {protocol} | {p50[name]:.3f} | {p50[name] / p50['base']:.3f} "
            f"| {p50['dual'] / p50[name]:.3f} | "
            f"{p50['minimal'] / p50[name]:.3f} |")
  if _PLAIN[0] in _models():
    print("\nXLA against without it, interleaved with the above:")
    print(f"| protocol | {_PLAIN[1]}/{_PLAIN[0]} p50 | base/{_PLAIN[0]} p50 "
          f"| dual/{_PLAIN[1]} p50 | dual/{_PLAIN[0]} p50 |")
    print("|---|---|---|---|---|")
    for protocol in ("grpc", "rest"):
      p50 = {m: latency[(protocol, m)][0] for m in ("base", "dual") + _PLAIN}
      plain_base, plain_dual = (p50[m] for m in _PLAIN)
      print(f"| {protocol} | {plain_dual / plain_base:.3f} | "
            f"{p50['base'] / plain_base:.3f} | "
            f"{p50['dual'] / plain_dual:.3f} | "
            f"{p50['dual'] / plain_base:.3f} |")


def run_main():
  """Parses the flags and runs the benchmark."""
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run_main()
