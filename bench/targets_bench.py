"""Benchmark: mc_dropout_targets vs T plain compiled forward passes.

On a 3x256 ReLU MLP with dropout, times (interleaved, same process):
  * targets: `mc_dropout_targets(model, x, num_samples=T)` (seeded masks,
    tiled, float64 moment sums, deterministic pass included);
  * compiled: one `tf.function` running `model(x, training=True)` T times
    (a loop unrolled in the graph), reducing to the std;
  * tiled: one `tf.function` on x repeated T times (chunked like targets);
  * eager: a Python loop of T `model(x, training=True)` calls (once, for
    contrast).
Prints the median of each and the ratio targets / min(compiled, tiled).

Usage:
  python bench/targets_bench.py            # N=1024,4096, T=100, 5 repeats
  python bench/targets_bench.py --quick    # N=1024, T=100, 2 repeats
"""

import argparse
import statistics
import time

import numpy as np

from dropvar_tf import targets
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf


def build_mlp(input_dim=64, width=256, depth=3, rate=0.2, seed=0):
  keras.utils.set_random_seed(seed)
  layers = [keras.Input((input_dim,))]
  for _ in range(depth):
    layers += [keras.layers.Dense(width, activation="relu"),
               keras.layers.Dropout(rate)]
  layers.append(keras.layers.Dense(1))
  return keras.Sequential(layers)


def make_compiled(model, num_samples):
  @tf.function
  def run(x):
    outs = [model(x, training=True) for _ in range(num_samples)]
    return tf.math.reduce_std(tf.stack(outs), axis=0)
  return run


def make_tiled(model, num_samples, batch):
  per_pass = max(1, min(num_samples, targets.TILE_ROWS // batch))
  passes = -(-num_samples // per_pass)
  per_pass = -(-num_samples // passes)

  @tf.function
  def run(x):
    s1 = tf.zeros([tf.shape(x)[0], 1], tf.float64)
    s2 = tf.zeros_like(s1)
    for _ in range(passes):
      y = model(tf.tile(x, [per_pass, 1]), training=True)
      y = tf.reshape(tf.cast(y, tf.float64), [per_pass, -1, 1])
      s1 += tf.reduce_sum(y, 0)
      s2 += tf.reduce_sum(y * y, 0)
    n = float(per_pass * passes)
    return tf.sqrt(tf.maximum(s2 / n - (s1 / n) ** 2, 0.0))
  return run


def eager_loop(model, x, num_samples):
  outs = [model(x, training=True).numpy() for _ in range(num_samples)]
  return np.std(np.stack(outs), axis=0)


def timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def bench(n, num_samples, repeats, batch_size):
  model = build_mlp()
  x = np.random.RandomState(0).randn(n, 64).astype(np.float32)
  xt = tf.constant(x)
  compiled = make_compiled(model, num_samples)
  tiled = make_tiled(model, num_samples, n)
  runs = {
      "targets": lambda: targets.mc_dropout_targets(
          model, x, num_samples=num_samples, batch_size=batch_size,
          progress=False),
      "compiled": lambda: compiled(xt).numpy(),
      "tiled": lambda: tiled(xt).numpy(),
  }
  for fn in runs.values():  # Warm up: tracing is not what we measure.
    fn()
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, fn in runs.items():  # Interleaved: machine noise hits all.
      times[name].append(timed(fn))
  eager = timed(lambda: eager_loop(model, xt, num_samples))
  # The machine may be shared: the median is robust, the min is the best
  # case each one can reach.
  med = {name: statistics.median(t) for name, t in times.items()}
  ref = min(med["compiled"], med["tiled"])
  ref_min = min(*times["compiled"], *times["tiled"])
  print(f"N={n} T={num_samples} batch_size={batch_size} repeats={repeats}")
  for name in runs:
    print(f"  {name:9s} median {1e3 * med[name]:8.1f} ms  "
          f"min {1e3 * min(times[name]):8.1f} ms  "
          f"(all: {', '.join(f'{1e3 * t:.0f}' for t in times[name])})")
  print(f"  eager     once   {1e3 * eager:8.1f} ms")
  print(f"  ratio targets / best plain compiled = {med['targets'] / ref:.2f}x"
        f" (min/min {min(times['targets']) / ref_min:.2f}x; goal <= 1.3x); "
        f"eager / targets = {eager / med['targets']:.1f}x")
  return med["targets"] / ref


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="N=1024 only, 2 repeats")
  parser.add_argument("--num_samples", type=int, default=100)
  parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
  parser.add_argument("--repeats", type=int, default=None,
                      help="interleaved repeats (default 5, 2 with --quick)")
  parser.add_argument("--batch_size", type=int, default=1024)
  args = parser.parse_args()
  sizes = [1024] if args.quick else args.sizes
  repeats = args.repeats or (2 if args.quick else 5)
  print(f"TF {tf.__version__}, Keras {keras.__version__}, devices: "
        f"{[d.device_type for d in tf.config.list_logical_devices()]}")
  for n in sizes:
    bench(n, args.num_samples, repeats, args.batch_size)


if __name__ == "__main__":
  main()
