"""Benchmark: Beam targets pipeline (DirectRunner) vs in-process targets.

Same model (3x256 ReLU MLP with dropout 0.2, 64 inputs), same data, same
seed and batch size, timed in one run:
  * in-process: `mc_dropout_targets(model, x, ...)` on a numpy array, cold
    (first call: traces and compiles) and warm (second call);
  * beam: `run_targets_pipeline` on the same examples as TFRecord files,
    end to end (launcher model load, read, MC passes, shuffle by shard,
    shard files, manifest), with the DirectRunner in-process and with
    `--direct_running_mode=multi_processing` workers.
Prints seconds, examples/s and the ratio beam / in-process (warm), and checks
that every Beam result equals the in-process targets bitwise.

Usage (needs apache_beam, e.g. .venv-beam/bin/python):
  python bench/beam_bench.py            # N=16384, T=50
  python bench/beam_bench.py --quick    # N=4096, T=20
"""

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from dropvar_tf import targets
from dropvar_tf._keras import keras
from dropvar_tf.beam import records
from dropvar_tf.beam import targets_pipeline


def build_mlp(input_dim=64, width=256, depth=3, rate=0.2, seed=0):
  keras.utils.set_random_seed(seed)
  x = keras.Input((input_dim,), name="x")
  h = x
  for _ in range(depth):
    h = keras.layers.Dense(width, activation="relu")(h)
    h = keras.layers.Dropout(rate)(h)
  return keras.Model(x, keras.layers.Dense(1)(h))


def _row(name, seconds, n, base):
  ratio = seconds / base if base else float("nan")
  return f"{name:<34} {seconds:8.2f} s {n / seconds:10.0f} ex/s {ratio:7.2f}x"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--num_examples", type=int, default=None)
  parser.add_argument("--num_samples", type=int, default=None)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--workers", type=int, default=2,
                      help="DirectRunner processes in multi_processing mode")
  args = parser.parse_args()
  n = args.num_examples or (4096 if args.quick else 16384)
  t = args.num_samples or (20 if args.quick else 50)
  seed = 0
  root = tempfile.mkdtemp(prefix="beam_bench_")
  try:
    model = build_mlp()
    model_path = os.path.join(root, "model.keras")
    model.save(model_path)
    x = np.random.default_rng(0).normal(size=(n, 64)).astype(np.float32)
    files = records.write_examples(os.path.join(root, "ex", "ex"), x,
                                   records.model_input_specs(model),
                                   num_shards=4)
    kwargs = dict(num_samples=t, seed=seed, batch_size=args.batch_size)

    start = time.perf_counter()
    reference = targets.mc_dropout_targets(model, x, **kwargs)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    again = targets.mc_dropout_targets(model, x, **kwargs)
    warm = time.perf_counter() - start
    if not np.array_equal(again, reference):
      raise RuntimeError("mc_dropout_targets is not deterministic here.")

    results = []
    modes = [("beam DirectRunner (in-process)", []),
             (f"beam DirectRunner ({args.workers} processes)",
              [f"--direct_num_workers={args.workers}",
               "--direct_running_mode=multi_processing"])]
    for name, flags in modes:
      output = os.path.join(root, "out_" + str(len(results)))
      start = time.perf_counter()
      targets_pipeline.run_targets_pipeline(
          model_path, files, output, num_shards=8, pipeline_args=flags,
          **kwargs)
      seconds = time.perf_counter() - start
      _, got = records.read_targets(output)
      results.append((name, seconds, np.array_equal(got, reference)))

    print(f"N={n} examples, T={t} samples, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs")
    print(_row("in-process mc_dropout_targets cold", cold, n, warm))
    print(_row("in-process mc_dropout_targets warm", warm, n, warm))
    for name, seconds, equal in results:
      print(_row(name, seconds, n, warm) + f"   bitwise equal: {equal}")
    print("ratio = seconds / in-process warm seconds (lower is better)")
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
