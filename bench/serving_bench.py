"""gRPC round trip vs in-process call of the same served signature.

  python bench/serving_bench.py [--quick] [--batch_sizes=1,256]

Exports a small dual-output model, serves it with the local
`dropvar_model_server` (in process, on 127.0.0.1), and times, interleaved in
one loop so machine load hits both alike:
- in-process: the server's loaded `serving_default` (its Session signature,
  `bundle.SavedModelBundle`) called on numpy inputs
  (what the server itself runs per request);
- gRPC: `VariationClient.predict` (encode, Predict RPC over loopback, decode);
- client encode (numpy -> PredictRequest) and decode (PredictResponse bytes ->
  numpy) cost per request.
Prints p50/p99 in milliseconds and the gRPC overhead (p50 difference).
"""

import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The repository (a checkout that is not installed) and the test fixtures.
sys.path.insert(0, _REPO)
sys.path.insert(0, os.path.join(_REPO, "tests"))

from dropvar_tf import contract
from dropvar_tf._keras import keras
from dropvar_tf.serving import client as client_lib
from dropvar_tf.serving import server as server_lib
import serving_testing as testing
from tensorflow_serving.apis import model_pb2
from tensorflow_serving.apis import predict_pb2

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
  """Defines the benchmark's flags on `flag_values`."""
  flags.DEFINE_bool("quick", False, "Fewer iterations (a smoke run).",
                    flag_values=flag_values)
  flags.DEFINE_list("batch_sizes", ["1", "256"], "Batch sizes to time.",
                    flag_values=flag_values)
  flags.DEFINE_integer("iterations", 1000,
                       "Timed iterations per batch size.",
                       flag_values=flag_values)


def _mlp(features=32, width=256, seed=0):
  """A 3x256 MLP with prediction and variation outputs (a realistic size)."""
  init = keras.initializers.GlorotUniform(seed=seed)
  x = keras.Input(shape=(features,), name="x")
  h = x
  for _ in range(3):
    h = keras.layers.Dense(width, activation="relu",
                           kernel_initializer=init)(h)
    h = keras.layers.Dropout(0.2)(h)
  prediction = keras.layers.Dense(1, kernel_initializer=init)(h)
  variation = keras.layers.Dense(1, activation="softplus",
                                 kernel_initializer=init)(h)
  return keras.Model(x, {contract.PREDICTION_KEY: prediction,
                         contract.VARIATION_KEY: variation})


def _pct(samples, q):
  return float(np.percentile(np.asarray(samples) * 1e3, q))


def bench(batch_size, iterations, client, signature, features):
  """Times one batch size; returns {name: list of seconds}."""
  rng = np.random.default_rng(batch_size)
  x = rng.normal(size=(batch_size, features)).astype(np.float32)
  response_bytes = client.predict_response(
      {"x": x}, timeout=10).SerializeToString()
  for _ in range(max(20, iterations // 20)):  # Warm up both paths.
    signature(x=x)
    client.predict({"x": x})
  times = {"in-process": [], "grpc": [], "encode": [], "decode": []}
  clock = time.perf_counter
  for _ in range(iterations):
    t0 = clock()
    out = signature(x=x)
    t1 = clock()
    result = client.predict({"x": x})
    t2 = clock()
    client.build_request({"x": x})
    t3 = clock()
    response = predict_pb2.PredictResponse.FromString(response_bytes)
    _ = client_lib.decode_outputs(response)
    t4 = clock()
    times["in-process"].append(t1 - t0)
    times["grpc"].append(t2 - t1)
    times["encode"].append(t3 - t2)
    times["decode"].append(t4 - t3)
  np.testing.assert_allclose(result.variation, out[contract.VARIATION_KEY],
                             rtol=1e-5)
  return times


def main(argv):
  del argv
  iterations = 100 if FLAGS.quick else FLAGS.iterations
  features = 32
  with tempfile.TemporaryDirectory() as base:
    model = _mlp(features)
    testing.write_export(model, base, 1)
    server = server_lib.ModelServer([server_lib.model_config("bench", base)],
                                    poll_seconds=0)
    server.start()
    try:
      # What the server runs per request: the version's Session signature.
      signature, _, _ = server.manager.models["bench"].resolve(
          model_pb2.ModelSpec(name="bench")).signature(
              contract.SERVING_SIGNATURE)
      with client_lib.VariationClient(server.target, "bench") as client:
        client.input_specs()  # Cache metadata outside the timed loop.
        print(f"3x256 MLP, {features} features, {iterations} interleaved "
              "iterations, local dropvar_model_server on 127.0.0.1")
        print(f"{'batch':>5} {'path':>11} {'p50 ms':>8} {'p99 ms':>8}")
        for batch_size in [int(b) for b in FLAGS.batch_sizes]:
          times = bench(batch_size, iterations, client, signature, features)
          for name in ("in-process", "grpc", "encode", "decode"):
            print(f"{batch_size:>5} {name:>11} {_pct(times[name], 50):8.3f} "
                  f"{_pct(times[name], 99):8.3f}")
          overhead = _pct(times["grpc"], 50) - _pct(times["in-process"], 50)
          print(f"{batch_size:>5} {'overhead':>11} {overhead:8.3f}  "
                f"(gRPC p50 - in-process p50; goal <= 1 ms at batch 1)")
    finally:
      server.stop()


def run_main():
  """Parses the flags and runs the benchmark."""
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run_main()
