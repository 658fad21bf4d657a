"""Load test of `dropvar_model_server` on loopback, with and without batching.

  python bench/serving_load_bench.py [--quick] [--clients=1,16,64]

Exports a dual model (a 3x256 MLP with a variation head from
`dropvar_tf.heads.add_variation_head`) and its base model the same way (a
`serving_default` signature; the base returns only "prediction"), then
starts `dropvar_model_server` as a subprocess on 127.0.0.1 and:

1. For each batching setting (off, then `--enable_batching`) and each number
   of concurrent clients (threads, each sending batch-1 Predict requests
   over gRPC back to back), sends a bounded number of requests and reports
   requests/s, p50/p99 latency, errors, and the server's RSS before and
   after.
2. Times the dual and the base model end to end at batch 1 (one client,
   requests interleaved dual/base so machine load hits both alike), over
   gRPC and over REST, and reports the p50 ratio dual/base.

Everything stays on loopback and is bounded by `--requests` per setting and
`--max_seconds` per setting. Client and server share the machine, so the
numbers are for comparing settings, not absolute capacity.
"""

import json
import os
import re
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
from dropvar_tf._keras import keras, tf
from dropvar_tf.serving import codec
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

FLAGS = flags.FLAGS
_FEATURES = 32
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
  flags.DEFINE_integer("latency_requests", 1000,
                       "Requests per model for the dual vs base latency.",
                       flag_values=flag_values)


def _export(model, path, keys):
  """Exports `model` with a `serving_default` returning `keys`."""
  archive = keras.export.ExportArchive()
  archive.track(model)

  def serve(x):
    outputs = model(x, training=False)
    if not isinstance(outputs, dict):
      outputs = {contract.PREDICTION_KEY: outputs}
    return {key: outputs[key] for key in keys}

  archive.add_endpoint(contract.SERVING_SIGNATURE, serve, input_signature=[
      tf.TensorSpec((None, _FEATURES), tf.float32, name="x")])
  archive.write_out(path, verbose=False)


def _export_models(base_dir):
  """Exports base and dual under `base_dir`; returns the config file path."""
  keras.utils.set_random_seed(0)
  x = keras.Input(shape=(_FEATURES,), name="x")
  h = x
  for _ in range(3):
    h = keras.layers.Dense(256, activation="relu")(h)
    h = keras.layers.Dropout(0.2)(h)
  base = keras.Model(x, keras.layers.Dense(1)(h))
  dual = heads.add_variation_head(base)
  _export(base, os.path.join(base_dir, "base", "1"),
          [contract.PREDICTION_KEY])
  _export(dual, os.path.join(base_dir, "dual", "1"), contract.OUTPUT_KEYS)
  config = os.path.join(base_dir, "models.config")
  with open(config, "w") as f:
    entries = "".join(
        f'config {{ name: "{name}" base_path: '
        f'"{os.path.join(base_dir, name)}" model_platform: "tensorflow" }} '
        for name in ("base", "dual"))
    f.write(f"model_config_list {{ {entries}}}\n")
  return config


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Server:
  """`dropvar_model_server` in a subprocess, on loopback."""

  def __init__(self, config, extra_args):
    self.rest_port = _free_port()
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "dropvar_tf.serving.server", "--port=0",
         f"--rest_api_port={self.rest_port}",
         f"--model_config_file={config}", "--num_workers=64",
         "--file_system_poll_wait_seconds=0"] + extra_args,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
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
  requests_ = [_request("dual", rng.normal(size=(1, _FEATURES)).astype(
      np.float32)) for _ in range(64)]
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
  x = np.random.default_rng(1).normal(size=(1, _FEATURES)).astype(np.float32)
  body = json.dumps({"inputs": x.tolist()})
  url = f"http://127.0.0.1:{server.rest_port}/v1/models/{{}}:predict"
  times = {(p, m): [] for p in ("grpc", "rest") for m in ("dual", "base")}
  with grpc.insecure_channel(server.target) as channel, \
      requests.Session() as session:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    grpc_requests = {m: _request(m, x) for m in ("dual", "base")}

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
    for _ in range(iterations):
      for key in times:
        times[key].append(once(*key))
  return {key: (float(np.percentile(np.asarray(v) * 1e3, 50)),
                float(np.percentile(np.asarray(v) * 1e3, 99)))
          for key, v in times.items()}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # The exporter's INFO lines.
  total = 300 if FLAGS.quick else FLAGS.requests
  latency_requests = 100 if FLAGS.quick else FLAGS.latency_requests
  clients = [int(c) for c in FLAGS.clients]
  print(f"3x256 MLP dual model, {_FEATURES} features, batch-1 gRPC "
        f"Predicts, {total} per setting, {os.cpu_count()} CPUs shared by "
        "server and clients")
  print("| batching | clients | requests/s | p50 ms | p99 ms | errors | "
        "RSS before MiB | RSS after MiB |")
  print("|---|---|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as base_dir:
    config = _export_models(base_dir)
    batching_file = os.path.join(base_dir, "batching.txt")
    with open(batching_file, "w") as f:
      f.write(_BATCHING)
    latency = None
    for batching in (False, True):
      extra = (["--enable_batching",
                f"--batching_parameters_file={batching_file}"]
               if batching else [])
      server = _Server(config, extra + FLAGS.server_flags)
      try:
        _load(server.target, 4, 200, FLAGS.max_seconds)  # Warm-up.
        for n in clients:
          before = server.rss_mib()
          result = _load(server.target, n, total, FLAGS.max_seconds)
          after = server.rss_mib()
          print(f"| {'on' if batching else 'off'} | {n} | "
                f"{result['rps']:.0f} | {result['p50']:.2f} | "
                f"{result['p99']:.2f} | {result['errors']} | {before:.0f} | "
                f"{after:.0f} |", flush=True)
        if not batching:
          latency = _dual_vs_base(server, latency_requests)
      finally:
        server.stop()
  print(f"\nDual vs base, batch 1, one client, {latency_requests} "
        "interleaved requests each, batching off:")
  print("| protocol | base p50 ms | dual p50 ms | dual/base p50 | "
        "base p99 ms | dual p99 ms |")
  print("|---|---|---|---|---|---|")
  for protocol in ("grpc", "rest"):
    base_p50, base_p99 = latency[(protocol, "base")]
    dual_p50, dual_p99 = latency[(protocol, "dual")]
    print(f"| {protocol} | {base_p50:.3f} | {dual_p50:.3f} | "
          f"{dual_p50 / base_p50:.3f} | {base_p99:.3f} | {dual_p99:.3f} |")


def run_main():
  """Parses the flags and runs the benchmark."""
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run_main()
